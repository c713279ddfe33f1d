"""Face embedders: dlib's real ResNet recogniser on real faces; the ArcFace / glintr100 ONNX path via test builds."""

from __future__ import annotations

import cv2
import numpy as np
import onnxruntime
import pytest

from flows.sample_data import astronaut_photo, group_photo
from models.base import ModelLoadError, ModelSpec
from models.face_detector import FACE_DETECTORS, export_tiny_scrfd
from models.face_embedder import FACE_EMBEDDERS, export_tiny_arcface
from schemas.records import Box

# A second view of the group photo: cropped and downscaled, as a generated frame shows a face at another scale.
CROP = (50, 100, 1230, 800)  # x0, y0, x1, y1
SCALE = 0.6


@pytest.fixture(scope="module")
def photos():
    g = np.asarray(group_photo())
    x0, y0, x1, y1 = CROP
    g2 = cv2.resize(g[y0:y1, x0:x1], None, fx=SCALE, fy=SCALE, interpolation=cv2.INTER_AREA)
    a = np.asarray(astronaut_photo())
    a2 = cv2.resize(a[20:300, 100:400], None, fx=1.5, fy=1.5, interpolation=cv2.INTER_CUBIC)
    return g, g2, a, a2


@pytest.fixture(scope="module")
def faces(photos):
    """dlib HOG faces of each photo (margin >= 0)."""
    det = FACE_DETECTORS.build(ModelSpec(backend="dlib", device="cpu"))
    return det(list(photos))


@pytest.fixture(scope="module")
def dlib_embedder():
    return FACE_EMBEDDERS.build(ModelSpec(backend="dlib", device="cpu", batch_size=4))


def _same_person_pairs(faces_a, faces_b) -> list[tuple[int, int]]:
    """(i, j): face j of the second group view is face i of the photo (centres map through crop + scale)."""
    pairs = []
    for j, f in enumerate(faces_b):
        cx, cy = f.box.center
        x, y = cx / SCALE + CROP[0], cy / SCALE + CROP[1]
        dist = [np.hypot(x - g.box.center[0], y - g.box.center[1]) for g in faces_a]
        i = int(np.argmin(dist))
        assert dist[i] < 0.3 * faces_a[i].box.width, "the second view's face lies on no face of the photo"
        pairs.append((i, j))
    return pairs


def test_dlib_same_face_at_two_scales_beats_other_people(photos, faces, dlib_embedder):
    g, g2, a, a2 = photos
    assert len(faces[0]) == 6 and len(faces[1]) >= 4 and len(faces[2]) >= 1 and len(faces[3]) >= 1
    emb = dlib_embedder(list(photos), [[f.box for f in fs] for fs in faces])
    assert [e.shape for e in emb] == [(len(fs), 128) for fs in faces]
    for e in emb:
        assert e.dtype == np.float32 and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    sim = emb[0] @ emb[1].T  # photo faces x second-view faces
    pairs = _same_person_pairs(faces[0], faces[1])
    same = np.array([sim[i, j] for i, j in pairs])
    mask = np.ones_like(sim, bool)
    for i, j in pairs:
        mask[i, j] = False
    other = sim[mask]
    # Measured: same person 0.996-0.998, different people 0.80-0.91 (dlib's own same-person cut-off, Euclidean
    # distance 0.6 on unit vectors, is cosine 0.82: this model's scale is compressed near 1).
    assert same.min() > 0.98, same
    assert other.max() < 0.94, other
    assert same.min() - other.max() > 0.05
    # Every second-view face finds its own person among the six (what Hungarian matching relies on).
    for i, j in pairs:
        assert int(np.argmax(sim[:, j])) == i

    # The astronaut: her face in a re-framed, upscaled crop against the same face, and against the group's.
    # HOG also fires on a small patch of the astronaut photo: her face is the largest box.
    a1, a2 = (max(range(len(fs)), key=lambda k: fs[k].box.area) for fs in faces[2:])
    self_sim = float(emb[2][a1] @ emb[3][a2])
    vs_group = float((emb[3][a2] @ emb[0].T).max())
    assert self_sim > 0.98 and vs_group < 0.94 and self_sim - vs_group > 0.05, (self_sim, vs_group)


