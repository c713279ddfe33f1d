"""Faces stage: linking, assignment and quality on synthetic boxes; real faces end to end on real photos."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from keyframe_media import astronaut_frames, group_pan_frames, video_with_keyframes
from PIL import Image

from models.base import ModelSpec
from models.face_detector import FACE_DETECTORS
from schemas.config import load_config
from schemas.records import Box, FacesRecord, PersonDetection, PersonsRecord
from tasks.base import StageError, VideoContext
from tasks.faces import (
    FacesStage,
    assign_faces,
    face_person_affinity,
    frontalness,
    link_across_keyframes,
    person_box_from_face,
    sharpness,
)
from tasks.keyframes import keyframe_name
from tasks.persons import PersonsStage
from tasks.runner import run_stage

B = Box.from_tuple

# The offline profile's persons and faces sections (real packaged weights, CPU).
OFFLINE = {
    "persons": {
        "model": {"backend": "opencv-hog", "device": "cpu"},
        "min_score": 0.6,
        "require_person": False,
    },
    "faces": {"model": {"backend": "dlib", "device": "cpu"}, "min_score": 0.6, "persons_from_faces": True},
}


# ------------------------------------------------------------------------------------------- synthetic logic
def test_linking_survives_persons_swapping_order_between_keyframes():
    left, right = B((10, 10, 60, 160)), B((200, 10, 250, 160))
    moved = lambda b, dx: B((b.x0 + dx, b.y0, b.x1 + dx, b.y1))  # noqa: E731
    boxes = {
        0: [left, right],
        1: [
            moved(right, 5),
            moved(left, 5),
            B((400, 0, 450, 100)),
        ],  # detector lists them the other way round
        2: [moved(left, 10)],
    }
    tracks = link_across_keyframes(boxes, min_iou=0.3)
    as_sets = sorted(sorted(t.items()) for t in tracks)
    assert as_sets == sorted([[(0, 0), (1, 1), (2, 0)], [(0, 1), (1, 0)], [(1, 2)]])


def test_linking_anchor_is_the_fullest_keyframe_ties_to_the_middle():
    a, b = B((0, 0, 10, 10)), B((100, 0, 110, 10))
    # Keyframe 1 has both persons: anchored there, keyframes 0 and 2 each link their one person.
    tracks = link_across_keyframes({0: [a], 1: [a, b], 2: [b]}, min_iou=0.3)
    assert sorted(sorted(t.items()) for t in tracks) == [[(0, 0), (1, 0)], [(1, 1), (2, 0)]]
    assert link_across_keyframes({}, 0.3) == []


def test_linking_uses_faces_when_person_boxes_disagree():
    body, extrapolated = (
        B((0, 0, 100, 300)),
        B((100, 0, 200, 300)),
    )  # IoU 0: a detector box vs a face-made box
    face = B((30, 20, 70, 60))
    tracks = link_across_keyframes({0: [body], 1: [extrapolated]}, 0.3, faces={0: [face], 1: [face]})
    assert tracks == [{0: 0, 1: 0}]
    assert len(link_across_keyframes({0: [body], 1: [extrapolated]}, 0.3)) == 2


def test_face_assignment_prefers_the_box_whose_head_it_is():
    # Two overlapping person boxes (a group photo); each face lies inside both.
    p_left, p_right = B((0, 0, 250, 400)), B((50, 0, 300, 400))
    f_left, f_right = B((60, 20, 100, 60)), B((200, 20, 240, 60))
    assigned, outside = assign_faces([p_left, p_right], [f_right, f_left])
    assert assigned == {0: 1, 1: 0} and outside == []
    assert face_person_affinity(f_left, p_left) > face_person_affinity(f_left, p_right) > 0


def test_face_outside_every_person_and_two_faces_in_one_box():
    person = B((0, 0, 100, 300))
    inside, behind, far = B((30, 10, 70, 50)), B((35, 150, 65, 180)), B((500, 10, 540, 50))
    assigned, outside = assign_faces([person], [behind, inside, far])
    assert assigned == {1: 0}  # one face per person: the one where a head is
    assert outside == [2]  # the far face is outside; the one behind is neither
    made = person_box_from_face(far, 640, 360)
    assert made.x0 < far.x0 and made.x1 > far.x1 and made.y0 <= far.y0 and made.y1 > far.y1
    assert made.x1 <= 640 and made.y1 <= 360
    assert assign_faces([], [far]) == ({}, [0])


def test_frontalness_from_landmarks():
    frontal = [(40, 40), (60, 40), (50, 52), (42, 64), (58, 64)]
    turned = [(40, 40), (60, 40), (58, 52), (42, 64), (58, 64)]  # nose far off the eye-mouth axis
    profile = [(40, 40), (42, 40), (55, 52), (40, 64), (42, 64)]
    assert frontalness(frontal) == pytest.approx(1.0)
    assert 0.3 < frontalness(turned) < 0.8
    assert frontalness(profile) < 0.1
    assert frontalness(None) is None
    # Roll-invariant: the same face rotated by 30 degrees is as frontal.
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    rolled = [(c * x - s * y, s * x + c * y) for x, y in turned]
    assert frontalness(rolled) == pytest.approx(frontalness(turned))


def test_sharpness_drops_with_blur():
    face = np.asarray(Image.fromarray(astronaut_frames()[0]).convert("L"))[60:200, 150:290]
    assert sharpness(face) > 3 * sharpness(cv2.GaussianBlur(face, (9, 9), 4))
    assert sharpness(np.zeros((0, 0), np.uint8)) == 0.0


# --------------------------------------------------------------------------------------------- end to end
def _run(video_id: str, frames: list[np.ndarray], overrides: dict):
    cfg = load_config("offline", overrides)
    ctx = video_with_keyframes(video_id, frames)
    run_stage(PersonsStage(cfg), [ctx])
    assert ctx.failure is None, ctx.failure
    assert isinstance(ctx.records["persons"], PersonsRecord)
    return FacesStage(cfg).process([ctx])[video_id], ctx


def _face_crop_png(ctx: VideoContext, name: str) -> np.ndarray:
    """The face crop `name` as the stage stored it: PNG bytes in the context's media, decoded."""
    data = ctx.media[name]
    assert isinstance(data, bytes) and data.startswith(b"\x89PNG\r\n\x1a\n"), name
    return ctx.rgb(name)


