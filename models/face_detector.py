"""Face detectors: faces with a 0..1 score and, where the model gives them, five landmarks.

Backends (registered in `FACE_DETECTORS`):

- ``insightface``: SCRFD, the detection model of an insightface model pack (the design card's choice).
  ``spec.weights`` is a pack name under ``options.root`` (default ``~/.insightface``; insightface downloads a
  missing pack there, e.g. ``buffalo_l``) or a local directory holding the pack's ONNX files. The test build
  (``random_init``) exports a tiny random conv net with SCRFD's exact output signature to ONNX and loads it through
  insightface's own `FaceAnalysis`/`SCRFD` code.
- ``dlib``: dlib's HOG + linear SVM frontal face detector (default) or its CNN (MMOD) detector, with the
  68-point shape predictor reduced to five points; the weights ship in ``face-recognition-models``.
- ``mtcnn``: facenet-pytorch's MTCNN, whose weights ship inside the package; gives probabilities and five points.

Every adapter takes a list of RGB ``uint8`` images (H x W x 3) and returns, per image, `FaceDet`s in that image's
pixel coordinates. Landmarks are always in the order (left eye, right eye, nose tip, left mouth corner, right mouth
corner), "left" meaning the image's left, as insightface and MTCNN give them.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import expit

from models.base import ModelLoadError, ModelSpec, Registry, model_info, resolve_device
from models.person_detector import box_in_image, check_images, pad_bottom_right
from models.weights import DEFAULTS
from schemas.records import Box

logger = logging.getLogger(__name__)

FACE_DETECTORS = Registry("face detector")

Landmarks = list[tuple[float, float]]


@dataclass(frozen=True)
class FaceDet:
    box: Box
    score: float
    landmarks: Landmarks | None = None


def _landmarks(points: np.ndarray | None) -> Landmarks | None:
    if points is None:
        return None
    return [(float(x), float(y)) for x, y in np.asarray(points, dtype=np.float64).reshape(-1, 2)]


# ---------------------------------------------------------------------------------------------------- insightface
def _onnx_providers(device: str, explicit: bool) -> tuple[list, int]:
    """onnxruntime providers and insightface's ctx_id (-1 = CPU) for a torch-style device string."""
    import onnxruntime

    if device.startswith("cuda"):
        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            index = int(device.split(":")[1]) if ":" in device else 0
            return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"], index
        if explicit:
            raise ModelLoadError(
                f"device {device!r} requested but this onnxruntime has no CUDA provider: install onnxruntime-gpu"
            )
        logger.warning("onnxruntime has no CUDA provider; insightface runs on the CPU")
    return ["CPUExecutionProvider"], -1