def test_dlib_batching_and_edge_boxes(photos, faces, dlib_embedder):
    g = photos[0]
    boxes = [f.box for f in faces[0]]
    one_by_one = FACE_EMBEDDERS.build(ModelSpec(backend="dlib", device="cpu", batch_size=1))
    a = dlib_embedder.embed(g, boxes)
    b = one_by_one.embed(g, boxes)
    np.testing.assert_allclose(a, b, atol=1e-5)
    # A box outside the image gets a zero row (cosine 0: a miss), not an error; no boxes -> (0, D).
    outside = Box(x0=2000, y0=0, x1=2100, y1=80)
    mixed, empty = dlib_embedder([g, g], [[boxes[0], outside], []])
    np.testing.assert_allclose(mixed[0], a[0], atol=1e-5)
    assert not mixed[1].any() and empty.shape == (0, 128)
    # PIL images are accepted.
    np.testing.assert_allclose(dlib_embedder.embed(group_photo(), boxes[:1]), a[:1], atol=1e-5)
    with pytest.raises(ValueError, match="box lists"):
        dlib_embedder([g, g], [boxes])


def test_tiny_recogniser_has_the_insightface_signature(tmp_path):
    path = export_tiny_arcface(tmp_path / "rec.onnx")
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert inp.shape[1:] == [3, 112, 112] and out.shape[1:] == [512]
    (feat,) = sess.run(None, {inp.name: np.zeros((3, 3, 112, 112), np.float32)})
    assert feat.shape == (3, 512)


@pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")
@pytest.mark.parametrize("backend", ["arcface", "glintr100"])
def test_onnx_recognisers_run_insightface_code_path(backend, photos, faces):
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.utils.face_align import arcface_dst, estimate_norm

    emb = FACE_EMBEDDERS.build(ModelSpec(backend=backend, random_init=True, device="cpu", batch_size=4))
    assert emb.info.random_weights and emb.dim == 512
    assert isinstance(emb.model, ArcFaceONNX)
    assert (emb.model.input_mean, emb.model.input_std) == (127.5, 127.5)  # as w600k_r50 / glintr100
    g = photos[0]
    boxes = [f.box for f in faces[0]]
    given = emb.embed(g, boxes, [f.landmarks for f in faces[0]])
    assert given.shape == (6, 512) and np.allclose(np.linalg.norm(given, axis=1), 1, atol=1e-5)
    # Without landmarks, dlib's 68-point predictor places them: the detector here is dlib, so the same points.
    np.testing.assert_allclose(emb.embed(g, boxes), given, atol=1e-4)
    # Batched over images and chunks = one image at a time.
    both = emb([g, photos[1]], [boxes, [f.box for f in faces[1]]])
    np.testing.assert_allclose(both[0], given, atol=1e-4)
    # The chip puts the five landmarks on the ArcFace template (a similarity transform cannot undo head pose:
    # residuals measured up to 6 px on these faces, mean 3 px).
    pts = np.asarray(faces[0][0].landmarks, np.float32)
    m = estimate_norm(pts, 112)
    mapped = pts @ m[:, :2].T + m[:, 2]
    assert np.abs(mapped - arcface_dst).max() < 8.0
    assert emb._align(g, boxes[0], faces[0][0].landmarks).shape == (112, 112, 3)


def test_bad_specs_fail_clearly(tmp_path):
    with pytest.raises(ModelLoadError, match="random_init"):
        FACE_EMBEDDERS.build(ModelSpec(backend="dlib", random_init=True))
    with pytest.raises(ModelLoadError, match="not found"):
        FACE_EMBEDDERS.build(ModelSpec(backend="dlib", weights=str(tmp_path)))
    with pytest.raises(ModelLoadError, match="no w600k_r50.onnx"):
        FACE_EMBEDDERS.build(ModelSpec(backend="arcface", weights=str(tmp_path), device="cpu"))
    with pytest.raises(ModelLoadError, match="unknown options"):
        FACE_EMBEDDERS.build(ModelSpec(backend="glintr100", options={"det_size": 3}))
    # A detector ONNX given as a recogniser is refused with what it is.
    scrfd = export_tiny_scrfd(tmp_path / "det.onnx")
    with pytest.raises(ModelLoadError, match="not a face recognition model"):
        FACE_EMBEDDERS.build(ModelSpec(backend="arcface", weights=str(scrfd), device="cpu"))
    with pytest.raises(ModelLoadError, match="unknown face embedder backend"):
        FACE_EMBEDDERS.build(ModelSpec(backend="curricularface"))
