"""Face recognition embeddings: one L2-normalised identity vector per face box, for ArcSim / CurSim.

Backends (registered in `FACE_EMBEDDERS`):

- ``dlib``: dlib's ResNet-29 face recogniser (128-d, 99.38 % on LFW) on dlib's 150 x 150 face chips, aligned with
  dlib's 5-point shape predictor run inside each box. Real weights that ship in ``face-recognition-models``: the
  identity metrics run offline with it. ``spec.weights``: a directory with dlib's ``.dat`` files (default: the
  package's). No test build: the real model is small and always here.
- ``arcface``: an insightface recognition ONNX (the paper's ArcSim model family), default ``buffalo_l``'s
  ``w600k_r50.onnx`` (IR-50 trained on WebFace600K), 512-d, on 112 x 112 chips aligned to the ArcFace 5-point
  template, pixels normalised as ``(x - 127.5) / 127.5``.
- ``glintr100``: the second recogniser, standing in for the paper's CurSim (CurricularFace IR-101, which no pip
  package ships): ``antelopev2``'s ``glintr100.onnx``, an IR-100 trained on Glint360K, same input and output.

For the ONNX backends ``spec.weights`` is an ``.onnx`` file, a model-pack directory, or a pack name under
``options.root`` (default ``~/.insightface``; a missing pack is downloaded there when the network allows). The
test build (``random_init``) exports a tiny random conv net with the real models' ONNX signature (``1 x 3 x 112 x
112 -> 512``, dynamic batch) and runs it through insightface's own `ArcFaceONNX` wrapper and alignment.

Alignment needs five landmarks per face (left eye, right eye, nose tip, left mouth corner, right mouth corner, as
`models.face_detector.FaceDet.landmarks` gives them). Pass the detector's landmarks when it has them; without
them the ONNX backends place the five points with dlib's 68-point shape predictor inside the box.

A box with no pixels inside the image gets a zero row: its cosine with anything is 0, i.e. it counts as a miss.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models.base import ModelLoadError, ModelSpec, Registry, model_info, resolve_device
from models.face_detector import Landmarks, _dlib_five_points, _face_recognition_models_dir, _onnx_providers
from models.image_features import l2_normalise
from models.person_detector import check_images
from models.weights import DEFAULTS
from schemas.records import Box

logger = logging.getLogger(__name__)

FACE_EMBEDDERS = Registry("face embedder")

ONNX_FILES = {"arcface": "w600k_r50.onnx", "glintr100": "glintr100.onnx"}
"""The recognition model inside each backend's default insightface pack."""


def _as_rgb(image) -> np.ndarray:
    if not isinstance(image, np.ndarray):  # PIL
        image = np.asarray(image.convert("RGB"))
    check_images([image])
    return np.ascontiguousarray(image)


class FaceEmbedder:
    """Shared batching: align every face of every image, embed the chips `batch_size` at a time, normalise."""

    dim: int

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.batch_size = spec.batch_size

    def embed(
        self, image: np.ndarray, boxes: Sequence[Box], landmarks: Sequence[Landmarks | None] | None = None
    ) -> np.ndarray:
        """(len(boxes), dim) float32, L2-normalised; zero rows for boxes with nothing inside the image."""
        return self([image], [boxes], None if landmarks is None else [landmarks])[0]

    def __call__(
        self,
        images: Sequence[np.ndarray],
        boxes: Sequence[Sequence[Box]],
        landmarks: Sequence[Sequence[Landmarks | None] | None] | None = None,
    ) -> list[np.ndarray]:
        if len(boxes) != len(images):
            raise ValueError(f"{len(images)} images but {len(boxes)} box lists")
        if landmarks is None:
            landmarks = [None] * len(images)
        if len(landmarks) != len(images):
            raise ValueError(f"{len(images)} images but {len(landmarks)} landmark lists")
        chips: list[np.ndarray] = []
        where: list[tuple[int, int]] = []  # (image, face) of every chip
        for i, (image, image_boxes, image_lms) in enumerate(zip(images, boxes, landmarks)):
            image = _as_rgb(image)
            h, w = image.shape[:2]
            if image_lms is not None and len(image_lms) != len(image_boxes):
                raise ValueError(f"image {i}: {len(image_boxes)} boxes but {len(image_lms)} landmark sets")
            for j, box in enumerate(image_boxes):
                if box.clip(w, h).area <= 0:
                    continue
                chips.append(self._align(image, box, None if image_lms is None else image_lms[j]))
                where.append((i, j))
        out = [np.zeros((len(b), self.dim), np.float32) for b in boxes]
        for start in range(0, len(chips), self.batch_size):
            feats = l2_normalise(self._embed_chips(chips[start : start + self.batch_size]))
            for (i, j), feat in zip(where[start : start + self.batch_size], feats):
                out[i][j] = feat
        return out

    def _align(self, image: np.ndarray, box: Box, landmarks: Landmarks | None) -> np.ndarray:
        raise NotImplementedError

    def _embed_chips(self, chips: list[np.ndarray]) -> np.ndarray:
        raise NotImplementedError