def export_tiny_scrfd(path: Path, seed: int = 0, width: int = 8) -> Path:
    """Write a tiny random-weight network with SCRFD's ONNX signature (test build).

    Input ``input.1`` (1, 3, H, W), H and W dynamic and multiples of 32. Nine outputs, as in insightface's
    ``*_kps`` SCRFD models: scores (N_s, 1), box distances (N_s, 4) and keypoint offsets (N_s, 10) for the strides
    8, 16 and 32, with N_s = (H/s) * (W/s) * 2 anchors, anchor-minor, row-major over the feature map.
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class TinySCRFD(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=8, padding=1), nn.ReLU())
            self.down = nn.ModuleList(
                [nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU()) for _ in range(2)]
            )
            self.heads = nn.ModuleList([nn.Conv2d(width, 2 * (1 + 4 + 10), 1) for _ in range(3)])

        def forward(self, x):
            feats = [self.stem(x)]
            for down in self.down:
                feats.append(down(feats[-1]))
            scores, boxes, kps = [], [], []
            for feat, head in zip(feats, self.heads):
                out = head(feat)  # (1, 2 anchors * 15, h, w)
                s, b, k = torch.split(out, [2, 8, 20], dim=1)
                flat = lambda t, c: t.permute(0, 2, 3, 1).reshape(-1, c)  # noqa: E731 - (h, w, anchor) order
                scores.append(torch.sigmoid(flat(s, 1)))
                boxes.append(flat(b, 4))
                kps.append(flat(k, 10))
            return (*scores, *boxes, *kps)

    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in (8, 16, 32)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated but needs no onnxscript
        torch.onnx.export(
            TinySCRFD().eval(),
            torch.zeros(1, 3, 64, 64),
            str(path),
            input_names=["input.1"],
            output_names=names,
            dynamic_axes={"input.1": {2: "height", 3: "width"}, **{n: {0: f"n_{n}"} for n in names}},
            dynamo=False,
        )
    return path


@FACE_DETECTORS.register("insightface")
class InsightFaceDetector:
    """SCRFD through insightface's `FaceAnalysis` (detection module only).

    options: ``root`` (model-pack root, default ``~/.insightface``), ``det_size`` (detector input, default
    [640, 640]; images are letterboxed into it), ``det_thresh`` (pre-filter score, default 0.3; the stage applies
    its own ``min_score``), ``nms_thresh`` (default 0.4).
    """

    def __init__(self, app, spec: ModelSpec, tmpdir: tempfile.TemporaryDirectory | None = None):
        self.app = app
        self.det_model = app.det_model
        self.spec = spec
        self._tmpdir = tmpdir  # keeps the test build's ONNX file alive as long as the adapter
        self.info = model_info(spec, default_id=DEFAULTS["insightface"])

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> InsightFaceDetector:
        from insightface.app import FaceAnalysis

        opts = spec.options
        providers, ctx_id = _onnx_providers(resolve_device(spec.device), explicit=spec.device != "auto")
        tmpdir = None
        if spec.random_init:
            tmpdir = tempfile.TemporaryDirectory(prefix="tiny-scrfd-")
            export_tiny_scrfd(Path(tmpdir.name) / "det_tiny.onnx", seed=int(opts.get("seed", 0)))
            name = tmpdir.name
        else:
            name = spec.weights or DEFAULTS["insightface"]
        try:
            app = FaceAnalysis(
                name=name,
                root=opts.get("root", "~/.insightface"),
                allowed_modules=["detection"],
                providers=providers,
            )
            det_size = tuple(int(v) for v in opts.get("det_size", (640, 640)))
            app.prepare(ctx_id=ctx_id, det_thresh=float(opts.get("det_thresh", 0.3)), det_size=det_size)
        except Exception as e:  # insightface raises AssertionError/RuntimeError/OSError for missing packs
            raise ModelLoadError(
                f"cannot load insightface model pack {name!r} ({type(e).__name__}: {e}); pass a local directory "
                "holding the pack's ONNX files as weights on machines without internet access"
            ) from e
        if "nms_thresh" in opts:
            app.det_model.nms_thresh = float(opts["nms_thresh"])
        return cls(app, spec, tmpdir)

    def __call__(self, images: list[np.ndarray]) -> list[list[FaceDet]]:
        check_images(images)
        out = []
        for img in images:
            h, w = img.shape[:2]
            # SCRFD's preprocessing swaps channels (it expects OpenCV BGR input).
            bboxes, kpss = self.det_model.detect(np.ascontiguousarray(img[:, :, ::-1]))
            dets = []
            for i, (x0, y0, x1, y1, score) in enumerate(bboxes):
                box = box_in_image(x0, y0, x1, y1, w, h)
                if box is not None:
                    kps = kpss[i] if kpss is not None else None
                    dets.append(FaceDet(box, float(score), _landmarks(kps)))
            out.append(dets)
        return out


# ---------------------------------------------------------------------------------------------------------- dlib
def _face_recognition_models_dir() -> Path:
    # The package's own helper imports pkg_resources (gone from recent setuptools): locate its files directly.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "backend 'dlib' needs the package face-recognition-models (pip install .[offline])"
        )
    return Path(spec.origin).parent / "models"


def _dlib_five_points(shape) -> Landmarks:
    """68-point iBUG landmarks -> (left eye, right eye, nose tip, left mouth corner, right mouth corner)."""
    pts = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
    five = [pts[36:42].mean(0), pts[42:48].mean(0), pts[30], pts[48], pts[54]]
    return [(float(x), float(y)) for x, y in five]


CNN_MIN_SIDE = 32
"""Images for dlib's MMOD face net are padded to at least this size (it crashes below about 10 x 7 px)."""


