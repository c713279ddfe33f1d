"""Face detector adapters: dlib and MTCNN with their real packaged weights, insightface's SCRFD via a test build."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from keyframe_media import astronaut_frames, group_pan_frames

from models.base import ModelLoadError, ModelSpec
from models.face_detector import FACE_DETECTORS, FaceDet, export_tiny_scrfd
from schemas.records import Box


@pytest.fixture(scope="module")
def dlib_detector():
    return FACE_DETECTORS.build(ModelSpec(backend="dlib", device="cpu"))


@pytest.fixture(scope="module")
def mtcnn_detector():
    return FACE_DETECTORS.build(ModelSpec(backend="mtcnn", device="cpu"))


def _check(dets: list[list[FaceDet]], images: list[np.ndarray], landmarks: bool = True) -> None:
    assert len(dets) == len(images)
    for per_image, img in zip(dets, images):
        h, w = img.shape[:2]
        for d in per_image:
            assert isinstance(d, FaceDet) and isinstance(d.box, Box)
            assert 0.0 <= d.score <= 1.0
            assert 0 <= d.box.x0 < d.box.x1 <= w and 0 <= d.box.y0 < d.box.y1 <= h
            if landmarks:
                assert d.landmarks is not None and len(d.landmarks) == 5
                assert all(isinstance(v, float) for p in d.landmarks for v in p)


def _eyes_above_mouth_inside_box(d: FaceDet) -> None:
    le, re, nose, ml, mr = d.landmarks
    assert le[0] < re[0] and ml[0] < mr[0]  # image-left first
    assert max(le[1], re[1]) < nose[1] < max(ml[1], mr[1]) + 1
    for x, y in d.landmarks:
        assert d.box.x0 - 5 <= x <= d.box.x1 + 5 and d.box.y0 - 5 <= y <= d.box.y1 + 5


@pytest.mark.parametrize("backend,min_score", [("dlib", 0.6), ("mtcnn", 0.95)])
def test_real_detectors_find_the_group_photo_faces(backend, min_score, dlib_detector, mtcnn_detector):
    det = {"dlib": dlib_detector, "mtcnn": mtcnn_detector}[backend]
    images = group_pan_frames()[:1]
    dets = det(images)
    _check(dets, images)
    faces = [d for d in dets[0] if d.score >= min_score]
    assert len(faces) >= 5, [(d.box, d.score) for d in dets[0]]
    for d in faces:
        _eyes_above_mouth_inside_box(d)


def test_real_detectors_find_one_face_on_the_astronaut(dlib_detector, mtcnn_detector):
    images = astronaut_frames()
    for det, min_score in ((dlib_detector, 0.6), (mtcnn_detector, 0.95)):
        dets = det(images)
        _check(dets, images)
        for per_image in dets:
            assert len([d for d in per_image if d.score >= min_score]) == 1


def test_mtcnn_batches_images_of_different_sizes(mtcnn_detector):
    a = astronaut_frames()[0]
    images = [a, a[:200, :240].copy(), a]
    dets = mtcnn_detector(images)
    _check(dets, images)
    assert [len(d) for d in dets][0] == len(dets[2])


def test_tiny_scrfd_has_scrfd_signature(tmp_path):
    path = export_tiny_scrfd(tmp_path / "det.onnx")
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"input.1": np.zeros((1, 3, 96, 160), np.float32)})
    assert len(outs) == 9
    for i, stride in enumerate((8, 16, 32)):
        n = (96 // stride) * (160 // stride) * 2
        assert outs[i].shape == (n, 1) and outs[i + 3].shape == (n, 4) and outs[i + 6].shape == (n, 10)
        assert ((outs[i] >= 0) & (outs[i] <= 1)).all()


def test_insightface_test_build_runs_scrfd_code_path():
    spec = ModelSpec(backend="insightface", random_init=True, device="cpu", options={"det_size": [128, 128]})
    det = FACE_DETECTORS.build(spec)
    assert det.info.random_weights
    from insightface.model_zoo.scrfd import SCRFD

    assert isinstance(det.det_model, SCRFD) and det.det_model.use_kps and det.det_model.fmc == 3
    images = [astronaut_frames()[0], np.zeros((50, 70, 3), np.uint8)]
    dets = det(images)
    _check(dets, images)


def test_bad_specs_fail_clearly(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load insightface model pack"):
        FACE_DETECTORS.build(ModelSpec(backend="insightface", weights=str(tmp_path), device="cpu"))
    with pytest.raises(ModelLoadError, match="random_init"):
        FACE_DETECTORS.build(ModelSpec(backend="dlib", random_init=True))
    with pytest.raises(ModelLoadError, match="not found"):
        FACE_DETECTORS.build(ModelSpec(backend="dlib", weights=str(tmp_path)))
    with pytest.raises(ModelLoadError, match="'hog' or 'cnn'"):
        FACE_DETECTORS.build(ModelSpec(backend="dlib", options={"detector": "sift"}))


# Crops (width, height) as small as the faces stage may cut from a person box at a frame's edge.
TINY_CROPS = [(1, 1), (3, 5), (5, 3), (8, 8), (20, 14), (14, 20), (9, 200), (200, 6), (0, 5)]

_RUN_ON_TINY_CROPS = """
import json, sys
import numpy as np
from models.base import ModelSpec
from models.face_detector import FACE_DETECTORS
backend, options, sizes = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
det = FACE_DETECTORS.build(ModelSpec(backend=backend, device="cpu", options=options))
rng = np.random.default_rng(0)
out = []
for w, h in sizes:
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8), np.full((h, w, 3), 128, np.uint8)]
    dets = det(images)
    out.append([[[d.box.x0, d.box.y0, d.box.x1, d.box.y1, d.score] for d in per_image] for per_image in dets])
print(json.dumps(out))
"""


@pytest.mark.parametrize(
    "backend,options",
    [
        ("dlib", {}),
        # dlib's MMOD net segfaults, aborts or raises on images under ~10 x 7 px: the adapter pads them.
        ("dlib", {"detector": "cnn", "upsample": 0}),
        ("dlib", {"detector": "cnn", "upsample": 1}),
        # facenet-pytorch's MTCNN raises (torch.cat of no pyramid level) on a side under min_face_size.
        ("mtcnn", {}),
        ("mtcnn", {"min_face_size": 40}),
    ],
)
def test_tiny_crops_give_no_faces_instead_of_crashing(backend, options):
    """Run in a child process: a segfault in native code would otherwise take pytest down with it."""
    proc = subprocess.run(
        [sys.executable, "-c", _RUN_ON_TINY_CROPS, backend, json.dumps(options), json.dumps(TINY_CROPS)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(TINY_CROPS)
    for (w, h), per_size in zip(TINY_CROPS, results):
        assert len(per_size) == 2  # one list of detections per image
        for dets in per_size:
            assert isinstance(dets, list)
            for x0, y0, x1, y1, score in dets:
                assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and 0.0 <= score <= 1.0


def test_mtcnn_mixes_tiny_and_normal_images_in_one_call(mtcnn_detector):
    a = astronaut_frames()[0]
    images = [a, np.zeros((8, 8, 3), np.uint8), a[:19, :300].copy(), a]
    dets = mtcnn_detector(images)
    _check(dets, images)
    assert dets[1] == [] and dets[2] == []
    assert len([d for d in dets[0] if d.score >= 0.95]) == 1 and len(dets[3]) == len(dets[0])