def _crop_has_face(detector, ctx: VideoContext, name: str) -> bool:
    crop = _face_crop_png(ctx, name)
    # Padding gives a detector the context around the face that its window expects; it adds no face.
    pad = max(crop.shape[:2]) // 2
    padded = cv2.copyMakeBorder(crop, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(128, 128, 128))
    return len(detector([np.ascontiguousarray(padded)])[0]) >= 1


@pytest.fixture(scope="module")
def mtcnn_checker():
    return FACE_DETECTORS.build(ModelSpec(backend="mtcnn", device="cpu"))


@pytest.fixture(scope="module")
def dlib_checker():
    return FACE_DETECTORS.build(ModelSpec(backend="dlib", device="cpu"))


def test_group_photo_offline_gives_five_or_more_persons_with_faces(mtcnn_checker):
    rec, ctx = _run("group", group_pan_frames(), OFFLINE)
    assert isinstance(rec, FacesRecord), rec
    with_face = rec.persons_with_face
    assert len(with_face) >= 5, [(p.person_id, p.source, p.no_face_reason) for p in rec.persons]
    assert len({p.face_path for p in with_face}) == len(with_face)
    for p in with_face:
        assert p.face.quality.usable and p.face.quality.reason is None
        assert p.face.box.fraction_inside(p.boxes[p.face.keyframe].expand(0.05, 640, 360)) > 0.5
        assert p.face_path == f"face_{p.person_id}.png"
        assert _crop_has_face(mtcnn_checker, ctx, p.face_path), p  # an independent detector agrees
    for p in rec.persons:
        assert p.has_face or p.no_face_reason  # never silently dropped
    # Three keyframes of one slow pan: persons are linked across keyframes (a face the detector finds on one
    # keyframe only may stay a one-keyframe person).
    assert sum(len(p.boxes) >= 2 for p in with_face) >= 4
    # Two faces of one person would make two identities: faces are distinct.
    boxes = [p.face.box for p in with_face if p.face.keyframe == 1]
    assert all(a.iou(b) < 0.3 for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_astronaut_with_mtcnn_gives_one_person_one_face(dlib_checker):
    overrides = {
        **OFFLINE,
        "faces": {**OFFLINE["faces"], "model": {"backend": "mtcnn", "device": "cpu"}, "min_score": 0.95},
    }
    rec, ctx = _run("astro", astronaut_frames(), overrides)
    assert isinstance(rec, FacesRecord), rec
    assert len(rec.persons_with_face) == 1
    (p,) = rec.persons_with_face
    assert p.face.landmarks is not None and p.face.quality.frontalness > 0.8
    assert _crop_has_face(dlib_checker, ctx, p.face_path)
    # The crop is the face box grown by crop_margin, cut from the keyframe the face was found on.
    crop = _face_crop_png(ctx, p.face_path)
    kf = ctx.rgb(keyframe_name(p.face.keyframe))
    b = p.face.box.expand(load_config("offline", overrides).faces.crop_margin, kf.shape[1], kf.shape[0])
    np.testing.assert_array_equal(crop, kf[int(b.y0) : int(np.ceil(b.y1)), int(b.x0) : int(np.ceil(b.x1))])


def test_person_without_a_face_is_kept_with_a_reason():
    # A person box over plain wall next to the real face: it gets no face, and says why.
    cfg = load_config("offline", {**OFFLINE, "faces": {**OFFLINE["faces"], "persons_from_faces": False}})
    frames = astronaut_frames()
    ctx = video_with_keyframes("astro", frames)
    face_person = PersonDetection(keyframe=0, box=B((120, 0, 380, 360)), score=0.9)
    wall = PersonDetection(keyframe=0, box=B((0, 200, 60, 360)), score=0.7)
    ctx.records["persons"] = PersonsRecord(
        video_id="astro", model={"backend": "x"}, detections=[face_person, wall]
    )
    rec = FacesStage(cfg).process([ctx])["astro"]
    assert isinstance(rec, FacesRecord)
    by_box = {p.boxes[0].x0: p for p in rec.persons}
    assert by_box[120.0].has_face and by_box[120.0].source == "detector"
    assert not by_box[0.0].has_face and "no face found" in by_box[0.0].no_face_reason


def test_through_the_runner_crops_belong_to_the_faces_stage_and_missing_keyframes_fail():
    cfg = load_config("offline", OFFLINE)
    good = video_with_keyframes("astro", astronaut_frames())
    gone = video_with_keyframes("gone", astronaut_frames())
    run_stage(PersonsStage(cfg), [good, gone])
    del gone.media[keyframe_name(1)]
    stats = run_stage(FacesStage(cfg), [good, gone])
    assert stats.ok == 1 and stats.failed == {"missing_media": 1}
    assert good.failure is None
    rec = good.record("faces", FacesRecord)
    assert rec.persons_with_face
    for p in rec.persons_with_face:
        assert good.media_stage[p.face_path] == "faces"
        assert _face_crop_png(good, p.face_path).size > 0
    assert gone.failure is not None and gone.failure.stage == "faces"
    assert gone.failure.error_class == "missing_media" and "faces" not in gone.records


def test_no_usable_face_fails_the_video():
    blank = [np.full((360, 480, 3), 128, np.uint8)] * 3
    rec, _ = _run("blank", blank, OFFLINE)
    assert isinstance(rec, StageError) and rec.reason == "no_face"
    # Too strict thresholds: faces are found but none is usable, and the message says so.
    strict = {**OFFLINE, "faces": {**OFFLINE["faces"], "min_size_px": 400, "persons_from_faces": False}}
    cfg = load_config("offline", strict)
    ctx = video_with_keyframes("astro", astronaut_frames())
    ctx.records["persons"] = PersonsRecord(
        video_id="astro",
        model={"backend": "x"},
        detections=[PersonDetection(keyframe=k, box=B((100, 0, 400, 360)), score=0.9) for k in range(3)],
    )
    err = FacesStage(cfg).process([ctx])["astro"]
    assert isinstance(err, StageError) and err.reason == "no_face" and "none usable" in str(err)


def test_insightface_test_build_through_the_stage():
    overrides = {
        "persons": {"model": {"backend": "opencv-hog", "device": "cpu"}, "require_person": False},
        "faces": {
            "model": {
                "backend": "insightface",
                "random_init": True,
                "device": "cpu",
                "options": {"det_size": [128, 128], "det_thresh": 0.55},
            },
            "min_score": 0.0,
            "min_size_px": 1,
            "min_sharpness": 0.0,
            "min_frontalness": 0.0,
            "persons_from_faces": True,
        },
    }
    rec, ctx = _run("group", group_pan_frames(), overrides)
    # Random weights (seeded): whatever it finds, the record is well formed and flagged as not data.
    assert isinstance(rec, FacesRecord), rec
    assert rec.model.random_weights and rec.persons_with_face
    for p in rec.persons:
        for box in p.boxes.values():
            assert 0 <= box.x0 <= box.x1 <= 640 and 0 <= box.y0 <= box.y1 <= 360
        if p.has_face:
            assert _face_crop_png(ctx, p.face_path).size > 0


def test_fingerprint_follows_face_thresholds_and_linking():
    fp = lambda o: FacesStage(load_config("offline", o)).fingerprint({"persons": "p"})  # noqa: E731
    base = fp(OFFLINE)
    assert fp(OFFLINE) == base
    assert fp({**OFFLINE, "faces": {**OFFLINE["faces"], "min_sharpness": 30}}) != base
    assert fp({**OFFLINE, "persons": {**OFFLINE["persons"], "match_iou": 0.5}}) != base
