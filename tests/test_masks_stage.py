"""Masks stage: phrases grounded in the right region, one batched call per model, reasons for every rejection."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from subject_fixtures import FakeGrounder, FakeSegmenter, ScriptedEntities, build_world

from models.base import ModelSpec
from schemas.config import CurateConfig, MasksConfig
from schemas.records import FacesRecord, VideoRecord
from tasks.base import VideoContext
from tasks.entities import EntitiesStage
from tasks.masks import NOT_GROUNDED, NOT_ON_KEYFRAME, MasksRecord, MasksStage, load_mask
from tasks.runner import run_stage_batch


@pytest.fixture(scope="module")
def world(tmp_path_factory, sample_videos):
    """Both scripted videos up to their entities record."""
    config = CurateConfig(subjects=True)
    w = build_world(tmp_path_factory.mktemp("masks"), sample_videos, ("two_people", "astronaut_zoom"), config)
    stage = EntitiesStage(config, w.work, generator=ScriptedEntities())
    w.fingerprints["entities"] = stage.fingerprint(w.fingerprints)
    out = run_stage_batch(stage, list(w.ids.values()), w.fingerprints)
    assert sorted(out.ok) == sorted(w.ids.values()), out
    return w


def _run(world, stage: MasksStage) -> dict[str, MasksRecord]:
    fps = dict(world.fingerprints)
    fps["masks"] = stage.fingerprint(fps)
    out = stage.process([_ctx(world, vid, fps) for vid in sorted(world.ids.values())])
    return out  # type: ignore[return-value]


def _ctx(world, vid, fps) -> VideoContext:
    video = VideoRecord.model_validate(world.work.load("ingest", vid)["record"])
    return VideoContext(video=video, work=world.work, fingerprints=fps)


def test_masks_stage_grounds_in_person_boxes_and_records_reasons(world):
    two, astro = world.ids["two_people"], world.ids["astronaut_zoom"]
    # Frames reach SAM video by video (sorted ids), keyframe by keyframe; two_people's prompts on a keyframe:
    # person_0, person_1, attr_0_0, attr_0_1, attr_1_0, object_0, object_1.
    base = 3 * sorted(world.ids.values()).index(two)
    segmenter = FakeSegmenter({(base + 0, 5): "empty", (base + 2, 2): "fragmented"})
    # Keyframes are searched in order, so the 2nd search of a phrase is on keyframe 1.
    grounder = FakeGrounder(missing=lambda phrase, n: phrase == "blue poker chip" and n == 1)
    stage = MasksStage(CurateConfig(subjects=True), world.work, grounder=grounder, segmenter=segmenter)

    out = _run(world, stage)
    assert len(grounder.calls) == 1 and len(segmenter.calls) == 1, "models must be called once per batch"
    assert segmenter.calls == [6]  # all keyframes of both videos in one call

    rec = out[two]
    assert isinstance(rec, MasksRecord), rec
    faces = FacesRecord.model_validate(world.work.load("faces", two)["record"])
    boxes = {p.person_id: p.boxes for p in faces.persons}
    # Attribute phrases were searched inside their own person's box, objects on the whole frame.
    phrases, regions = grounder.calls[0]
    for item, region in zip(phrases, regions):
        if "black top" in item:
            assert region in boxes[0].values()
        if "dark red shirt" in item:
            assert region in boxes[1].values()
        if "playing cards" in item:
            assert region is None
    for e in rec.entities:
        for f in e.frames:
            if e.kind == "attribute" and f.box is not None:
                pb = boxes[e.person_id][f.keyframe]
                assert f.box.fraction_inside(pb) == 1.0, (e.key, f.box, pb)

    by_key = {e.key: e for e in rec.entities}
    assert set(by_key) == {"person_0", "person_1", "attr_0_0", "attr_0_1", "attr_1_0", "object_0", "object_1"}
    assert by_key["person_0"].valid_keyframes() == [0, 1, 2]
    assert by_key["attr_0_1"].label == "long strawberry-blonde hair" and by_key[
        "attr_0_1"
    ].valid_keyframes() == [0, 1, 2]
    assert by_key["object_0"].reasons() == {0: "empty"}
    assert by_key["attr_0_0"].reasons() == {2: "fragmented"}
    assert by_key["object_1"].reasons() == {1: NOT_GROUNDED}
    # Every entity has one frame per keyframe; valid frames carry a 1-bit full-frame PNG.
    for e in rec.entities:
        assert [f.keyframe for f in e.frames] == [0, 1, 2]
        for f in e.frames:
            assert (f.mask is not None) == f.ok
            if f.ok:
                with Image.open(world.work.abs(f.mask)) as im:
                    assert im.mode == "1" and im.size == (640, 360)
                mask = load_mask(world.work, f.mask)
                assert mask.any() and f.check is not None and f.check.ok
            else:
                assert f.reason

    a = out[astro]
    assert {e.key for e in a.entities} == {"person_0", "attr_0_0", "object_0"}


def test_subject_without_person_box_on_a_keyframe(world, tmp_path):
    """A person missing from a keyframe gets 'person not on keyframe' for its mask and attributes there."""
    two = world.ids["two_people"]
    faces = FacesRecord.model_validate(world.work.load("faces", two)["record"])
    saved = world.work.load("faces", two)
    try:
        faces.persons[1].boxes.pop(2)
        world.work.save_ok("faces", two, "faces", faces)
        stage = MasksStage(
            CurateConfig(subjects=True), world.work, grounder=FakeGrounder(), segmenter=FakeSegmenter()
        )
        rec = _run(world, stage)[two]
        by_key = {e.key: e for e in rec.entities}
        assert by_key["person_1"].reasons() == {2: NOT_ON_KEYFRAME}
        assert by_key["attr_1_0"].reasons() == {2: NOT_ON_KEYFRAME}
        assert by_key["person_0"].valid_keyframes() == [0, 1, 2]
    finally:
        world.work.save_ok("faces", two, saved["fingerprint"], FacesRecord.model_validate(saved["record"]))


def test_masks_stage_with_tiny_random_models(world):
    """The real code path: registry -> GroundingDINO and SAM test builds -> check -> record (garbage, no crash)."""
    cfg = CurateConfig(
        subjects=True,
        masks=MasksConfig(
            grounder=ModelSpec(
                backend="grounding-dino",
                random_init=True,
                device="cpu",
                options={"box_threshold": 0.0, "text_threshold": 0.0},
            ),
            segmenter=ModelSpec(backend="sam", random_init=True, device="cpu"),
        ),
    )
    stage = MasksStage(cfg, world.work)
    stage.setup()
    assert stage.grounder.info.random_weights and stage.segmenter.info.random_weights
    out = _run(world, stage)
    for vid, rec in out.items():
        assert isinstance(rec, MasksRecord), rec
        for e in rec.entities:
            assert [f.keyframe for f in e.frames] == [0, 1, 2]
            for f in e.frames:
                assert f.ok or f.reason, (vid, e.key, f)
                if e.kind == "attribute" and f.box is not None:
                    person = next(
                        p
                        for p in FacesRecord.model_validate(world.work.load("faces", vid)["record"]).persons
                        if p.person_id == e.person_id
                    )
                    assert f.box.fraction_inside(person.boxes[f.keyframe]) == pytest.approx(1.0)
    # With zero thresholds every phrase gets a box, so every entity reached SAM and was checked.
    checked = [f for rec in out.values() for e in rec.entities for f in e.frames if f.check is not None]
    assert checked and all(np.isfinite(f.check.area_frac) for f in checked)
