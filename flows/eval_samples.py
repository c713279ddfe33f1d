"""Demo inputs for `lumosx-eval`, made from real photos: a tiny benchmark folder and generated videos.

`write_eval_demo` lays out what `build-benchmark` and `lumosx-train infer` write: an identity-consistent case
(the two-person sample clip, its faces as references) and a subject-consistent binding case with its
ground-truth clip, plus "generated" videos (the clips themselves, and the binding clip with the garments swapped).

Constructed binding cases, where the truth is known: who wears which garment.

Two real persons (scikit-image's astronaut on the left, the laughing man of insightface's group photo on the
right) stand on the group photo's wall colour; each wears a garment pasted from a cut-out: a shirt-shaped alpha
mask filled with a named colour, shaded by the real folds of the astronaut's suit so it is not a flat card. The
case's references are what `build-benchmark` writes: each face cropped from its *original* photo (not from the
frame), and each garment cut-out on white. `swapped=True` puts each person's garment on the other person.
Nothing is committed: both photos ship inside installed packages.

    python -m flows.eval_samples OUT_DIR      # a case folder and two clips: correct/ and swapped/
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


IDENTITY_CAPTION = "A woman and a man stand side by side against a warm wall."


def _face_crops_png(frame: np.ndarray) -> list[bytes]:
    """The faces of a frame, left to right, cropped with a margin by dlib's real offline detector."""
    from models.base import ModelSpec
    from models.face_detector import FACE_DETECTORS

    h, w = frame.shape[:2]
    dets = FACE_DETECTORS.get(ModelSpec(backend="dlib", device="cpu"))([frame])[0]
    crops = []
    for det in sorted(dets, key=lambda d: d.box.x0):
        x0, y0, x1, y1 = det.box.expand(0.3, w, h).pixel_bounds(w, h)
        crops.append(_png(frame[y0:y1, x0:x1]))
    return crops


def write_eval_demo(out_dir: str | Path, *, seconds: float = 1.0, fps: int = 8) -> dict[str, Path]:
    """<out>/bench/{identity_consistent,subject_consistent,ground_truth}, <out>/gen/{identity,subject},
    <out>/gen_swapped/subject: cases `two_people` (identity) and `binding_demo` (subject)."""
    from flows.sample_data import make_sample_videos, write_video
    from tasks.evaluation.inputs import read_video

    out = Path(out_dir)
    bench, gen, swapped = out / "bench", out / "gen", out / "gen_swapped"
    clip = next(
        p for p in make_sample_videos(out / "src", seconds=seconds, fps=fps) if p.stem == "two_people"
    )
    frames, _ = read_video(clip)
    faces = _face_crops_png(frames[len(frames) // 2])
    if len(faces) != 2:
        raise RuntimeError(f"expected the two faces of the two_people clip, dlib found {len(faces)}")
    subjects = [CaseSubject(face=CaseImage(label=lab, data=png)) for lab, png in zip(("woman", "man"), faces)]
    write_case(
        OfficialCase(case_id="two_people", caption=IDENTITY_CAPTION, subjects=subjects),
        bench / "identity_consistent" / "two_people",
        overwrite=True,
    )
    (gen / "identity").mkdir(parents=True, exist_ok=True)
    (gen / "identity" / "two_people.mp4").write_bytes(clip.read_bytes())

    write_case(binding_case(), bench / "subject_consistent" / "binding_demo", overwrite=True)
    # H.264 mp4 like `lumosx-train infer` writes (its writer imports the whole model stack: seconds of imports)
    n = max(2, round(seconds * fps))
    right = list(binding_frames(n))
    for folder in (bench / "ground_truth", gen / "subject"):
        folder.mkdir(parents=True, exist_ok=True)
        write_video(folder / "binding_demo.mp4", right, fps)
    (swapped / "subject").mkdir(parents=True, exist_ok=True)
    write_video(swapped / "subject" / "binding_demo.mp4", binding_frames(n, swapped=True), fps)
    return {"bench": bench, "gen": gen, "gen_swapped": swapped}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    for name, path in write_eval_demo(parser.parse_args(argv).out_dir).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
