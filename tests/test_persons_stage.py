"""Persons stage: keyframes in, filtered person detections out, failures as StageError rows."""

from __future__ import annotations

import numpy as np
import pytest
from keyframe_media import group_pan_frames, video_with_keyframes

from schemas.config import load_config
from schemas.records import PersonsRecord
from tasks.base import StageError
from tasks.persons import PersonsStage

OFFLINE_PERSONS = {
    "model": {"backend": "opencv-hog", "device": "cpu", "batch_size": 2},
    "min_score": 0.6,
    "require_person": True,  # the offline profile turns it off (faces stand in); these tests check the rule
}


def _stage(persons: dict, profile: str = "offline") -> PersonsStage:
    return PersonsStage(load_config(profile, {"persons": persons}))


def test_hog_persons_on_group_pan_batched_over_videos():
    stage = _stage(OFFLINE_PERSONS)
    frames = group_pan_frames()
    blank = [np.full_like(f, 128) for f in frames]
    a = video_with_keyframes("group", frames)
    b = video_with_keyframes("blank", blank)
    out = stage.process([a, b])  # 6 keyframes through the detector in chunks of 2
    rec = out["group"]
    assert isinstance(rec, PersonsRecord) and rec.video_id == "group"
    assert rec.model.backend == "opencv-hog" and not rec.model.random_weights
    assert rec.detections
    h = frames[0].shape[0]
    for d in rec.detections:
        assert d.keyframe in (0, 1, 2)
        assert d.score >= 0.6 and d.box.height >= 0.1 * h
    err = out["blank"]
    assert isinstance(err, StageError) and err.reason == "no_person"


def test_filters_and_require_person():
    frames = group_pan_frames()
    strict = _stage({**OFFLINE_PERSONS, "min_height_frac": 0.95})
    ctx = video_with_keyframes("group", frames)
    assert strict.process([ctx])["group"].reason == "no_person"
    lenient = _stage({**OFFLINE_PERSONS, "min_height_frac": 0.95, "require_person": False})
    rec = lenient.process([ctx])["group"]
    assert isinstance(rec, PersonsRecord) and rec.detections == []


def test_unreadable_or_missing_keyframe_is_this_videos_failure():
    stage = _stage(OFFLINE_PERSONS)
    bad = video_with_keyframes("bad", group_pan_frames())
    bad.media["kf_1"] = b"not a png"  # media that is neither an array nor a decodable image
    gone = video_with_keyframes("gone", group_pan_frames())
    del gone.media["kf_2"]
    good = video_with_keyframes("good", group_pan_frames())
    out = stage.process([bad, gone, good])
    assert isinstance(out["bad"], StageError) and out["bad"].reason == "unreadable_media"
    assert "kf_1" in str(out["bad"])
    assert isinstance(out["gone"], StageError) and out["gone"].reason == "missing_media"
    assert isinstance(out["good"], PersonsRecord) and out["good"].detections


def test_fingerprint_follows_thresholds_and_model():
    up = {"keyframes": "k"}
    base = _stage(OFFLINE_PERSONS).fingerprint(up)
    assert _stage(OFFLINE_PERSONS).fingerprint(up) == base
    assert _stage({**OFFLINE_PERSONS, "min_score": 0.7}).fingerprint(up) != base
    assert _stage({"model": {"backend": "yolo", "random_init": True}}).fingerprint(up) != base
    assert _stage(OFFLINE_PERSONS).fingerprint({"keyframes": "other"}) != base


def test_yolo_test_build_through_the_stage():
    stage = _stage(
        {
            "model": {
                "backend": "yolo",
                "random_init": True,
                "device": "cpu",
                "options": {"imgsz": 160, "conf": 0.0},
            },
            "min_height_frac": 0.0,
        },
        profile="test",
    )
    ctx = video_with_keyframes("group", group_pan_frames())
    rec = stage.process([ctx])["group"]
    assert isinstance(rec, PersonsRecord) and rec.model.random_weights
    for d in rec.detections:
        assert 0 <= d.box.x0 <= d.box.x1 <= 640 and 0 <= d.box.y0 <= d.box.y1 <= 360


@pytest.mark.parametrize("backend", ["opencv-hog"])
def test_setup_reuses_the_cached_adapter(backend):
    a, b = _stage(OFFLINE_PERSONS), _stage(OFFLINE_PERSONS)
    a.setup()
    b.setup()
    assert a.detector is b.detector
