"""Open-vocabulary detectors: OWLv2 and Florence-2 through transformers with tiny random builds.

Random weights find nothing meaningful, so the box arithmetic is checked where it can be pinned down: OWLv2's
boxes against transformers' own post-processing of the same forward pass (padding-to-square scale), and
Florence-2's parser on a known answer string (location bins -> pixels), plus full runs for structure.
"""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch

from models.base import ModelLoadError, ModelSpec
from models.grounding import GroundedBox
from models.open_vocab_detector import FLORENCE_TASK, OPEN_VOCAB_DETECTORS


@pytest.fixture(scope="module")
def images():
    astro = skimage.data.astronaut()
    return [astro[:300, :480].copy(), skimage.data.chelsea()]  # 480 x 300 and 451 x 300: not square


@pytest.fixture(scope="module")
def owl():
    return OPEN_VOCAB_DETECTORS.build(
        ModelSpec(backend="owlv2", random_init=True, device="cpu", batch_size=2)
    )


@pytest.fixture(scope="module")
def florence():
    spec = ModelSpec(
        backend="florence2", random_init=True, device="cpu", options={"num_beams": 1, "max_new_tokens": 6}
    )
    return OPEN_VOCAB_DETECTORS.build(spec)


def _check(found: list[list[GroundedBox]], images, queries) -> None:
    assert len(found) == len(images)
    for per_image, img, qs in zip(found, images, queries):
        h, w = img.shape[:2]
        assert [g.score for g in per_image] == sorted((g.score for g in per_image), reverse=True)
        for g in per_image:
            assert g.phrase in qs
            assert 0 <= g.box.x0 < g.box.x1 <= w and 0 <= g.box.y0 < g.box.y1 <= h


def test_owlv2_boxes_match_transformers_post_processing(owl, images):
    assert owl.info.random_weights and owl.info.model_id == "google/owlv2-base-patch16-ensemble"
    assert owl.threshold == 0.1  # the paper's
    queries = [["red hat", "black shirt", "white glove"], ["cat"]]
    found = owl(images, queries, threshold=0.0)
    _check(found, images, queries)
    assert all(found)
    # The same forward pass through transformers' post-processing, on the padded square (OWLv2 pads bottom/right).
    raw = OPEN_VOCAB_DETECTORS.build(
        ModelSpec(backend="owlv2", random_init=True, device="cpu", options={"nms_iou": 1.0})
    )
    img, qs = images[1], queries[1]
    side = max(img.shape[:2])
    inputs = raw.processor(text=[qs], images=[img], return_tensors="pt")
    with torch.inference_mode():
        outputs = raw.model(**inputs)
    ref = raw.processor.post_process_grounded_object_detection(
        outputs, threshold=-1.0, target_sizes=[(side, side)]
    )
    ref_boxes = ref[0]["boxes"].clamp(min=0)
    ref_boxes[:, 0::2] = ref_boxes[:, 0::2].clamp(max=img.shape[1])
    ref_boxes[:, 1::2] = ref_boxes[:, 1::2].clamp(max=img.shape[0])
    ours = raw([img], [qs], threshold=0.0)[0]
    got = {tuple(np.round(g.box.as_tuple(), 2)) for g in ours}
    want = {tuple(np.round(b, 2)) for b in ref_boxes.tolist() if (b[2] - b[0]) * (b[3] - b[1]) > 0}
    assert got == want


def test_owlv2_batching_thresholds_and_empty_queries(owl, images):
    queries = [["red hat", "black shirt"], ["cat"]]
    batched = owl(images, queries, threshold=0.0)
    one = OPEN_VOCAB_DETECTORS.build(ModelSpec(backend="owlv2", random_init=True, device="cpu", batch_size=1))
    single = one(images, queries, threshold=0.0)
    for a, b in zip(batched, single):
        assert [g.phrase for g in a] == [g.phrase for g in b]
        np.testing.assert_allclose([g.score for g in a], [g.score for g in b], atol=1e-5)
    assert owl(images, queries, threshold=1.01) == [[], []]
    assert owl(images, [[], [" "]]) == [[], []]
    with pytest.raises(ValueError, match="query lists"):
        owl(images, [["cat"]])


def test_florence2_parses_its_location_tokens(florence):
    assert florence.info.model_id == "florence-community/Florence-2-large"
    # An answer as Florence-2 writes it: phrase, then four location bins (0..999 of the width / height).
    answer = "</s><s>red hat<loc_100><loc_200><loc_500><loc_999></s>"
    (g,) = florence.parse(answer, "red hat", 0.8, (640, 480))
    assert g.phrase == "red hat" and g.score == 0.8
    assert g.box.as_tuple() == pytest.approx((64, 96, 320, 480), abs=1)
    # Two boxes in one answer (bins are thousandths: on a 1000 px image bin b is pixel b); a zero-area box is
    # dropped.
    text = (
        "cat<loc_0><loc_0><loc_10><loc_10>cat<loc_10><loc_10><loc_20><loc_20>cat<loc_5><loc_5><loc_5><loc_9>"
    )
    two = florence.parse(text, "cat", 1.0, (1000, 1000))
    assert [b.box.as_tuple() for b in two] == [(0, 0, 10, 10), (10, 10, 20, 20)]
    assert florence.parse("</s>nothing here</s>", "cat", 1.0, (100, 100)) == []
    # The prompt the processor builds is Florence-2's open-vocabulary detection prompt.
    ids = florence.processor(text=[FLORENCE_TASK + "red hat"], images=[np.zeros((8, 8, 3), np.uint8)])[
        "input_ids"
    ]
    assert "Locate red hat in the image." in florence.processor.tokenizer.decode(ids[0])


def test_florence2_generates_and_batches(florence, images):
    queries = [["a woman with a red hat", "white glove"], ["cat"]]
    found = florence(images, queries)
    _check(found, images, queries)
    answers = florence._generate([florence_pil(images[0])] * 2, ["red hat", "cat"])
    assert len(answers) == 2 and all(0 < s <= 1 for _, s in answers)
    beams = OPEN_VOCAB_DETECTORS.build(
        ModelSpec(
            backend="florence2", random_init=True, device="cpu", options={"num_beams": 2, "max_new_tokens": 4}
        )
    )
    ((text, score),) = beams._generate([florence_pil(images[1])], ["cat"])
    assert isinstance(text, str) and 0 < score <= 1
    assert beams(images, queries, threshold=1.01) == [[], []]


def florence_pil(img):
    from PIL import Image

    return Image.fromarray(img)


def test_bad_specs(tmp_path):
    for backend in ("owlv2", "florence2"):
        with pytest.raises(ModelLoadError, match="cannot load"):
            OPEN_VOCAB_DETECTORS.build(
                ModelSpec(backend=backend, weights=str(tmp_path / "none"), device="cpu")
            )
        with pytest.raises(ModelLoadError, match="unknown options"):
            OPEN_VOCAB_DETECTORS.build(
                ModelSpec(backend=backend, random_init=True, options={"box_threshold": 1})
            )
