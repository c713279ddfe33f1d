"""Draw docs/binding_example.png: the binding score on one correct and one swapped constructed case.

Real offline models only: dlib finds and recognises the faces, OpenCV HOG looks for persons (face-anchored body
boxes where it finds none), the colour matcher compares each body region with each garment reference.

    PYTHONPATH=. python scripts/binding_example.py [docs/binding_example.png]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from flows.eval_samples import binding_case, binding_frames
from models.base import ModelSpec
from models.face_detector import FACE_DETECTORS
from models.face_embedder import FACE_EMBEDDERS
from models.image_text import IMAGE_TEXT
from models.person_detector import PERSON_DETECTORS
from tasks.evaluation.binding import bind_frame, summarise
from tasks.evaluation.identity import embed_faces, reference_embeddings
from tasks.evaluation.inputs import load_rgb, load_rgba

SUBJECT_COLOURS = [(255, 220, 0), (0, 230, 255)]


def panel(frame: np.ndarray, title: str, models, refs, attributes) -> Image.Image:
    det, emb, hog, matcher = models
    faces = det([frame])[0]
    embs = embed_faces(emb, [frame], [faces])[0]
    people = hog([frame])[0]
    persons, decisions = bind_frame(
        frame, 0, [f.box for f in faces], embs, refs, [p.box for p in people], attributes, matcher
    )
    result = summarise(decisions)
    img = Image.fromarray(frame).copy()
    draw = ImageDraw.Draw(img)
    for face, body, subject in zip(persons.faces, persons.bodies, persons.subject_of):
        colour = SUBJECT_COLOURS[subject] if subject is not None else (200, 200, 200)
        draw.rectangle(body.as_tuple(), outline=colour, width=3)
        draw.rectangle(face.as_tuple(), outline=colour, width=2)
        draw.text(
            (face.x0 + 2, face.y0 - 14),
            f"subject {subject + 1}" if subject is not None else "bystander",
            fill=colour,
        )
    canvas = Image.new("RGB", (img.width, img.height + 86), (255, 255, 255))
    canvas.paste(img, (0, 0))
    d = ImageDraw.Draw(canvas)
    y = img.height + 4
    d.text(
        (6, y), f"{title}: binding accuracy {result.accuracy:.2f}, swap rate {result.swap_rate:.2f}", fill=0
    )
    for dec in decisions:
        y += 16
        mark = {"correct": "OK", "swapped": "SWAPPED"}.get(dec.outcome, dec.outcome)
        d.text(
            (6, y),
            f"subject {dec.subject + 1} '{dec.attribute}': own person {dec.own_score:.2f} vs best other "
            f"{dec.best_other_score:.2f} -> {mark}",
            fill=(0, 0, 0),
        )
    return canvas


def main(argv: list[str]) -> Path:
    out = Path(argv[0] if argv else "docs/binding_example.png")
    models = (
        FACE_DETECTORS.get(ModelSpec(backend="dlib", device="cpu")),
        FACE_EMBEDDERS.get(ModelSpec(backend="dlib", device="cpu")),
        PERSON_DETECTORS.get(ModelSpec(backend="opencv-hog", device="cpu")),
        IMAGE_TEXT.get(ModelSpec(backend="colour")),
    )
    case = binding_case()
    refs, _ = reference_embeddings(
        models[0], models[1], [load_rgb(None, s.face.png_bytes()) for s in case.subjects]
    )
    attributes = [
        (k, a.label, load_rgba(None, a.png_bytes()))
        for k, s in enumerate(case.subjects)
        for a in s.attributes
    ]
    panels = [
        panel(
            next(binding_frames(1, swapped=False)),
            "attributes on the right persons",
            models,
            refs,
            attributes,
        ),
        panel(next(binding_frames(1, swapped=True)), "attributes swapped", models, refs, attributes),
    ]
    # the case's references on the left: what the model was asked to generate
    ref_col = Image.new("RGB", (150, panels[0].height), (255, 255, 255))
    d = ImageDraw.Draw(ref_col)
    y = 4
    for k, s in enumerate(case.subjects):
        d.text((6, y), f"subject {k + 1}: {s.face.label}", fill=0)
        face = Image.fromarray(load_rgb(None, s.face.png_bytes()))
        face.thumbnail((64, 64))
        ref_col.paste(face, (6, y + 16))
        for a in s.attributes:
            cut = Image.fromarray(load_rgb(None, a.png_bytes()))
            cut.thumbnail((64, 64))
            ref_col.paste(cut, (76, y + 16))
            d.text((76, y + 84), a.label, fill=0)
        d.rectangle((2, y, 146, y + 100), outline=SUBJECT_COLOURS[k], width=3)
        y += 112
    sheet = Image.new("RGB", (ref_col.width + sum(p.width for p in panels) + 20, panels[0].height), "white")
    sheet.paste(ref_col, (0, 0))
    x = ref_col.width + 10
    for p in panels:
        sheet.paste(p, (x, 0))
        x += p.width + 10
    out.parent.mkdir(parents=True, exist_ok=True)
    # a palette image keeps the file small for the repo
    sheet.quantize(colors=192, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    return out


if __name__ == "__main__":
    print(main(sys.argv[1:]))
