"""Person detectors: find people on keyframes, as boxes with a 0..1 score.

Backends (registered in `PERSON_DETECTORS`):

- ``yolo``: ultralytics YOLO restricted to the COCO ``person`` class (the paper's choice). Production weights are
  a local ``.pt`` file or an ultralytics asset name such as ``yolo11x.pt`` (downloaded by ultralytics on first use);
  the test build (``random_init``) is ``YOLO("yolov8n.yaml")``: the same code path with random weights.
- ``opencv-hog``: OpenCV's HOG + linear SVM people detector (Dalal & Triggs), whose weights ship inside
  ``opencv-python-headless<5``. CPU only, needs no download; it finds upright, mostly full-body people of at least
  ~100 px and misses seated or cropped ones, which is why the offline profile lets the faces stage add persons
  from faces (see tasks/faces.py).

Every adapter takes a list of RGB ``uint8`` images (H x W x 3) and returns, per image, its person detections in
that image's pixel coordinates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from models.base import ModelLoadError, ModelSpec, Registry, model_info, resolve_device
from models.weights import DEFAULTS
from schemas.records import Box

logger = logging.getLogger(__name__)

PERSON_DETECTORS = Registry("person detector")

COCO_PERSON = 0


@dataclass(frozen=True)
class PersonDet:
    box: Box
    score: float


def check_images(images: list[np.ndarray]) -> None:
    """Detectors take RGB uint8 H x W x 3 arrays; anything else is a caller bug worth a clear message."""
    for i, img in enumerate(images):
        if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            desc = f"{type(img).__name__} {getattr(img, 'shape', '')} {getattr(img, 'dtype', '')}"
            raise ValueError(f"image {i}: expected an RGB uint8 array of shape (H, W, 3), got {desc}")


def box_in_image(x0: float, y0: float, x1: float, y1: float, width: int, height: int) -> Box | None:
    """A detector box clipped to the image, corners put in order; None when nothing of it is left."""
    box = Box(x0=min(x0, x1), y0=min(y0, y1), x1=max(x0, x1), y1=max(y0, y1)).clip(width, height)
    return box if box.area > 0 else None


def _undo_pil_patch() -> None:
    """Give PIL.Image.open back its own function.

    Importing ultralytics replaces PIL.Image.open process-wide with a wrapper that, on an image PIL cannot
    identify, pip-installs pi-heif at run time and retries. In a curation worker a broken image must fail that
    image with PIL's UnidentifiedImageError, and nothing may install packages behind the user's back.
    """
    from PIL import Image
    from ultralytics.utils import patches

    original = getattr(patches, "_image_open", None)
    if original is not None and Image.open is getattr(patches, "image_open", None):
        Image.open = original


@PERSON_DETECTORS.register("yolo")
class YoloPersonDetector:
    """ultralytics YOLO, person class only.

    options: ``imgsz`` (inference size, default 640), ``conf`` (pre-filter confidence, default 0.1; the stage
    applies its own ``min_score``), ``iou`` (NMS IoU, default 0.7), ``config`` (architecture yaml of the test
    build, default ``yolov8n.yaml``).
    """

    def __init__(self, model, spec: ModelSpec, device: str, person_class: int = COCO_PERSON):
        self.model = model
        self.person_class = person_class
        self.spec = spec
        self.device = device
        # Half precision only where it is fast and supported: on CUDA.
        self.half = spec.dtype == "float16" and device.startswith("cuda")
        self.imgsz = int(spec.options.get("imgsz", 640))
        self.conf = float(spec.options.get("conf", 0.1))
        self.iou = float(spec.options.get("iou", 0.7))
        self.info = model_info(spec, default_id=DEFAULTS["yolo"])

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> YoloPersonDetector:
        try:
            from ultralytics import YOLO
        except ImportError as e:  # pragma: no cover - ultralytics is a core dependency
            raise ModelLoadError(f"backend 'yolo' needs ultralytics: {e}") from e
        _undo_pil_patch()
        if spec.trust_remote_code:
            logger.info("trust_remote_code has no effect on YOLO weights")
        source = (
            spec.options.get("config", "yolov8n.yaml")
            if spec.random_init
            else (spec.weights or DEFAULTS["yolo"])
        )
        try:
            model = YOLO(source)
        except Exception as e:  # ultralytics raises assorted errors for a missing file or a failed download
            raise ModelLoadError(
                f"cannot load YOLO weights {source!r} ({type(e).__name__}: {e}); pass a local .pt file as weights "
                "on machines without internet access"
            ) from e
        # Trained weights name their classes; a yaml test build numbers them, in COCO order (person = 0).
        names = model.names or {}
        person = [i for i, n in names.items() if n == "person"]
        if spec.random_init:
            person = [COCO_PERSON]
        if not person:
            raise ModelLoadError(f"YOLO model {source!r} has no 'person' class (classes: {names})")
        return cls(model, spec, resolve_device(spec.device), int(person[0]))

    def __call__(self, images: list[np.ndarray]) -> list[list[PersonDet]]:
        check_images(images)
        out: list[list[PersonDet]] = []
        for start in range(0, len(images), self.spec.batch_size):
            chunk = images[start : start + self.spec.batch_size]
            # ultralytics treats numpy arrays as OpenCV (BGR) images.
            bgr = [np.ascontiguousarray(img[:, :, ::-1]) for img in chunk]
            results = self.model.predict(
                bgr,
                classes=[self.person_class],
                conf=self.conf,
                iou=self.iou,
                imgsz=self.imgsz,
                device=self.device,
                half=self.half,
                verbose=False,
            )
            for img, res in zip(chunk, results):
                h, w = img.shape[:2]
                xyxy = res.boxes.xyxy.float().cpu().numpy()
                conf = res.boxes.conf.float().cpu().numpy()
                dets = []
                for (x0, y0, x1, y1), c in zip(xyxy, conf):
                    box = box_in_image(x0, y0, x1, y1, w, h)
                    if box is not None:
                        dets.append(PersonDet(box, float(c)))
                out.append(dets)
        return out


def pad_bottom_right(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """`img` grown at the right and bottom to at least `width` x `height`, by repeating its last column / row.

    For detectors that crash on images below some size. Replicated edges add no gradient, so the border looks
    like nothing to a gradient or conv detector (a constant colour would draw an edge along the image's side);
    growing only at the right and bottom keeps image coordinates as they are, and the caller clips boxes back to
    the image (a box lying wholly in the padding is then dropped).
    """
    h, w = img.shape[:2]
    if w >= width and h >= height:
        return img
    import cv2

    return cv2.copyMakeBorder(img, 0, max(0, height - h), 0, max(0, width - w), cv2.BORDER_REPLICATE)


@PERSON_DETECTORS.register("opencv-hog")
class HogPersonDetector:
    """OpenCV HOG people detector (64 x 128 window, linear SVM trained on INRIA pedestrians) with NMS.

    Score: the SVM margin ``m`` (signed distance to the decision boundary, as OpenCV returns it) mapped to 0..1 by
    the logistic function, ``score = 1 / (1 + exp(-m))``: a window on the boundary scores 0.5 and the score rises
    with the margin. This is Platt scaling with unit slope: monotone, comparable across images, but not a
    calibrated probability. Windows with ``m < hit_threshold`` are not returned at all.

    options: ``win_stride`` (default 8), ``padding`` (8), ``scale`` (pyramid step, 1.05), ``hit_threshold``
    (SVM margin cut-off, 0.0), ``nms_iou`` (0.45), ``max_side`` (downscale larger images first for speed, None).
    """

    def __init__(self, spec: ModelSpec):
        import cv2

        if not hasattr(cv2, "HOGDescriptor"):
            raise ModelLoadError("this OpenCV build has no HOGDescriptor (removed in OpenCV 5): use opencv<5")
        self.cv2 = cv2
        self.hog = cv2.HOGDescriptor()
        self.hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
        opts = spec.options
        self.win_stride = int(opts.get("win_stride", 8))
        self.padding = int(opts.get("padding", 8))
        self.scale = float(opts.get("scale", 1.05))
        self.hit_threshold = float(opts.get("hit_threshold", 0.0))
        self.nms_iou = float(opts.get("nms_iou", 0.45))
        self.max_side = opts.get("max_side")
        self.info = model_info(spec, default_id="opencv-hog-default-people")

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> HogPersonDetector:
        if spec.random_init:
            raise ModelLoadError(
                "backend 'opencv-hog' ships real weights inside OpenCV; random_init is not supported"
            )
        if resolve_device(spec.device) != "cpu":
            logger.info("opencv-hog runs on the CPU whatever the device (%s)", spec.device)
        return cls(spec)

    def _detect(self, img: np.ndarray) -> list[PersonDet]:
        cv2 = self.cv2
        h, w = img.shape[:2]
        factor = 1.0
        if h == 0 or w == 0:
            return []
        if self.max_side and max(h, w) > self.max_side:
            factor = self.max_side / max(h, w)
            size = (max(1, round(w * factor)), max(1, round(h * factor)))
            img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        # OpenCV's detectMultiScale (4.x) always evaluates the full-size pyramid level, even when it is smaller
        # than the 64 x 128 window: its window count then goes negative, it reads and writes outside its buffers
        # and aborts or segfaults the process (seen on 1x1, 20x14, 64x64, 96x96, 128x64, 160x90, 320x48, 47x200;
        # its own `padding` saves some sizes, and near the boundary the corruption can be silent). So it never
        # sees an image smaller than the window. Padded rather than skipped: a window reaching past the image is
        # what OpenCV's `padding` evaluates anyway, so a small image is searched like any other.
        win_w, win_h = self.hog.winSize
        img = pad_bottom_right(img, win_w, win_h)
        # groupThreshold=0: keep every window with its own margin, then one NMS (OpenCV's rectangle grouping
        # would average boxes and lose the scores).
        rects, margins = self.hog.detectMultiScale(
            img,
            hitThreshold=self.hit_threshold,
            winStride=(self.win_stride, self.win_stride),
            padding=(self.padding, self.padding),
            scale=self.scale,
            groupThreshold=0,
        )
        if len(rects) == 0:
            return []
        margins = np.asarray(margins, dtype=np.float64).reshape(-1)
        scores = expit(margins)
        keep = cv2.dnn.NMSBoxes(
            [list(map(int, r)) for r in rects],
            scores.tolist(),
            score_threshold=0.0,
            nms_threshold=self.nms_iou,
        )
        dets = []
        for i in np.asarray(keep).reshape(-1):
            x, y, bw, bh = (float(v) / factor for v in rects[i])
            box = box_in_image(x, y, x + bw, y + bh, w, h)
            if box is not None:
                dets.append(PersonDet(box, float(scores[i])))
        return sorted(dets, key=lambda d: -d.score)

    def __call__(self, images: list[np.ndarray]) -> list[list[PersonDet]]:
        check_images(images)
        # HOG works on any channel order with the same result up to rounding; no conversion needed.
        return [self._detect(img) for img in images]
