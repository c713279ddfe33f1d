"""Constructed binding cases from real photos, where the truth is known: who wears which garment.

Two real persons (scikit-image's astronaut on the left, the laughing man of insightface's group photo on the
right) stand on the group photo's wall colour; each wears a garment pasted from a cut-out: a shirt-shaped alpha
mask filled with a named colour, shaded by the real folds of the astronaut's suit so it is not a flat card. The
case's references are what `build-benchmark` writes: each face cropped from its *original* photo (not from the
frame), and each garment cut-out on white. `swapped=True` puts each person's garment on the other person.
Nothing is committed: both photos ship inside installed packages.

    python -m flows.binding_samples OUT_DIR      # a case folder and two clips: correct/ and swapped/
"""

from __future__ import annotations

import argparse
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from flows.sample_data import astronaut_photo, group_photo
from schemas.official_case import CaseImage, CaseSubject, OfficialCase, write_case
from schemas.records import Box

SIZE = (720, 420)
WALL = (182, 150, 112)
COLOURS = {"green": (40, 160, 60), "blue": (35, 70, 190), "yellow": (235, 210, 40), "purple": (120, 50, 160)}
# (source photo, crop box in it, where the crop goes on the canvas, face box in the source photo (dlib HOG))
PERSONS = {
    "woman": ("astronaut", (80, 20, 360, 400), (40, 20), (175, 76, 266, 167)),
    "man": ("group", (650, 320, 930, 700), (400, 20), (724, 367, 833, 475)),
}
CAPTION = "A woman in a {0} shirt and a man in a {1} shirt stand side by side against a warm wall."


def _photo(name: str) -> Image.Image:
    return astronaut_photo() if name == "astronaut" else group_photo()


def garment_cutout(colour: str, size: tuple[int, int] = (220, 210)) -> np.ndarray:
    """RGBA shirt: torso and short sleeves as alpha, the colour shaded by the astronaut suit's luminance."""
    w, h = size
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).polygon(
        [
            (0.3 * w, 0),
            (0.7 * w, 0),
            (w, 0.25 * h),
            (0.88 * w, 0.42 * h),
            (0.8 * w, 0.35 * h),
            (0.8 * w, h),
            (0.2 * w, h),
            (0.2 * w, 0.35 * h),
            (0.12 * w, 0.42 * h),
            (0, 0.25 * h),
        ],
        fill=255,
    )
    suit = np.asarray(astronaut_photo().crop((150, 260, 150 + w, 260 + h)).convert("L"), np.float32) / 255.0
    rgb = np.clip(np.array(COLOURS[colour], np.float32) * (0.75 + 0.35 * suit[..., None]), 0, 255).astype(
        np.uint8
    )
    return np.dstack([rgb, np.asarray(mask)])


def face_boxes(offset: tuple[int, int] = (0, 0)) -> dict[str, Box]:
    """Where each face lies on the canvas (for drawing and checks)."""
    out = {}
    for label, (_, (cx0, cy0, _, _), (px, py), (fx0, fy0, fx1, fy1)) in PERSONS.items():
        dx, dy = px - cx0 + offset[0], py - cy0 + offset[1]
        out[label] = Box(x0=fx0 + dx, y0=fy0 + dy, x1=fx1 + dx, y1=fy1 + dy)
    return out


def binding_frame(garments: dict[str, str], offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """The two persons, `garments[label]` pasted on each one's torso (label: "woman" / "man")."""
    canvas = Image.new("RGB", SIZE, WALL)
    for _label, (photo, box, (px, py), _) in PERSONS.items():
        canvas.paste(_photo(photo).crop(box), (px + offset[0], py + offset[1]))
    for label, face in face_boxes(offset).items():
        cut = Image.fromarray(garment_cutout(garments[label]))
        cx = (face.x0 + face.x1) / 2
        canvas.paste(cut, (round(cx - cut.width / 2), round(face.y1 + 0.25 * face.height)), cut)
    return np.asarray(canvas)


def reference_faces() -> dict[str, np.ndarray]:
    """Face crops from the original photos, with a margin, as a benchmark case has them."""
    out = {}
    for label, (photo, _, _, (x0, y0, x1, y1)) in PERSONS.items():
        m = 0.3 * (x1 - x0)
        out[label] = np.asarray(_photo(photo).crop((x0 - m, y0 - m, x1 + m, y1 + m)))
    return out


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _on_white(rgba: np.ndarray) -> np.ndarray:
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    return (rgba[..., :3] * a + 255.0 * (1 - a)).round().astype(np.uint8)


def binding_case(case_id: str = "binding_demo", colours: tuple[str, str] = ("green", "blue")) -> OfficialCase:
    """Subject 1: the woman with `colours[0]` shirt; subject 2: the man with `colours[1]` shirt."""
    faces = reference_faces()
    subjects = [
        CaseSubject(
            face=CaseImage(label=label, data=_png(faces[label])),
            attributes=[CaseImage(label=f"{colour} shirt", data=_png(_on_white(garment_cutout(colour))))],
        )
        for label, colour in zip(("woman", "man"), colours)
    ]
    return OfficialCase(case_id=case_id, caption=CAPTION.format(*colours), subjects=subjects)


def binding_frames(num_frames: int, swapped: bool = False, colours: tuple[str, str] = ("green", "blue")):
    """A short clip: both persons sway a few pixels; garments right (or swapped)."""
    first, second = colours[::-1] if swapped else colours
    for i in range(num_frames):
        phase = 2 * math.pi * i / max(1, num_frames)
        yield binding_frame({"woman": first, "man": second}, (round(6 * math.sin(phase)), 0))


def write_binding_sample(out_dir: str | Path, num_frames: int = 16, fps: float = 8.0) -> dict[str, Path]:
    """<out>/cases/<key>/ (official layout) and <out>/correct/<key>.mp4, <out>/swapped/<key>.mp4."""
    from lumosx_model.inference import write_mp4

    out = Path(out_dir)
    key = "binding_demo"
    case_dir = write_case(binding_case(key), out / "cases" / key, overwrite=True)
    paths = {"cases": case_dir.parent}
    for name, swapped in (("correct", False), ("swapped", True)):
        frames = np.stack(list(binding_frames(num_frames, swapped)))
        write_mp4(frames, out / name / f"{key}.mp4", fps=fps)
        paths[name] = out / name
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    print(write_binding_sample(parser.parse_args(argv).out_dir))


if __name__ == "__main__":
    main()
