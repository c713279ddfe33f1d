"""RAFT optical flow: the torchvision code path with random weights (no RAFT weights exist offline).

Random weights give noise, so these tests check what does not depend on the weights: output shape and units
layout, padding of any frame size, batching, and the weight-loading paths (a local state dict loads with
weights_only and reproduces the same network).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.base import ModelLoadError, ModelSpec
from models.optical_flow import MIN_SIDE, OPTICAL_FLOW, pad_amounts

SPEC = dict(backend="raft-small", random_init=True, device="cpu", options={"num_flow_updates": 2})


@pytest.fixture(scope="module")
def raft():
    return OPTICAL_FLOW.build(ModelSpec(**SPEC, batch_size=2))


def _shifted_pair(n: int, h: int, w: int, dx: int = 3):
    """Smooth random texture and the same texture moved dx pixels to the right."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (n, h // 4 + 2, w // 4 + 2, 3), dtype=np.uint8)
    big = base.repeat(4, axis=1).repeat(4, axis=2)[:, :h, : w + dx]
    return np.ascontiguousarray(big[:, :, dx:]), np.ascontiguousarray(big[:, :, :w])


def test_pad_amounts():
    assert pad_amounts(128, 160) == (0, 0, 0, 0)
    left, right, top, bottom = pad_amounts(37, 250)
    assert (37 + top + bottom, 250 + left + right) == (MIN_SIDE, 256)
    assert abs(left - right) <= 1 and abs(top - bottom) <= 1


def test_flow_shape_padding_and_batching(raft):
    assert raft.info.random_weights and raft.info.model_id == "torchvision/raft_small.C_T_V2"
    a, b = _shifted_pair(3, 37, 50)  # odd sides, smaller than RAFT's minimum: padded, flow cropped back
    flow = raft(a, b)
    assert flow.shape == (3, 2, 37, 50) and flow.dtype == np.float32 and np.isfinite(flow).all()
    one_by_one = OPTICAL_FLOW.build(ModelSpec(**SPEC, batch_size=1))
    np.testing.assert_allclose(one_by_one(a, b), flow, atol=1e-4)
    # Frame i of the first stack goes with frame i of the second: a reordered batch reorders the flow.
    np.testing.assert_allclose(raft(a[::-1], b[::-1]), flow[::-1], atol=1e-4)
    assert raft(a[:0], b[:0]).shape == (0, 2, 37, 50)


def test_bad_inputs_are_refused(raft):
    a, b = _shifted_pair(2, 40, 40)
    with pytest.raises(ValueError, match="differ in shape"):
        raft(a, b[:1])
    with pytest.raises(ValueError, match="uint8"):
        raft(a.astype(np.float32), b)


class NotWeights:
    """Any pickled object that is not tensors: torch.load(weights_only=True) must refuse it."""


def test_local_state_dict_loads_with_weights_only(tmp_path, raft):
    path = tmp_path / "raft_small.pth"
    torch.save(raft.model.state_dict(), path)
    loaded = OPTICAL_FLOW.build(
        ModelSpec(backend="raft-small", weights=str(path), device="cpu", options={"num_flow_updates": 2})
    )
    assert not loaded.info.random_weights and loaded.info.model_id == str(path)
    a, b = _shifted_pair(1, 40, 48)
    np.testing.assert_allclose(loaded(a, b), raft(a, b), atol=1e-5)

    pickled = tmp_path / "evil.pth"
    torch.save({"x": NotWeights()}, pickled)
    with pytest.raises(ModelLoadError, match="cannot load"):
        OPTICAL_FLOW.build(ModelSpec(backend="raft-small", weights=str(pickled)))
    with pytest.raises(ModelLoadError, match="not found"):
        OPTICAL_FLOW.build(ModelSpec(backend="raft-large", weights=str(tmp_path / "missing.pth")))
    with pytest.raises(ModelLoadError, match="C_T_V1, C_T_V2, C_T_SKHT_V1"):
        OPTICAL_FLOW.build(ModelSpec(backend="raft-large", weights="sintel"))
    with pytest.raises(ModelLoadError, match="unknown options"):
        OPTICAL_FLOW.build(ModelSpec(backend="raft-large", random_init=True, options={"iters": 3}))