@FACE_DETECTORS.register("dlib")
class DlibFaceDetector:
    """dlib face detector + 68-point shape predictor (reduced to five points).

    Score: the detector's SVM / MMOD margin ``m`` mapped to 0..1 by the logistic function, ``1 / (1 + exp(-m))``
    (0.5 on the decision boundary; monotone, not calibrated). ``spec.weights``: a directory with dlib's ``.dat``
    files (default: the ones inside face-recognition-models).

    options: ``detector`` (``hog``, default, ~0.4 s per 1280 x 886 image on one core; or ``cnn``, the MMOD net,
    more robust to pose but ~40 s per such image on a CPU), ``upsample`` (pyramid up-steps, default 1: finds
    faces down to ~40 px), ``adjust_threshold`` (margin cut-off, default 0.0), ``landmarks`` (default True).
    """

    def __init__(self, detector, kind: str, predictor, spec: ModelSpec):
        self.detector = detector
        self.kind = kind
        self.predictor = predictor
        self.upsample = int(spec.options.get("upsample", 1))
        self.adjust_threshold = float(spec.options.get("adjust_threshold", 0.0))
        self.info = model_info(spec, default_id=f"dlib-{kind}")

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> DlibFaceDetector:
        if spec.random_init:
            raise ModelLoadError("backend 'dlib' ships real weights; random_init is not supported")
        try:
            import dlib
        except ImportError as e:
            raise ModelLoadError(f"backend 'dlib' needs dlib (pip install dlib-bin): {e}") from e
        models_dir = Path(spec.weights) if spec.weights else _face_recognition_models_dir()
        kind = spec.options.get("detector", "hog")

        def dat(name: str) -> str:
            path = models_dir / name
            if not path.is_file():
                raise ModelLoadError(f"dlib model file {path} not found")
            return str(path)

        if kind == "hog":
            detector = dlib.get_frontal_face_detector()
        elif kind == "cnn":
            detector = dlib.cnn_face_detection_model_v1(dat("mmod_human_face_detector.dat"))
        else:
            raise ModelLoadError(f"dlib detector must be 'hog' or 'cnn', got {kind!r}")
        predictor = dlib.shape_predictor(dat("shape_predictor_68_face_landmarks.dat"))
        if not spec.options.get("landmarks", True):
            predictor = None
        return cls(detector, kind, predictor, spec)

    def _detect(self, img: np.ndarray) -> list[FaceDet]:
        h, w = img.shape[:2]
        if h == 0 or w == 0:
            return []
        if self.kind == "hog":
            rects, margins, _ = self.detector.run(img, self.upsample, self.adjust_threshold)
        else:
            # The MMOD net tiles its image pyramid into one image; when that is smaller than its filters, dlib
            # raises, or reads out of bounds and segfaults / aborts the process (seen on images 9 px wide or less,
            # or 6 px high or less, at upsample 0: 1x1, 3x5, 8x8, 8x16, 6x200, 200x6, 20x6). Tiny crops are grown
            # at the right and bottom to CNN_MIN_SIDE, well clear of that; replicated edges add nothing a face
            # detector could fire on, coordinates are unchanged and boxes are clipped back to the image.
            img = pad_bottom_right(img, CNN_MIN_SIDE, CNN_MIN_SIDE)
            found = self.detector(img, self.upsample)
            rects = [d.rect for d in found]
            margins = [d.confidence for d in found]
        dets = []
        for rect, margin in zip(rects, margins):
            if margin < self.adjust_threshold:
                continue
            box = box_in_image(rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1, w, h)
            if box is None:
                continue
            lms = _dlib_five_points(self.predictor(img, rect)) if self.predictor is not None else None
            dets.append(FaceDet(box, float(expit(margin)), lms))
        return sorted(dets, key=lambda d: -d.score)

    def __call__(self, images: list[np.ndarray]) -> list[list[FaceDet]]:
        check_images(images)
        return [self._detect(np.ascontiguousarray(img)) for img in images]


