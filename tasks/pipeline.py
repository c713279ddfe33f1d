"""The ordered list of curation stages and their fingerprints: the one place that says what runs after what."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from schemas.config import CurateConfig
from schemas.records import Record
from tasks.base import Stage


def stage_classes(config: CurateConfig) -> list[type[Stage]]:
    """Stages in run order, ingest first (it turns a discovered file into a video every later stage starts from)."""
    # Imported here so that importing the flow module stays cheap and a stage's heavy imports (torch, ultralytics)
    # happen in the worker that runs it.
    from tasks.caption import CaptionStage
    from tasks.faces import FacesStage
    from tasks.ingest import IngestStage
    from tasks.keyframes import KeyframesStage
    from tasks.persons import PersonsStage
    from tasks.sample import SampleStage

    stages: list[type[Stage]] = [IngestStage, KeyframesStage, CaptionStage, PersonsStage, FacesStage]
    if config.subjects:
        # Subject-consistent curation (v2 samples): entity words -> masks -> visual check of every binding ->
        # keyframe selection + clean plate (after the check: a video it fails costs no FLUX call).
        from tasks.background import BackgroundStage
        from tasks.binding_check import BindingCheckStage
        from tasks.entities import EntitiesStage
        from tasks.masks import MasksStage

        stages += [EntitiesStage, MasksStage, BindingCheckStage, BackgroundStage]
    return [*stages, SampleStage]


def stage_fingerprints(config: CurateConfig, classes: list[type[Stage]] | None = None) -> dict[str, str]:
    """stage name -> fingerprint; each includes its upstream stages', so a change reruns everything after it."""
    fps: dict[str, str] = {}
    for cls in classes or stage_classes(config):
        fps[cls.name] = cls(config).fingerprint(fps)
    return fps


def _import(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def _path(obj: type) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


@dataclass(frozen=True)
class StageSpec:
    """A stage by import path: a worker imports only the stage it runs (and its models' libraries)."""

    name: str
    path: str
    record_path: str
    reusable: bool

    @classmethod
    def of(cls, stage: type[Stage]) -> StageSpec:
        return cls(stage.name, _path(stage), _path(stage.record_type), stage.reusable)

    def load(self) -> type[Stage]:
        return _import(self.path)

    def record_type(self) -> type[Record]:
        return _import(self.record_path)


@dataclass
class Pipeline:
    """What an executor runs: the stages in order, the configuration, and the stages' fingerprints.

    Picklable and light: stages travel as import paths, so a Ray actor imports only its own stage's modules.
    Tests and benchmarks build pipelines of stand-in stages with `Pipeline.of`.
    """

    config: CurateConfig
    specs: list[StageSpec]
    fingerprints: dict[str, str] = field(default_factory=dict)

    @classmethod
    def for_config(cls, config: CurateConfig) -> Pipeline:
        return cls.of(config, stage_classes(config))

    @classmethod
    def of(cls, config: CurateConfig, classes: list[type[Stage]]) -> Pipeline:
        return cls(config, [StageSpec.of(c) for c in classes], stage_fingerprints(config, classes))

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def classes(self) -> list[type[Stage]]:
        return [s.load() for s in self.specs]

    @property
    def final_fingerprint(self) -> str:
        """The fingerprint of the last stage: a sample made under it is current."""
        return self.fingerprints[self.specs[-1].name]

    def spec(self, name: str) -> StageSpec | None:
        return next((s for s in self.specs if s.name == name), None)

    def build(self, index: int) -> Stage:
        """An instance of the stage at `index` (imports only its module)."""
        return self.specs[index].load()(self.config)
