"""Constructed frames for the visual binding check: two real persons in garments of known colours.

The persons are cut from insightface's group photo (as in the `two_people` sample video: the woman with cards on
the left, the laughing man on the right) onto the photo's wall colour; each then gets a garment pasted over the
lower torso: a flat colour modulated by the photo's own luminance, so the garment keeps the real folds, hands
and cards texture instead of being a flat test card. Nothing is committed: the photo ships inside insightface.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from flows.sample_data import group_photo
from schemas.records import Box

SIZE = (640, 360)
PERSON_BOXES = {0: Box(x0=40, y0=0, x1=302, y1=360), 1: Box(x0=396, y0=0, x1=601, y1=360)}
GARMENT_BOXES = {0: Box(x0=60, y0=240, x1=290, y1=360), 1: Box(x0=410, y0=200, x1=595, y1=360)}
COLOURS = {
    "black": (28, 28, 30),
    "white": (245, 245, 242),
    "red": (200, 30, 35),
    "green": (40, 160, 60),
    "blue": (35, 70, 190),
    "yellow": (235, 210, 40),
}


def two_person_frame(garments: dict[int, str]) -> np.ndarray:
    """HxWx3 uint8: person 0 on the left, person 1 on the right, each in a garment of colour `garments[pid]`."""
    photo = group_photo()
    canvas = Image.new("RGB", SIZE, (182, 150, 112))  # the photo's warm wall colour
    canvas.paste(photo.crop((0, 225, 262, 585)), (40, 0))
    canvas.paste(photo.crop((688, 275, 893, 635)), (396, 0))
    frame = np.asarray(canvas).copy()
    for pid, colour in garments.items():
        x0, y0, x1, y1 = (int(v) for v in GARMENT_BOXES[pid].as_tuple())
        luma = frame[y0:y1, x0:x1].astype(np.float32).mean(axis=-1, keepdims=True) / 255.0
        shade = 0.9 + 0.1 * luma  # folds and edges of the real photo show through, colour name unchanged
        frame[y0:y1, x0:x1] = np.clip(np.array(COLOURS[colour], np.float32) * shade, 0, 255).astype(np.uint8)
    return frame


def crop(frame: np.ndarray, box: Box) -> np.ndarray:
    x0, y0, x1, y1 = (int(round(v)) for v in box.as_tuple())
    return frame[y0:y1, x0:x1]
