"""SAM adapters (segment-anything and transformers) on tiny random-weight builds; safe checkpoint loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.base import ModelLoadError, ModelSpec
from models.segmenter import SEGMENTERS, _best_masks, build_sam_from_checkpoint, load_sam_state_dict, tiny_sam
from schemas.records import Box

BACKENDS = ["sam", "sam-hf"]


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=BACKENDS)
def segmenter(request):
    return SEGMENTERS.build(ModelSpec(backend=request.param, random_init=True, device="cpu", batch_size=2))


def _encoder(segmenter) -> torch.nn.Module:
    model = segmenter.model
    return model.image_encoder if hasattr(model, "image_encoder") else model.vision_encoder


def test_one_full_size_mask_per_box_and_batched_encoder(segmenter):
    images = [_image(100, 80), _image(50, 60, 1), _image(30, 30, 2), _image(64, 48, 3)]
    boxes = [
        [Box(x0=10, y0=20, x1=50, y1=70), Box(x0=0, y0=0, x1=100, y1=80), Box(x0=60, y0=5, x1=90, y1=30)],
        [Box(x0=1, y0=1, x1=20, y1=30)],
        [],
        [Box(x0=5, y0=5, x1=40, y1=40)],
    ]
    seen = []
    handle = _encoder(segmenter).register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    try:
        out = segmenter.segment(images, boxes)
    finally:
        handle.remove()
    assert [len(o) for o in out] == [3, 1, 0, 1]
    for image, preds in zip(images, out):
        for p in preds:
            assert p.mask.dtype == bool and p.mask.shape == (image.height, image.width)
            assert np.isfinite(p.score)
    assert seen == [2, 1]  # images with boxes, encoded batch_size at a time
    # deterministic: same input, same masks
    again = segmenter.segment(images[:1], boxes[:1])[0]
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(out[0], again))


def test_multimask_option_keeps_one_mask_per_box():
    for backend in BACKENDS:
        seg = SEGMENTERS.build(
            ModelSpec(backend=backend, random_init=True, device="cpu", options={"multimask_output": True})
        )
        (preds,) = seg.segment(
            [_image(40, 30)], [[Box(x0=2, y0=2, x1=20, y1=20), Box(x0=5, y0=5, x1=35, y1=25)]]
        )
        assert len(preds) == 2 and preds[0].mask.shape == (30, 40)


def test_best_masks_picks_highest_predicted_iou():
    masks = torch.zeros(2, 3, 4, 4, dtype=torch.bool)
    masks[0, 2] = True
    masks[1, 0, 0, 0] = True
    scores = torch.tensor([[0.1, 0.2, 0.9], [0.8, 0.1, 0.3]])
    preds = _best_masks(masks, scores)
    assert preds[0].mask.all() and preds[0].score == pytest.approx(0.9)
    assert preds[1].mask.sum() == 1 and preds[1].score == pytest.approx(0.8)


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    source = tiny_sam()
    path = tmp_path / "sam_tiny.pth"
    torch.save(source.state_dict(), path)
    target = tiny_sam()
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    load_sam_state_dict(target, path)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))

    from safetensors.torch import save_file

    st = tmp_path / "sam_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(st))
    load_sam_state_dict(tiny_sam(), st)


class _NotATensor:  # a pickled object would run code on load: weights_only must refuse it
    pass


def test_checkpoint_with_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"payload": _NotATensor()}, path)
    with pytest.raises(ModelLoadError, match="plain tensors"):
        load_sam_state_dict(tiny_sam(), path)


def test_sam_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="needs `weights`"):
        SEGMENTERS.build(ModelSpec(backend="sam", device="cpu"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        SEGMENTERS.build(ModelSpec(backend="sam", weights=str(tmp_path / "sam_vit_h.pth"), device="cpu"))
    ckpt = tmp_path / "sam_tiny.pth"
    torch.save(tiny_sam().state_dict(), ckpt)
    with pytest.raises(ModelLoadError, match="unknown SAM model_type"):
        build_sam_from_checkpoint(str(ckpt), "vit_x")
    with pytest.raises(ModelLoadError, match="does not fit"):
        build_sam_from_checkpoint(str(ckpt), "vit_b")  # the official vit_b architecture, a toy checkpoint
    with pytest.raises(ModelLoadError, match="unknown sam options"):
        SEGMENTERS.build(ModelSpec(backend="sam", random_init=True, options={"multimask": True}))
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        SEGMENTERS.build(ModelSpec(backend="sam-hf", weights=str(tmp_path), device="cpu"))


def test_mismatched_inputs(segmenter):
    with pytest.raises(ValueError, match="box lists"):
        segmenter.segment([_image(10, 10)], [])
