"""The ordered list of curation stages and their fingerprints: the one place that says what runs after what."""

from __future__ import annotations

from schemas.config import CurateConfig, fingerprint
from tasks.base import Stage, WorkDir

INGEST_VERSION = "2"  # 2: display size + rotation in VideoRecord


def stage_classes(config: CurateConfig) -> list[type[Stage]]:
    """Stages in run order (ingest, which turns uris into videos, runs before them)."""
    # Imported here so that importing the flow module stays cheap and a stage's heavy imports (torch, ultralytics)
    # happen in the worker that runs it.
    from tasks.caption import CaptionStage
    from tasks.faces import FacesStage
    from tasks.keyframes import KeyframesStage
    from tasks.persons import PersonsStage
    from tasks.sample import SampleStage

    stages: list[type[Stage]] = [KeyframesStage, CaptionStage, PersonsStage, FacesStage]
    if config.subjects:
        # Subject-consistent curation (v2 samples): entity words -> masks -> keyframe selection + clean plate.
        from tasks.background import BackgroundStage
        from tasks.entities import EntitiesStage
        from tasks.masks import MasksStage

        stages += [EntitiesStage, MasksStage, BackgroundStage]
    return [*stages, SampleStage]


def ingest_fingerprint(config: CurateConfig) -> str:
    return fingerprint("ingest", INGEST_VERSION, config.ingest)


def stage_fingerprints(config: CurateConfig, work: WorkDir) -> dict[str, str]:
    """stage name -> fingerprint; each includes its upstream stages', so a change reruns everything after it."""
    fps = {"ingest": ingest_fingerprint(config)}
    for cls in stage_classes(config):
        fps[cls.name] = cls(config, work).fingerprint(fps)
    return fps
