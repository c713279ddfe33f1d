"""Person detector adapters: OpenCV HOG with its real weights, and YOLO's test build through ultralytics' code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


# Sizes (width, height) on which OpenCV's raw HOGDescriptor.detectMultiScale aborts or segfaults the process
# (its full-size pyramid level is smaller than the 64 x 128 window), both ways round, and the window size itself.
SMALL_FRAMES = [(20, 14), (64, 64), (96, 96), (64, 128), (160, 90), (320, 48), (1, 1), (47, 200), (128, 64)]
SMALL_FRAMES += [(h, w) for w, h in SMALL_FRAMES if (h, w) not in SMALL_FRAMES]

_RUN_ON_SMALL_FRAMES = """
import json, sys
import numpy as np
from models.base import ModelSpec
from models.person_detector import PERSON_DETECTORS
sizes, options = json.loads(sys.argv[1]), json.loads(sys.argv[2])
det = PERSON_DETECTORS.build(ModelSpec(backend="opencv-hog", device="cpu", options=options))
rng = np.random.default_rng(0)
out = []
for w, h in sizes:
    # Noise, a flat grey and a bright figure on dark: nothing for HOG, and strong gradients at every scale.
    figure = np.zeros((h, w, 3), np.uint8)
    figure[h // 4 : max(h // 4 + 1, 3 * h // 4), w // 3 : max(w // 3 + 1, 2 * w // 3)] = 255
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8), np.full((h, w, 3), 128, np.uint8), figure]
    dets = det(images)
    out.append([[[d.box.x0, d.box.y0, d.box.x1, d.box.y1, d.score] for d in per_image] for per_image in dets])
print(json.dumps(out))
"""


@pytest.mark.parametrize("options", [{}, {"padding": 0, "win_stride": 4}, {"max_side": 60}])
def test_hog_on_frames_smaller_than_its_window_does_not_crash_the_process(options):
    """Raw OpenCV aborts (malloc: invalid size) or segfaults on these sizes; the adapter pads them to the window.

    Run in a child process: were the guard gone, the crash would take pytest down with it.
    """
    proc = subprocess.run(
        [sys.executable, "-c", _RUN_ON_SMALL_FRAMES, json.dumps(SMALL_FRAMES), json.dumps(options)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(SMALL_FRAMES)
    for (w, h), per_size in zip(SMALL_FRAMES, results):
        assert len(per_size) == 3  # one list of detections per image
        for dets in per_size:
            assert isinstance(dets, list)
            for x0, y0, x1, y1, score in dets:  # boxes stay inside the original (unpadded) image
                assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and 0.0 <= score <= 1.0
