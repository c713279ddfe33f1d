"""The decoupled two-tier metrics on a constructed frame: tiny OWLv2/CLIP/DINOv2 builds and dlib's real face
models. A detection failure must score 0 on every metric it feeds and be reported with its reason."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.evaluation.two_tier import Entity, subject_query, two_tier

pytest.importorskip("dlib")
pytest.importorskip("models.image_text")  # CLIP / colour matcher: issue 12's branch


def test_subject_query_is_the_papers_text():
    assert subject_query("woman", ["green shirt", "black hat"]) == "woman with green shirt and black hat"
    assert subject_query("man", []) == "man"


@pytest.fixture(scope="module")
def setup():
    from flows.eval_samples import binding_case, binding_frames
    from models.base import ModelSpec
    from models.face_detector import FACE_DETECTORS
    from models.face_embedder import FACE_EMBEDDERS
    from models.image_features import IMAGE_FEATURES
    from models.image_text import IMAGE_TEXT
    from models.open_vocab_detector import OPEN_VOCAB_DETECTORS
    from tasks.evaluation.identity import reference_embeddings
    from tasks.evaluation.inputs import load_rgb, load_rgba

    tiny = dict(device="cpu", random_init=True)
    models = dict(
        detector=OPEN_VOCAB_DETECTORS.get(ModelSpec(backend="owlv2", **tiny)),
        face_detector=FACE_DETECTORS.get(ModelSpec(backend="dlib", device="cpu")),
        face_embedders={"DlibSim": FACE_EMBEDDERS.get(ModelSpec(backend="dlib", device="cpu"))},
        image_text=IMAGE_TEXT.get(ModelSpec(backend="clip", **tiny)),
        image_features=IMAGE_FEATURES.get(ModelSpec(backend="dinov2", **tiny)),
    )
    case = binding_case()
    faces = [load_rgb(None, s.face.png_bytes()) for s in case.subjects]
    refs = {
        "DlibSim": reference_embeddings(models["face_detector"], models["face_embedders"]["DlibSim"], faces)[
            0
        ]
    }
    entities = [
        Entity(k, a.label, load_rgba(None, a.png_bytes()))
        for k, s in enumerate(case.subjects)
        for a in s.attributes
    ]
    subjects = [(s.face.label, [a.label for a in s.attributes]) for s in case.subjects]
    return models, next(binding_frames(1)), subjects, refs, entities


def _run(setup, threshold: float):
    models, frame, subjects, refs, entities = setup
    return two_tier(
        frame, "k", "subject", subjects, refs, entities,
        subject_detector=models["detector"], attribute_detector=models["detector"], attribute_threshold=threshold,
        face_detector=models["face_detector"], face_embedders=models["face_embedders"],
        image_text=models["image_text"], image_features=models["image_features"], face_floor={"DlibSim": 0.92},
    )  # fmt: skip


def test_detection_failures_score_zero_and_say_why(setup):
    # The subject detector is the tiny OWLv2 at its own threshold (0.1): random scores never reach it.
    result = _run(setup, threshold=1.0)
    assert result.face == {"DlibSim": 0.0}
    assert (result.clip_t, result.clip_i, result.dino_i) == (0.0, 0.0, 0.0)
    assert {(f.reason, f.entity) for f in result.failures} == {
        ("subject_not_detected", "woman"),
        ("subject_not_detected", "man"),
    }
    assert result.subject_boxes == [None, None]


def test_found_crops_flow_through_clip_and_dino(setup):
    from models.base import ModelSpec
    from models.open_vocab_detector import OPEN_VOCAB_DETECTORS

    models = dict(setup[0])
    # threshold 0: the tiny detector's best box is taken, so the crop -> CLIP-T / CLIP-I / DINO-I path runs
    models["detector"] = OPEN_VOCAB_DETECTORS.get(
        ModelSpec(backend="owlv2", device="cpu", random_init=True, options={"threshold": 0.0})
    )
    result = _run((models, *setup[1:]), threshold=0.0)
    assert any(b is not None for b in result.subject_boxes)
    for value in (result.clip_t, result.clip_i, result.dino_i, result.face["DlibSim"]):
        assert math.isfinite(value) and -1.0 <= value <= 1.0
    assert result.dino_i != 0.0  # at least one attribute crop was embedded
    found = sum(b is not None for b in result.subject_boxes)
    assert len([f for f in result.failures if f.reason == "subject_not_detected"]) == 2 - found
    assert np.isfinite(result.clip_t)
