"""The binding score: decision rules on given scores, then constructed frames from real photos (two persons, each
in a garment pasted from a cut-out) with the garments on the right persons and swapped. dlib's real weights find
and recognise the faces, the real colour matcher compares garments; the CLIP path runs with the tiny build."""

from __future__ import annotations

import numpy as np
import pytest

from schemas.records import Box
from tasks.evaluation.binding import (
    FramePersons,
    bind_frame,
    body_regions,
    decide,
    face_anchored_body,
    summarise,
)


def _box(x0, y0, x1, y1) -> Box:
    return Box(x0=x0, y0=y0, x1=x1, y1=y1)


def test_decisions_correct_swapped_elsewhere_and_missing():
    persons = FramePersons(
        faces=[_box(0, 0, 1, 1)] * 3, bodies=[_box(0, 0, 1, 1)] * 3, subject_of=[0, 1, None]
    )
    scores = np.array(
        [
            [0.9, 0.2, 0.1],  # subject 0's attribute on subject 0's person: correct
            [0.1, 0.3, 0.8],  # subject 1's attribute best on the bystander: elsewhere
            [0.7, 0.4, 0.1],  # subject 1's attribute on subject 0's person: swapped
            [0.5, 0.5, 0.0],  # a tie is not "better than every other person": swapped
        ]
    )
    out = decide(scores, persons, [0, 1, 1, 1], ["a", "b", "c", "d"], 0)
    assert [d.outcome for d in out] == ["correct", "elsewhere", "swapped", "swapped"]
    missing = FramePersons(faces=[_box(0, 0, 1, 1)], bodies=[_box(0, 0, 1, 1)], subject_of=[0])
    assert decide(np.array([[0.5]]), missing, [1], ["e"], 0)[0].outcome == "person_not_found"
    result = summarise(out)
    assert result.accuracy == pytest.approx(0.25) and result.swap_rate == pytest.approx(0.5)
    assert np.isnan(summarise([]).accuracy)


def test_body_region_is_the_person_box_around_the_face_unless_shared():
    faces = [_box(100, 50, 140, 90), _box(300, 60, 340, 100)]
    person = _box(80, 40, 180, 300)  # holds face 0 in its upper part
    wide = _box(80, 40, 380, 300)  # holds both faces: says nothing about whose body is whose
    bodies = body_regions(faces, [person, wide], 640, 360)
    assert bodies[0] == person
    assert bodies[1] == face_anchored_body(faces[1], 640, 360)
    # face-anchored: three face widths wide, from the face top down to 3.5 face heights below the chin
    assert bodies[1].as_tuple() == (260, 60, 380, 240)


# ------------------------------------------------------------------------------------- real weights, real photos
@pytest.fixture(scope="module")
def models():
    from models.base import ModelSpec
    from models.face_detector import FACE_DETECTORS
    from models.face_embedder import FACE_EMBEDDERS
    from models.person_detector import PERSON_DETECTORS

    pytest.importorskip("dlib")
    # models/image_text.py (CLIP, SigLIP, colour matcher) comes from issue 12's branch
    from models.image_text import IMAGE_TEXT

    return {
        "det": FACE_DETECTORS.get(ModelSpec(backend="dlib", device="cpu")),
        "emb": FACE_EMBEDDERS.get(ModelSpec(backend="dlib", device="cpu")),
        "persons": PERSON_DETECTORS.get(ModelSpec(backend="opencv-hog", device="cpu")),
        "colour": IMAGE_TEXT.get(ModelSpec(backend="colour")),
        "clip": IMAGE_TEXT.get(ModelSpec(backend="clip", device="cpu", random_init=True)),
    }


@pytest.fixture(scope="module")
def case_inputs(models):
    """Reference embeddings and attribute cut-outs read back from a case folder, as the evaluation reads them."""
    from flows.eval_samples import binding_case
    from tasks.evaluation.identity import reference_embeddings
    from tasks.evaluation.inputs import load_rgb, load_rgba

    case = binding_case()
    faces = [load_rgb(None, s.face.png_bytes()) for s in case.subjects]
    refs, detected = reference_embeddings(models["det"], models["emb"], faces)
    assert detected == [True, True]
    attributes = [
        (k, a.label, load_rgba(None, a.png_bytes()))
        for k, s in enumerate(case.subjects)
        for a in s.attributes
    ]
    # the white around each cut-out is background, not part of the garment
    assert all(0 < (a[2][..., 3] > 0).mean() < 1 for a in attributes)
    return refs, attributes


def _bind(models, matcher, swapped: bool, case_inputs):
    from flows.eval_samples import binding_frames
    from tasks.evaluation.identity import embed_faces

    refs, attributes = case_inputs
    frame = next(binding_frames(1, swapped))
    dets = models["det"]([frame])[0]
    embs = embed_faces(models["emb"], [frame], [dets])[0]
    people = models["persons"]([frame])[0]
    return bind_frame(
        frame, 0, [d.box for d in dets], embs, refs, [p.box for p in people], attributes, matcher
    )


def test_colour_matcher_tells_right_from_swapped(models, case_inputs):
    from flows.eval_samples import face_boxes

    persons, right = _bind(models, models["colour"], False, case_inputs)
    # the faces were matched to the right subjects (subject 0 = the woman on the left)
    truth = face_boxes()
    assert persons.faces[persons.person_of(0)].iou(truth["woman"]) > 0.7
    assert persons.faces[persons.person_of(1)].iou(truth["man"]) > 0.7
    _, swapped = _bind(models, models["colour"], True, case_inputs)
    r, s = summarise(right), summarise(swapped)
    print("right", r.accuracy, r.swap_rate, "swapped", s.accuracy, s.swap_rate)
    assert (r.accuracy, r.swap_rate) == (1.0, 0.0)
    assert (s.accuracy, s.swap_rate) == (0.0, 1.0)
    for d in right:
        assert d.own_score > d.best_other_score + 0.2  # not a coin toss


def test_clip_path_runs_with_the_tiny_build(models, case_inputs):
    assert models["clip"].info.random_weights
    persons, decisions = _bind(models, models["clip"], False, case_inputs)
    assert len(persons.faces) == 2 and sorted(p for p in persons.subject_of if p is not None) == [0, 1]
    assert [d.attribute for d in decisions] == ["green shirt", "blue shirt"]
    assert all(d.outcome in ("correct", "swapped") and d.own_score is not None for d in decisions)
