"""What `evaluate` reads: generated videos as `lumosx-train infer` writes them and case folders as
`build-benchmark` writes them, paired by name with no glue script.

    lumosx-train infer --cases bench/subject_consistent --out gen/subject     -> gen/subject/<key>.mp4
    build-benchmark                                                            -> bench/subject_consistent/<key>/
                                                                                  bench/ground_truth/<key>.mp4

The task of a case folder is its parent folder's name (identity_consistent / subject_consistent), or, for any
other folder, "subject" when the case has attributes, objects or a background and "identity" otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from schemas.evaluation import Task
from schemas.official_case import CAPTION_FILE, OfficialCase

TASK_FOLDERS: dict[str, Task] = {"identity_consistent": "identity", "subject_consistent": "subject"}
GROUND_TRUTH_DIR = "ground_truth"  # flows/benchmark_builder.py writes <benchmark>/ground_truth/<key>.mp4


@dataclass(frozen=True)
class EvalItem:
    key: str
    case_dir: Path
    video: Path | None
    ground_truth: Path | None
    task: Task


def task_of(case_dir: Path, case: OfficialCase | None = None) -> Task:
    folder_task = TASK_FOLDERS.get(case_dir.parent.name)
    if folder_task is not None:
        return folder_task
    if case is not None and (case.objects or case.background or any(s.attributes for s in case.subjects)):
        return "subject"
    return "identity"


def pair_inputs(
    videos_dir: str | Path, cases_dir: str | Path, ground_truth_dir: str | Path | None = None
) -> list[EvalItem]:
    """Every case folder under `cases_dir` with its generated video `<videos_dir>/<key>.mp4` (None when missing)
    and its ground-truth clip (`ground_truth_dir`, default `<cases_dir>/../ground_truth`)."""
    from schemas.official_case import read_case

    cases_root, videos_root = Path(cases_dir), Path(videos_dir)
    for name, folder in (("cases", cases_root), ("videos", videos_root)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{name} folder {folder} does not exist")
    gt_root = Path(ground_truth_dir) if ground_truth_dir else cases_root.parent / GROUND_TRUTH_DIR
    items = []
    for case_dir in sorted(p for p in cases_root.iterdir() if p.is_dir() and (p / CAPTION_FILE).is_file()):
        key = case_dir.name
        try:
            case = read_case(case_dir)
        except (ValueError, OSError):
            case = None  # reported as unreadable_case when the item is evaluated
        video = videos_root / f"{key}.mp4"
        gt = gt_root / f"{key}.mp4"
        items.append(
            EvalItem(
                key=key,
                case_dir=case_dir,
                video=video if video.is_file() else None,
                ground_truth=gt if gt.is_file() else None,
                task=task_of(case_dir, case),
            )
        )
    return items


def _scaled_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    if not max_side or max(width, height) <= max_side:
        return width, height
    s = max_side / max(width, height)
    return max(2, round(width * s / 2) * 2), max(2, round(height * s / 2) * 2)


def read_video(
    path: str | Path, max_side: int | None = None, max_frames: int = 2000
) -> tuple[np.ndarray, float]:
    """Every frame of a (short, generated) video as uint8 (T, H, W, 3), scaled so its longer side is at most
    `max_side`, and the frame rate. Raises ValueError for a file with no decodable video frame."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or Fraction(16)
        w, h = _scaled_size(stream.codec_context.width, stream.codec_context.height, max_side)
        frames = []
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="AREA"))
            if len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError(f"{path}: no decodable video frame")
    return np.stack(frames), float(rate)


def load_rgb(path: str | Path | None, data: bytes | None = None) -> np.ndarray:
    """A reference image as RGB uint8 (alpha composited on white: cut-outs keep their own colours only)."""
    import io

    with Image.open(io.BytesIO(data) if data is not None else path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "P"):
            rgba = im.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(canvas, rgba).convert("RGB"))
        return np.asarray(im.convert("RGB"))


def cutout_rgba(image: np.ndarray, white: int = 248) -> np.ndarray:
    """A reference cut-out with its background as alpha 0.

    The curation writes attribute and object cut-outs on white (tasks/sample.py) and the case layout carries no
    mask, so white pixels connected to the image border are background: left in, they would make every
    reference look partly "white" to a colour or image matcher. An RGBA input keeps its own alpha.
    """
    from scipy import ndimage

    if image.ndim == 3 and image.shape[2] == 4:
        return image
    near_white = (image >= white).all(axis=2)
    labels, _ = ndimage.label(near_white)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    background = np.isin(labels, border[border > 0])
    alpha = np.where(background, 0, 255).astype(np.uint8)
    if not alpha.any():  # all white: keep it whole rather than hand the matcher an empty image
        alpha[:] = 255
    return np.dstack([image, alpha])


def load_rgba(path: str | Path | None, data: bytes | None = None) -> np.ndarray:
    """A cut-out reference as RGBA uint8 (alpha from the file, else from its white background)."""
    import io

    with Image.open(io.BytesIO(data) if data is not None else path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "P", "PA"):
            return np.asarray(im.convert("RGBA"))
        return cutout_rgba(np.asarray(im.convert("RGB")))


def on_white(image: np.ndarray) -> np.ndarray:
    """RGB of an RGB or RGBA image, transparent pixels white (for models that take no mask)."""
    if image.ndim == 3 and image.shape[2] == 4:
        a = image[..., 3:4].astype(np.float32) / 255.0
        return (image[..., :3] * a + 255.0 * (1 - a)).round().astype(np.uint8)
    return image