def _dlib_rect(box: Box, w: int, h: int):
    import dlib

    x0, y0, x1, y1 = box.clip(w, h).as_tuple()
    # dlib rectangles are inclusive at the bottom-right; Box ends are exclusive.
    return dlib.rectangle(
        int(round(x0)), int(round(y0)), max(int(round(x1)) - 1, 0), max(int(round(y1)) - 1, 0)
    )


def _dlib_file(models_dir: Path, name: str) -> str:
    path = models_dir / name
    if not path.is_file():
        raise ModelLoadError(f"dlib model file {path} not found")
    return str(path)


# ---------------------------------------------------------------------------------------------------------- dlib
@FACE_EMBEDDERS.register("dlib")
class DlibFaceEmbedder(FaceEmbedder):
    """dlib ResNet face recogniser on 5-point-aligned 150 x 150 chips (128-d).

    Landmarks passed by the caller are not used: dlib's model was trained on chips aligned with its own 5-point
    predictor (eye corners and the base of the nose), so its alignment runs inside every box.
    options: ``num_jitters`` (default 0; n > 0 averages n randomly jittered copies, slower, slightly better),
    ``padding`` (chip margin around the face, default 0.25 as in dlib's examples).
    """

    dim = 128

    def __init__(self, predictor, recogniser, spec: ModelSpec):
        super().__init__(spec)
        self.predictor = predictor
        self.recogniser = recogniser
        self.num_jitters = int(spec.options.get("num_jitters", 0))
        self.padding = float(spec.options.get("padding", 0.25))
        self.info = model_info(spec, default_id="dlib_face_recognition_resnet_model_v1")

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> DlibFaceEmbedder:
        if spec.random_init:
            raise ModelLoadError("backend 'dlib' ships real weights; random_init is not supported")
        unknown = set(spec.options) - {"num_jitters", "padding"}
        if unknown:
            raise ModelLoadError(f"dlib face embedder: unknown options {sorted(unknown)}")
        try:
            import dlib
        except ImportError as e:
            raise ModelLoadError(f"backend 'dlib' needs dlib (pip install dlib-bin): {e}") from e
        models_dir = Path(spec.weights) if spec.weights else _face_recognition_models_dir()
        predictor = dlib.shape_predictor(_dlib_file(models_dir, "shape_predictor_5_face_landmarks.dat"))
        recogniser = dlib.face_recognition_model_v1(
            _dlib_file(models_dir, "dlib_face_recognition_resnet_model_v1.dat")
        )
        return cls(predictor, recogniser, spec)

    def _align(self, image: np.ndarray, box: Box, landmarks: Landmarks | None) -> np.ndarray:
        import dlib

        h, w = image.shape[:2]
        shape = self.predictor(image, _dlib_rect(box, w, h))
        return dlib.get_face_chip(image, shape, size=150, padding=self.padding)

    def _embed_chips(self, chips: list[np.ndarray]) -> np.ndarray:
        return np.array(self.recogniser.compute_face_descriptor(chips, self.num_jitters), np.float32)


# ---------------------------------------------------------------------------------------- insightface ArcFace ONNX
def export_tiny_arcface(path: Path, seed: int = 0, dim: int = 512, width: int = 8) -> Path:
    """Write a tiny random conv net with the insightface recognition models' ONNX signature (test build).

    Input ``input.1`` (N, 3, 112, 112), N dynamic, RGB normalised outside the graph (no Sub/Mul node at the
    start, so insightface's `ArcFaceONNX` picks the (x - 127.5) / 127.5 normalisation, as for w600k_r50 and
    glintr100); one output (N, dim).
    """
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=4, padding=1),  # 28 x 28
            nn.PReLU(width),
            nn.Conv2d(width, 2 * width, 3, stride=4, padding=1),  # 7 x 7
            nn.PReLU(2 * width),
            nn.Flatten(),
            nn.Linear(2 * width * 7 * 7, dim),
        ).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated but needs no onnxscript
        torch.onnx.export(
            net,
            torch.zeros(1, 3, 112, 112),
            str(path),
            input_names=["input.1"],
            output_names=["embedding"],
            dynamic_axes={"input.1": {0: "None"}, "embedding": {0: "None"}},
            dynamo=False,
        )
    return path


