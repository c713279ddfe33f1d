"""FLUX Fill adapter on a tiny random-weight FluxFillPipeline: sizes, compositing, seeds, batching, errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from models.base import ModelLoadError, ModelSpec
from models.inpainter import (
    INPAINTERS,
    clean_plate,
    clean_plates,
    composite,
    plate_prompt,
    working_mask,
    working_size,
)


@pytest.fixture(scope="module")
def inpainter():
    return INPAINTERS.build(
        ModelSpec(
            backend="flux-fill",
            random_init=True,
            device="cpu",
            batch_size=2,
            options={"num_inference_steps": 2, "max_sequence_length": 32, "max_side": 64},
        )
    )


def _frame(w: int = 90, h: int = 70, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _mask(w: int = 90, h: int = 70) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[10:40, 20:55] = True
    return m


def test_prompt_and_working_size():
    assert plate_prompt("lush garden") == "lush garden, empty scene, no people"
    assert plate_prompt("  modern kitchen. ") == "modern kitchen, empty scene, no people"
    assert plate_prompt(None) == plate_prompt("") == "empty scene, no people"
    assert working_size(1280, 720, 1024, 16) == (1024, 576)
    assert working_size(90, 70, 1024, 16) == (80, 64)  # never upscaled, rounded down to the latent grid
    assert working_size(4000, 10, 1024, 16) == (1024, 16)


def test_plate_has_frame_size_and_changes_only_masked_pixels(inpainter):
    frame, mask = _frame(), _mask()
    plate = clean_plate(inpainter, frame, mask, "lush garden", seed=1)
    assert plate.size == frame.size and plate.mode == "RGB"
    before, after = np.asarray(frame), np.asarray(plate)
    changed = (before != after).any(axis=-1)
    assert not changed[~mask].any()
    assert changed[mask].mean() > 0.9  # random weights repaint nearly everything they may


def test_seeds_are_reproducible_and_independent_of_batching(inpainter):
    frame, mask = _frame(), _mask()
    a = np.asarray(clean_plate(inpainter, frame, mask, "lush garden", seed=1))
    assert np.array_equal(a, np.asarray(clean_plate(inpainter, frame, mask, "lush garden", seed=1)))
    assert not np.array_equal(a, np.asarray(clean_plate(inpainter, frame, mask, "lush garden", seed=2)))
    calls = []
    handle = inpainter.pipe.transformer.register_forward_hook(lambda m, args, out: calls.append(1))
    try:
        plates = clean_plates(
            inpainter,
            [frame, _frame(seed=1), _frame(seed=2), _frame(64, 48, seed=3)],
            [mask, mask, np.zeros((70, 90), bool), _mask(64, 48)],
            ["lush garden", "lush garden", "room", None],
            seeds=[1, 7, 3, 4],
        )
    finally:
        handle.remove()
    assert np.array_equal(np.asarray(plates[0]), a)  # batched with another frame: same plate
    assert np.array_equal(np.asarray(plates[2]), np.asarray(_frame(seed=2)))  # nothing to remove
    assert plates[3].size == (64, 48)
    # two working sizes -> two pipeline calls of 2 denoising steps each; the empty mask costs nothing
    assert len(calls) == 4


def test_working_mask_keeps_thin_parts():
    mask = np.zeros((70, 90), dtype=bool)
    mask[:, 45] = True  # one pixel wide: a nearest-neighbour downscale can drop it
    small = np.asarray(working_mask(mask, (30, 20)))
    assert set(np.unique(small)) == {0, 255}
    assert (small[:, 15] == 255).all() and (small[:, :14] == 0).all() and (small[:, 16:] == 0).all()


def test_composite_keeps_original_outside_mask():
    orig, filled = _frame(), Image.new("RGB", (40, 30), (1, 2, 3))
    mask = _mask()
    out = np.asarray(composite(orig, filled, mask))
    assert (out[mask] == (1, 2, 3)).all() and np.array_equal(out[~mask], np.asarray(orig)[~mask])


def test_errors(tmp_path, inpainter):
    with pytest.raises(ValueError, match="does not match"):
        inpainter.inpaint([_frame()], [np.ones((10, 10), bool)], ["x"], [0])
    with pytest.raises(ValueError, match="as many"):
        inpainter.inpaint([_frame()], [_mask()], [], [0])
    with pytest.raises(ModelLoadError, match="unknown flux-fill options"):
        INPAINTERS.build(ModelSpec(backend="flux-fill", random_init=True, options={"steps": 2}))
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        INPAINTERS.build(ModelSpec(backend="flux-fill", weights=str(tmp_path), device="cpu"))
