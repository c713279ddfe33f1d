"""Person detector adapters: OpenCV HOG with its real weights, and YOLO's test build through ultralytics' code."""

from __future__ import annotations

import numpy as np
import pytest
from keyframe_media import astronaut_frames, group_pan_frames

from models.base import ModelLoadError, ModelSpec
from models.person_detector import PERSON_DETECTORS, PersonDet
from schemas.records import Box


def _check(dets: list[list[PersonDet]], images: list[np.ndarray]) -> None:
    assert len(dets) == len(images)
    for per_image, img in zip(dets, images):
        h, w = img.shape[:2]
        for d in per_image:
            assert isinstance(d, PersonDet) and isinstance(d.box, Box)
            assert 0.0 <= d.score <= 1.0
            assert 0 <= d.box.x0 < d.box.x1 <= w and 0 <= d.box.y0 < d.box.y1 <= h


def test_hog_finds_people_in_the_group_photo():
    det = PERSON_DETECTORS.build(ModelSpec(backend="opencv-hog", device="cpu"))
    images = group_pan_frames()[:1]
    dets = det(images)
    _check(dets, images)
    # HOG sees upright bodies only: of the six people at the table it finds the two standing at the sides.
    assert len(dets[0]) >= 2, "HOG found nobody in the group photo"
    best = dets[0][0]
    assert best.score > 0.5  # positive SVM margin
    assert best.box.height > 0.2 * images[0].shape[0]
    assert not det.info.random_weights


def test_hog_scores_are_sorted_and_nms_removes_duplicates():
    det = PERSON_DETECTORS.build(ModelSpec(backend="opencv-hog", device="cpu", options={"nms_iou": 0.3}))
    (dets,) = det(group_pan_frames()[1:2])
    assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
    for i, a in enumerate(dets):
        for b in dets[i + 1 :]:
            assert a.box.iou(b.box) <= 0.3 + 1e-6


def test_yolo_test_build_runs_ultralytics_predict_on_cpu():
    spec = ModelSpec(
        backend="yolo", random_init=True, device="cpu", batch_size=2, options={"imgsz": 160, "conf": 0.0}
    )
    det = PERSON_DETECTORS.build(spec)
    assert det.info.random_weights
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (120, 200, 3), dtype=np.uint8) for _ in range(3)] + astronaut_frames()[:1]
    dets = det(images)
    _check(dets, images)
    assert sum(len(d) for d in dets) > 0  # conf=0: random weights still give boxes, mapped into each image


def test_bad_input_and_bad_specs_fail_clearly(tmp_path):
    det = PERSON_DETECTORS.build(ModelSpec(backend="opencv-hog"))
    with pytest.raises(ValueError, match="RGB uint8"):
        det([np.zeros((10, 10), np.uint8)])
    with pytest.raises(ModelLoadError, match="unknown person detector backend"):
        PERSON_DETECTORS.build(ModelSpec(backend="nope"))
    with pytest.raises(ModelLoadError, match="random_init"):
        PERSON_DETECTORS.build(ModelSpec(backend="opencv-hog", random_init=True))
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot load YOLO weights"):
        PERSON_DETECTORS.build(ModelSpec(backend="yolo", weights=str(broken)))


def test_building_yolo_leaves_pil_image_open_alone(tmp_path):
    """ultralytics patches PIL.Image.open to pip-install pi-heif on unknown images; the adapter undoes it."""
    from PIL import Image, UnidentifiedImageError

    from models.base import ModelSpec
    from models.person_detector import PERSON_DETECTORS

    PERSON_DETECTORS.build(ModelSpec(backend="yolo", random_init=True, device="cpu"))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(UnidentifiedImageError):
        Image.open(bad)
