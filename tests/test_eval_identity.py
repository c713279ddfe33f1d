"""The identity metric (ArcSim/CurSim protocol): Hungarian matching arithmetic, then real numbers with dlib's real
offline face detector and recogniser on the built-in demo clips (made from real photos)."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.evaluation.identity import (
    calibrate,
    detect_faces,
    embed_faces,
    frame_score,
    hungarian_match,
    identity_score,
    reference_embeddings,
    uniform_indices,
)


def _unit(*rows) -> np.ndarray:
    a = np.asarray(rows, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_hungarian_picks_the_best_one_to_one_assignment():
    # Greedy would give row 0 column 0 (0.9) and leave row 1 with 0.1; the optimum is 0.8 + 0.85.
    sim = np.array([[0.9, 0.8], [0.85, 0.1]])
    assert sorted(hungarian_match(sim)) == [(0, 1, 0.8), (1, 0, 0.85)]


def test_a_missed_face_counts_zero_and_frames_average():
    refs = _unit([1, 0, 0], [0, 1, 0])
    both = _unit([1, 0, 0], [0, 1, 0])  # both references found exactly
    one = _unit([0, 1, 0])  # reference 0 missed in this frame
    none = np.zeros((0, 3), np.float32)
    assert frame_score(both, refs) == (pytest.approx(2.0), 0)
    assert frame_score(one, refs) == (pytest.approx(1.0), 1)
    result = identity_score([both, one, none], refs)
    # (2 + 1 + 0) / (3 frames x 2 references)
    assert result.score == pytest.approx(0.5)
    assert result.frames_with_miss == 2
    assert result.per_frame == pytest.approx([1.0, 0.5, 0.0])


def test_extra_faces_do_not_add_and_negative_cosines_count_zero():
    refs = _unit([1, 0])
    found = _unit([1, 0], [0.6, 0.8], [-1, 0])  # the best one is used once, the others are ignored
    assert identity_score([found], refs).score == pytest.approx(1.0)
    assert identity_score([_unit([-1, 0.1])], refs).score == 0.0


def test_floor_maps_unrelated_faces_to_zero():
    assert calibrate(0.92, 0.92) == 0.0
    assert calibrate(0.96, 0.92) == pytest.approx(0.5)
    assert calibrate(1.0, 0.92) == pytest.approx(1.0)
    assert calibrate(0.3, 0.0) == pytest.approx(0.3)


def test_uniform_indices():
    assert uniform_indices(10, None) == list(range(10))
    assert uniform_indices(10, 3) == [0, 4, 9] or uniform_indices(10, 3) == [0, 5, 9]
    assert uniform_indices(10, 1) == [5]


# ------------------------------------------------------------------------------------- real weights, real photos
@pytest.fixture(scope="module")
def dlib_models():
    from models.base import ModelSpec
    from models.face_detector import FACE_DETECTORS
    from models.face_embedder import FACE_EMBEDDERS

    pytest.importorskip("dlib")
    return (
        FACE_DETECTORS.get(ModelSpec(backend="dlib", device="cpu")),
        FACE_EMBEDDERS.get(ModelSpec(backend="dlib", device="cpu")),
    )


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from flows.sample_data import make_sample_videos
    from tasks.evaluation.inputs import read_video

    paths = make_sample_videos(tmp_path_factory.mktemp("clips"), seconds=1.0, fps=8)
    return {p.stem: read_video(p)[0] for p in paths}


def _face_crops(detector, frames: np.ndarray) -> list[np.ndarray]:
    """Reference crops as the benchmark has them: faces cut (with a margin) from the clip's middle frame."""
    mid = frames[len(frames) // 2]
    h, w = mid.shape[:2]
    crops = []
    for det in sorted(detector([mid])[0], key=lambda d: d.box.x0):
        x0, y0, x1, y1 = det.box.expand(0.3, w, h).pixel_bounds(w, h)
        crops.append(mid[y0:y1, x0:x1].copy())
    return crops


def _score(detector, embedder, frames, crops, floor=0.92):
    refs, detected = reference_embeddings(detector, embedder, crops)
    assert all(detected)
    picked = [frames[i] for i in uniform_indices(len(frames), 6)]
    return identity_score(embed_faces(embedder, picked, detect_faces(detector, picked)), refs, floor)


def _mask_faces(detector, frames: np.ndarray) -> np.ndarray:
    out = frames.copy()
    for frame, dets in zip(out, detector(list(out))):
        h, w = frame.shape[:2]
        for d in dets:
            x0, y0, x1, y1 = d.box.expand(0.4, w, h).pixel_bounds(w, h)
            frame[y0:y1, x0:x1] = (182, 150, 112)  # the clip's wall colour
    return out


def test_real_clip_scores_high_against_its_own_faces_low_against_others_zero_masked(dlib_models, clips):
    detector, embedder = dlib_models
    two = clips["two_people"]
    own = _face_crops(detector, two)
    assert len(own) == 2
    # Other people: the astronaut and the group photo's faces that are not the two in this clip.
    group = _face_crops(detector, clips["group_pan"])
    own_refs, _ = reference_embeddings(detector, embedder, own)
    group_refs, _ = reference_embeddings(detector, embedder, group)
    strangers = [c for c, e in zip(group, group_refs) if (own_refs @ e).max() < 0.95][:1]
    others = _face_crops(detector, clips["astronaut_zoom"])[:1] + strangers
    assert len(others) == 2

    mine = _score(detector, embedder, two, own)
    theirs = _score(detector, embedder, two, others)
    masked = _score(detector, embedder, _mask_faces(detector, two), own)
    print(f"own {mine.score:.3f}  others {theirs.score:.3f}  masked {masked.score:.3f}")
    assert mine.score > 0.8 and mine.frames_with_miss == 0
    assert theirs.score < 0.2
    assert masked.score < 0.05 and masked.frames_with_miss == masked.frames
    # The raw cosine (the paper's definition, floor 0) keeps the order, with dlib's compressed scale.
    assert (
        _score(detector, embedder, two, own, 0.0).score > _score(detector, embedder, two, others, 0.0).score
    )