def _resolve_onnx(backend: str, spec: ModelSpec) -> Path:
    """The recognition ONNX file a spec names: a file, a pack directory, or a pack name under the root."""
    filename = spec.options.get("file", ONNX_FILES[backend])
    weights = spec.weights or DEFAULTS[backend]
    path = Path(weights).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        candidates = [path / filename, *sorted(path.glob(f"*/{filename}"))]  # some zips nest the pack
        for c in candidates:
            if c.is_file():
                return c
        raise ModelLoadError(f"{backend}: no {filename} in {path}")
    root = Path(spec.options.get("root", "~/.insightface")).expanduser()
    pack = root / "models" / weights
    for c in (pack / filename, *sorted(pack.glob(f"*/{filename}"))):
        if c.is_file():
            return c
    try:
        from insightface.utils import ensure_available

        ensure_available("models", weights, root=str(root))
    except Exception as e:  # network errors, HTTP errors, bad zips: all mean the pack is not available here
        raise ModelLoadError(
            f"cannot load {backend} model {filename} from insightface pack {weights!r} under {root}/models "
            f"({type(e).__name__}: {e}); pass the .onnx file or the pack directory as weights on machines "
            "without internet access"
        ) from e
    for c in (pack / filename, *sorted(pack.glob(f"*/{filename}"))):
        if c.is_file():
            return c
    raise ModelLoadError(f"{backend}: insightface pack {weights!r} has no {filename}")


class InsightFaceEmbedder(FaceEmbedder):
    """An insightface recognition ONNX (ArcFace loss family) on 112 x 112 ArcFace-template chips.

    options: ``root`` (model-pack root, default ``~/.insightface``), ``file`` (the ONNX inside a pack, default
    the backend's), ``seed`` (test build).
    """

    backend: str

    def __init__(self, model, spec: ModelSpec, tmpdir: tempfile.TemporaryDirectory | None = None):
        super().__init__(spec)
        self.model = model
        self.dim = int(model.output_shape[-1])
        self.chip_size = int(model.input_size[0])
        self._tmpdir = tmpdir  # keeps the test build's ONNX file alive as long as the adapter
        self._landmarker = None
        self.info = model_info(spec, default_id=f"{DEFAULTS[self.backend]}/{ONNX_FILES[self.backend]}")

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> InsightFaceEmbedder:
        import onnxruntime
        from insightface.model_zoo.arcface_onnx import ArcFaceONNX

        unknown = set(spec.options) - {"root", "file", "seed"}
        if unknown:
            raise ModelLoadError(f"{cls.backend} face embedder: unknown options {sorted(unknown)}")
        providers, _ = _onnx_providers(resolve_device(spec.device), explicit=spec.device != "auto")
        tmpdir = None
        if spec.random_init:
            tmpdir = tempfile.TemporaryDirectory(prefix=f"tiny-{cls.backend}-")
            path = export_tiny_arcface(
                Path(tmpdir.name) / "rec_tiny.onnx", seed=int(spec.options.get("seed", 0))
            )
        else:
            path = _resolve_onnx(cls.backend, spec)
        try:
            session = onnxruntime.InferenceSession(str(path), providers=providers)
        except Exception as e:  # onnxruntime raises its own types for bad files
            raise ModelLoadError(f"cannot load {cls.backend} recognition model {path}: {e}") from e
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or inputs[0].shape[1:] != [3, 112, 112] or [len(o.shape) for o in outputs] != [2]:
            raise ModelLoadError(
                f"{path} is not a face recognition model (expected one input N x 3 x 112 x 112 and one output "
                f"N x D): inputs {[i.shape for i in inputs]}, outputs {[o.shape for o in outputs]}"
            )
        return cls(ArcFaceONNX(model_file=str(path), session=session), spec, tmpdir)

    def _landmarks_from_dlib(self, image: np.ndarray, box: Box) -> Landmarks:
        if self._landmarker is None:
            try:
                import dlib
            except ImportError as e:
                raise ModelLoadError(
                    f"{self.backend}: faces without landmarks need dlib's shape predictor (pip install dlib-bin), "
                    "or pass the face detector's landmarks"
                ) from e
            models_dir = _face_recognition_models_dir()
            self._landmarker = dlib.shape_predictor(
                _dlib_file(models_dir, "shape_predictor_68_face_landmarks.dat")
            )
        h, w = image.shape[:2]
        return _dlib_five_points(self._landmarker(image, _dlib_rect(box, w, h)))

    def _align(self, image: np.ndarray, box: Box, landmarks: Landmarks | None) -> np.ndarray:
        from insightface.utils.face_align import norm_crop

        if landmarks is None:
            landmarks = self._landmarks_from_dlib(image, box)
        points = np.asarray(landmarks, np.float32).reshape(5, 2)
        with warnings.catch_warnings():
            # insightface fits the similarity transform with skimage's `estimate`, deprecated in skimage 0.26.
            warnings.simplefilter("ignore", FutureWarning)
            return norm_crop(image, points, image_size=self.chip_size)  # least-squares fit to arcface_dst

    def _embed_chips(self, chips: list[np.ndarray]) -> np.ndarray:
        # Chips are RGB, the channel order the models were trained on; `forward` normalises with the model's
        # mean / std (insightface's `get_feat` would swap channels, as it expects OpenCV BGR images).
        batch = np.stack(chips).astype(np.float32).transpose(0, 3, 1, 2)
        return self.model.forward(batch)


@FACE_EMBEDDERS.register("arcface")
class ArcFaceEmbedder(InsightFaceEmbedder):
    backend = "arcface"


@FACE_EMBEDDERS.register("glintr100")
class Glint100Embedder(InsightFaceEmbedder):
    backend = "glintr100"