# --------------------------------------------------------------------------------------------------------- MTCNN
@FACE_DETECTORS.register("mtcnn")
class MtcnnFaceDetector:
    """facenet-pytorch MTCNN (P-, R- and O-net cascade); scores are its face probabilities.

    options: ``min_face_size`` (default 20 px), ``thresholds`` (the three stages' cut-offs, default
    [0.6, 0.7, 0.7]), ``factor`` (pyramid scale step, default 0.709).
    """

    def __init__(self, mtcnn, spec: ModelSpec):
        self.mtcnn = mtcnn
        self.spec = spec
        self.info = model_info(spec, default_id="facenet-pytorch-mtcnn")

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> MtcnnFaceDetector:
        if spec.random_init:
            raise ModelLoadError("backend 'mtcnn' ships real weights; random_init is not supported")
        try:
            import torch
            from facenet_pytorch import MTCNN
        except ImportError as e:
            raise ModelLoadError(f"backend 'mtcnn' needs facenet-pytorch (pip install --no-deps): {e}") from e
        opts = spec.options
        mtcnn = MTCNN(
            keep_all=True,
            select_largest=False,
            post_process=False,
            min_face_size=int(opts.get("min_face_size", 20)),
            thresholds=list(opts.get("thresholds", [0.6, 0.7, 0.7])),
            factor=float(opts.get("factor", 0.709)),
            device=torch.device(resolve_device(spec.device)),
        )
        return cls(mtcnn.eval(), spec)

    def __call__(self, images: list[np.ndarray]) -> list[list[FaceDet]]:
        import torch

        check_images(images)
        out: list[list[FaceDet] | None] = [None] * len(images)
        # MTCNN batches only images of one size: group by shape, then chunk by batch_size.
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            by_shape.setdefault(img.shape, []).append(i)
        # facenet-pytorch searches faces of at least min_face_size px: its image pyramid starts at the scale that
        # maps min_face_size to P-net's 12 px cell and only shrinks from there. An image with a side shorter than
        # min_face_size gets no pyramid level at all, and MTCNN.detect then raises (torch.cat of an empty list)
        # instead of answering "no face". No face of the searched size fits in such an image: none is found.
        cell = 12.0
        scale = cell / self.mtcnn.min_face_size  # the same arithmetic as facenet-pytorch's detect_face
        for shape, idx in by_shape.items():
            h, w = shape[:2]
            if min(h, w) * scale < cell:
                for i in idx:
                    out[i] = []
                continue
            for start in range(0, len(idx), self.spec.batch_size):
                chunk = idx[start : start + self.spec.batch_size]
                with torch.inference_mode():
                    boxes, probs, points = self.mtcnn.detect(
                        np.stack([images[i] for i in chunk]), landmarks=True
                    )
                for j, i in enumerate(chunk):
                    dets = []
                    if boxes[j] is not None:
                        for box_xyxy, p, pts in zip(boxes[j], probs[j], points[j]):
                            box = box_in_image(*box_xyxy, w, h)
                            if box is not None:
                                dets.append(FaceDet(box, float(p), _landmarks(pts)))
                    out[i] = dets
        return out  # type: ignore[return-value]
