"""GroundingDINO adapter, tiny random-weight build: phrase bookkeeping, region mapping, batching, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.base import ModelLoadError, ModelSpec
from models.grounding import GROUNDERS, assign_phrases, phrase_prompt, phrase_token_indices
from schemas.records import Box


def _spec(**options) -> ModelSpec:
    return ModelSpec(backend="grounding-dino", random_init=True, device="cpu", batch_size=2, options=options)


@pytest.fixture(scope="module")
def detector():
    # Thresholds at 0: random weights score arbitrarily, and these tests are about geometry, not recognition.
    return GROUNDERS.build(_spec(box_threshold=0.0, text_threshold=0.0, nms_iou=1.0))


def _image(w: int = 120, h: int = 90, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_phrase_prompt_and_token_spans(detector):
    text, spans = phrase_prompt(["Black Shirt", "red hat.", "a  wooden cutting board"])
    assert text == "black shirt. red hat. a wooden cutting board."
    assert [text[a:b] for a, b in spans] == ["black shirt", "red hat", "a wooden cutting board"]
    enc = detector.processor.tokenizer(text, return_offsets_mapping=True)
    tokens = phrase_token_indices(enc["offset_mapping"], spans)
    words = detector.processor.tokenizer.convert_ids_to_tokens(enc["input_ids"])
    assert [[words[i] for i in idx] for idx in tokens] == [
        ["black", "shirt"],
        ["red", "hat"],
        ["a", "wooden", "cutting", "board"],
    ]


def test_assign_phrases_picks_best_phrase_and_applies_thresholds():
    probs = torch.zeros(4, 8)
    probs[0, [1, 2]] = torch.tensor([0.9, 0.8])  # query 0: phrase 0, both words
    probs[1, [4, 5]] = torch.tensor([0.7, 0.6])  # query 1: phrase 1
    probs[2, 1] = 0.9  # query 2: only "black" of "black shirt": mean 0.45
    probs[3, 5] = 0.1  # query 3: too weak
    kept, phrase, score = assign_phrases(probs, [[1, 2], [4, 5]], box_threshold=0.3, text_threshold=0.5)
    assert kept.tolist() == [0, 1] and phrase.tolist() == [0, 1]
    assert score.tolist() == pytest.approx([0.9, 0.7])
    kept, _, _ = assign_phrases(probs, [[1, 2], [4, 5]], box_threshold=0.3, text_threshold=0.4)
    assert kept.tolist() == [0, 1, 2]
    kept, _, _ = assign_phrases(probs, [[], [4, 5]], box_threshold=0.3, text_threshold=0.0)
    assert kept.tolist() == [1]  # a phrase without tokens (truncated away) takes no box


def test_detect_real_path_returns_boxes_in_region_in_frame_coordinates(detector):
    region = Box(x0=30.5, y0=10.0, x1=80.0, y1=70.2)
    images = [_image(), _image(seed=1), _image(seed=2)]
    out = detector.detect(images, [["black shirt", "red hat"], ["dog"], []], [region, None, None])
    assert len(out) == 3 and out[2] == []
    assert out[0] and out[1]
    for g in out[0]:
        assert g.phrase in {"black shirt", "red hat"}
        assert (
            region.x0 <= g.box.x0 <= g.box.x1 <= region.x1 and region.y0 <= g.box.y0 <= g.box.y1 <= region.y1
        )
    for g in out[1]:
        assert g.phrase == "dog" and 0 <= g.box.x0 <= g.box.x1 <= 120 and 0 <= g.box.y0 <= g.box.y1 <= 90
    scores = [g.score for g in out[0]]
    assert scores == sorted(scores, reverse=True)


def _force_outputs(detector, boxes_cxcywh, hot_token):
    """Replace the model's raw outputs: query 0 gets `boxes_cxcywh` and a high score on token `hot_token`."""

    def hook(module, args, output):
        output.pred_boxes = torch.tensor(boxes_cxcywh, dtype=torch.float32).expand(
            output.pred_boxes.shape[0], 1, 4
        )
        logits = torch.full((output.logits.shape[0], 1, output.logits.shape[2]), -20.0)
        logits[:, 0, hot_token] = 20.0
        output.logits = logits
        return output

    return detector.model.register_forward_hook(hook)


def test_region_boxes_map_back_to_frame_and_clip(detector):
    region = Box(x0=40, y0=20, x1=100, y1=80)  # crop 60 x 60 at (40, 20)
    # token 3 of "[CLS] black shirt . red hat . [SEP]" is "."; token 4 is "red"
    handle = _force_outputs(detector, [0.5, 0.5, 0.5, 0.5], hot_token=4)
    try:
        (found,) = detector.detect([_image()], [["black shirt", "red hat"]], [region])
    finally:
        handle.remove()
    assert [g.phrase for g in found] == ["red hat"]
    assert found[0].box.as_tuple() == pytest.approx((40 + 15, 20 + 15, 40 + 45, 20 + 45))

    # a box reaching past the crop's right edge is clipped to the region
    handle = _force_outputs(detector, [1.0, 0.5, 1.0, 0.5], hot_token=1)
    try:
        (found,) = detector.detect([_image()], [["black shirt", "red hat"]], [region])
    finally:
        handle.remove()
    assert found[0].phrase == "black shirt"
    assert found[0].box.as_tuple() == pytest.approx((70, 35, 100, 65))


def test_empty_region_and_batching(detector):
    calls = []
    handle = detector.model.register_forward_hook(lambda m, a, o: calls.append(o.logits.shape[0]))
    try:
        out = detector.detect(
            [_image(seed=i) for i in range(4)],
            [["dog"], ["hat"], ["cup"], ["dog"]],
            [None, Box(x0=500, y0=500, x1=600, y1=600), None, None],  # region 2 lies off the frame
        )
    finally:
        handle.remove()
    assert out[1] == [] and all(out[i] for i in (0, 2, 3))
    assert calls == [2, 1]  # three searches, batch_size 2


def test_input_validation_and_load_errors(tmp_path, detector):
    with pytest.raises(ValueError, match="phrase lists"):
        detector.detect([_image()], [])
    with pytest.raises(ModelLoadError, match="unknown grounding-dino options"):
        GROUNDERS.build(_spec(box_treshold=0.3))
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        GROUNDERS.build(ModelSpec(backend="grounding-dino", weights=str(tmp_path), device="cpu"))
    with pytest.raises(ModelLoadError, match="unknown grounder backend"):
        GROUNDERS.build(ModelSpec(backend="owlvit", device="cpu"))
