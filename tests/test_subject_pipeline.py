"""Subject-consistent curation end to end: entities -> masks -> background -> v2 sample -> shard -> official case.

Models are scripted or fake where random weights would produce garbage (see subject_fixtures.py); FLUX Fill is
the real tiny test build, wrapped to count its calls. The last test runs the whole Prefect flow with the `test`
profile (all random builds): failures must be recorded with reasons, nothing may crash.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from subject_fixtures import FakeGrounder, FakePlateDetector, FakeSegmenter, ScriptedEntities, build_world

from models.base import ModelSpec
from models.inpainter import INPAINTERS
from schemas.config import BackgroundConfig, ClipConfig, CurateConfig, ShardConfig
from schemas.entities import appears_verbatim
from schemas.sample import SampleMeta, load_sample_meta
from tasks.background import BackgroundStage
from tasks.entities import EntitiesStage
from tasks.masks import MasksStage
from tasks.official_export import export_cases, import_case
from tasks.pipeline import stage_classes
from tasks.runner import run_stage_batch
from tasks.sample import SampleStage
from tasks.select import all_from_one_keyframe
from tasks.shards import PendingSample, write_shards

CONFIG = CurateConfig(
    subjects=True, clip=ClipConfig(max_side=320), background=BackgroundConfig(max_retries=1)
)


class CountingPipe:
    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __call__(self, **kwargs):
        self.calls.append(len(kwargs["prompt"]))
        return self.pipe(**kwargs)


@pytest.fixture(scope="module")
def curated(tmp_path_factory, sample_videos):
    """Run every stage on two_people (2 subjects, objects, background) and astronaut_zoom (no background)."""
    root = tmp_path_factory.mktemp("subjects")
    w = build_world(root, sample_videos, ("two_people", "astronaut_zoom"), CONFIG)
    flux = INPAINTERS.build(
        ModelSpec(
            backend="flux-fill",
            random_init=True,
            device="cpu",
            options={"num_inference_steps": 2, "max_side": 64},
        )
    )
    flux.pipe = CountingPipe(flux.pipe)
    vids = sorted(w.ids.values())
    stages = [
        EntitiesStage(CONFIG, w.work, generator=ScriptedEntities()),
        MasksStage(CONFIG, w.work, grounder=FakeGrounder(), segmenter=FakeSegmenter()),
        BackgroundStage(CONFIG, w.work, inpainter=flux, plate_detector=FakePlateDetector(first_n=0)),
        SampleStage(CONFIG, w.work),
    ]
    for stage in stages:
        w.fingerprints[stage.name] = stage.fingerprint(w.fingerprints)
        out = run_stage_batch(stage, vids, w.fingerprints)
        assert sorted(out.ok) == vids, (stage.name, out)
    summary = write_shards(
        root / "out",
        [PendingSample(v, w.work.samples / v, w.fingerprints["sample"]) for v in vids],
        ShardConfig(),
    )
    assert summary.total_samples == 2
    return w, root, flux


def _meta(w, name) -> tuple[SampleMeta, Path]:
    d = w.work.samples / w.ids[name]
    return load_sample_meta(json.loads((d / "meta.json").read_text())), d


def _white_outside(image_path: Path, mask_path: Path) -> None:
    image = np.asarray(Image.open(image_path).convert("RGB"))
    mask = np.asarray(Image.open(mask_path).convert("L")) > 0
    assert image.shape[:2] == mask.shape, (image_path.name, image.shape, mask.shape)
    assert mask.any() and (~mask).any(), "an ellipse cut-out has both inside and outside pixels"
    assert (image[~mask] == 255).all(), f"{image_path.name} is not white outside its mask"
    # Tight crop: the mask touches every border of the cut-out.
    assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()


def test_v2_sample_formats_and_relation_graph(curated):
    w, _, flux = curated
    meta, d = _meta(w, "two_people")
    assert meta.schema_version == 2
    assert [(p.person_id, p.label) for p in meta.persons] == [(0, "woman"), (1, "man")]
    assert [[a.label for a in p.attributes] for p in meta.persons] == [
        ["black top", "long strawberry-blonde hair"],
        ["dark red shirt"],
    ]
    assert [o.label for o in meta.objects] == ["playing cards", "blue poker chip"]
    assert meta.background is not None and meta.background.label == "plain beige wall"

    # Every label verbatim in the caption, every member present, exactly one face per group.
    for label in meta.labels():
        assert appears_verbatim(label, meta.caption), label
    members = {p.name for p in d.iterdir()}
    assert set(meta.members()) <= members
    assert sorted(m for m in members if m.startswith("face_")) == sorted(p.face for p in meta.persons)
    assert len({p.face for p in meta.persons}) == len(meta.persons) == 2

    for p in meta.persons:
        assert p.face_keyframe == 1 and p.face_box is not None
        # Attribute: white-background cut-out of its mask, grounded inside ITS person's box on its keyframe.
        for a in p.attributes:
            _white_outside(d / a.image, d / a.mask)
            assert a.box.fraction_inside(p.boxes[a.keyframe]) == 1.0
            assert a.keyframe == meta.selection[f"attr_{p.person_id}_{p.attributes.index(a)}"]
        assert p.whole == f"person_{p.person_id}.png" and p.whole_mask == f"personmask_{p.person_id}.png"
        _white_outside(d / p.whole, d / p.whole_mask)
        assert p.whole_keyframe == meta.selection[f"person_{p.person_id}"]
    for o in meta.objects:
        _white_outside(d / o.image, d / o.mask)
    assert {
        "attrmask_0_0.png",
        "attrmask_0_1.png",
        "attrmask_1_0.png",
        "objmask_0.png",
        "objmask_1.png",
        "personmask_0.png",
        "personmask_1.png",
        "background.png",
    } <= members

    # One keyframe per entity, not all from the same one; the plate is the selected background keyframe's.
    assert not all_from_one_keyframe(meta.selection)
    assert meta.background.keyframe == meta.selection["background"]
    plate = Image.open(d / "background.png")
    assert plate.size == (640, 360)
    # FLUX Fill: one generation for this sample, none for the astronaut (no background phrase).
    assert meta.background_status.flux_calls == 1 and meta.background_status.status == "ok"
    assert flux.pipe.calls == [1]
    assert meta.dropped == []
    assert meta.random_weights and "background" in meta.random_weight_stages  # tiny FLUX
    assert meta.video.content_id == w.ids["two_people"]


def test_v2_sample_without_background(curated):
    w, _, _ = curated
    meta, d = _meta(w, "astronaut_zoom")
    assert meta.background is None and not (d / "background.png").exists()
    status = meta.background_status
    assert status.status == "skipped" and "no background phrase" in status.reason
    assert status.flux_calls == 0
    assert [p.label for p in meta.persons] == ["woman astronaut"]
    assert meta.has_subject_conditions


def test_trainer_reads_the_v2_sample(curated):
    from lumosx_model.conditions import conditions_from_meta

    w, _, _ = curated
    d = w.work.samples / w.ids["two_people"]
    raw = json.loads((d / "meta.json").read_text())
    members = {p.name: p.read_bytes() for p in d.iterdir()}
    conds = conditions_from_meta(raw, members, rng=random.Random(0), whole_person_prob=0.0)
    kinds = [c.condition.kind for c in conds]
    assert kinds.count("face") == 2 and kinds.count("attribute") == 3
    assert kinds.count("object") == 2 and kinds.count("background") == 1


def test_export_official_case_round_trip(curated):
    w, root, _ = curated
    cases = root / "cases"
    report = export_cases(root / "out" / "shards", cases, task="subject")
    assert not report.failures, report.failures
    assert sorted(report.written) == sorted(w.ids.values())
    case = cases / w.ids["two_people"]
    assert sorted(p.name for p in (case / "subjects" / "1").iterdir()) == [
        "black top.png",
        "face_woman.png",
        "long strawberry-blonde hair.png",
    ]
    assert (case / "background" / "plain beige wall.png").is_file()
    assert sorted(p.name for p in (case / "objects").iterdir()) == [
        "blue poker chip.png",
        "playing cards.png",
    ]

    meta, d = _meta(w, "two_people")
    imported, members = import_case(case)
    assert imported.caption == meta.caption
    assert sorted(imported.labels()) == sorted(meta.labels())  # the layout keeps objects in file-name order
    for orig, back in zip(meta.persons, imported.persons):
        assert members[back.face] == (d / orig.face).read_bytes()  # PNGs pass through byte for byte
        for a, b in zip(orig.attributes, back.attributes):
            assert members[b.image] == (d / a.image).read_bytes()
    objects = {o.label: members[o.image] for o in imported.objects}
    assert objects == {o.label: (d / o.image).read_bytes() for o in meta.objects}
    assert members[imported.background.image] == (d / "background.png").read_bytes()


def test_manifest_reads_v2_samples(curated):
    from tasks.shards import write_manifest

    w, root, _ = curated
    rows, _ = write_manifest(root / "out", w.work)
    assert rows == 2


def test_pipeline_order_follows_the_switch():
    names = [c.name for c in stage_classes(CONFIG)]
    assert names == ["keyframes", "caption", "persons", "faces", "entities", "masks", "background", "sample"]
    v1 = CONFIG.model_copy(update={"subjects": False})
    assert [c.name for c in stage_classes(v1)] == ["keyframes", "caption", "persons", "faces", "sample"]
    # The v1 sample fingerprint ignores the subject stages; the v2 one covers them.
    up = {s: s for s in ["caption", "keyframes", "faces", "entities", "masks", "background"]}
    changed = dict(up, masks="other")
    assert SampleStage(v1, None).fingerprint(up) == SampleStage(v1, None).fingerprint(changed)
    assert SampleStage(CONFIG, None).fingerprint(up) != SampleStage(CONFIG, None).fingerprint(changed)


def test_flow_with_random_test_builds_records_failures(prefect_harness, sample_videos, tmp_path):
    """Profile `test` (random builds) for the subject stages, real offline detectors before them so the video
    reaches the entities model. The flow must finish and say why the video did not become a sample."""
    from flows.curate import curate
    from schemas.config import load_config

    videos = tmp_path / "videos"
    videos.mkdir()
    for p in sample_videos:
        if p.stem == "two_people":
            shutil.copy(p, videos / p.name)
            shutil.copy(p.with_suffix(".txt"), videos / f"{p.stem}.txt")
    offline = load_config("offline")
    overrides = {
        "caption": {"source": "sidecar"},
        "persons": offline.persons.model_dump(mode="json"),
        "faces": offline.faces.model_dump(mode="json"),
    }
    report = curate(
        input=str(videos), output=str(tmp_path / "out"), profile="test", overrides=overrides, progress=False
    )
    stages = report["stages"]
    assert list(stages) == [
        "ingest",
        "keyframes",
        "caption",
        "persons",
        "faces",
        "entities",
        "masks",
        "background",
        "sample",
    ]
    assert report["videos_found"] == 1
    failed = {name: s["failed"] for name, s in stages.items() if s["failed"]}
    # Either the video made it to a (flagged) sample or one stage recorded why it did not.
    assert report["samples"] == 1 or len(failed) == 1, report
    for reasons in failed.values():
        assert all(isinstance(r, str) and r for r in reasons)
    if report["samples"]:
        assert "entities" in report["random_weight_stages"]
    else:
        assert report["videos_failed"] == 1


class _ScriptedBackend:
    """Registry backend standing in for Qwen2.5-VL inside the flow: the stage builds it from the spec."""

    @classmethod
    def from_spec(cls, spec):
        return ScriptedEntities()


def test_flow_makes_v2_samples_with_scripted_entities(prefect_harness, sample_videos, tmp_path, monkeypatch):
    """The whole flow with real offline detectors, scripted entity answers and random GroundingDINO, SAM and
    FLUX builds: the subject stages run inside Prefect tasks and the run ends with v2 samples in shards."""
    import tasks.entities
    from flows.curate import curate
    from models.base import Registry
    from schemas.config import load_config

    registry = Registry("entities model")
    registry.register("qwen2.5-vl")(_ScriptedBackend)
    monkeypatch.setattr(tasks.entities, "_ENTITY_MODELS", registry)
    videos = tmp_path / "videos"
    videos.mkdir()
    for p in sample_videos:
        if p.stem == "two_people":
            shutil.copy(p, videos / p.name)
            shutil.copy(p.with_suffix(".txt"), videos / f"{p.stem}.txt")
    offline = load_config("offline")
    overrides = {
        "caption": {"source": "sidecar"},
        "persons": offline.persons.model_dump(mode="json"),
        "faces": offline.faces.model_dump(mode="json"),
        "masks": {"grounder": {"options": {"box_threshold": 0.0, "text_threshold": 0.0}}},
    }
    out = tmp_path / "out"
    report = curate(input=str(videos), output=str(out), profile="test", overrides=overrides, progress=False)
    samples = list((out / "work" / "samples").glob("v*/meta.json"))
    assert len(samples) == 1, samples
    meta = load_sample_meta(json.loads(samples[0].read_text()))
    assert meta.schema_version == 2 and [p.label for p in meta.persons] == ["woman", "man"]
    assert meta.random_weights and {"entities", "masks", "background"} & set(meta.random_weight_stages)
    assert report["stages"]["entities"]["ok"] == 1, report
    assert report["samples"] == 1, report
