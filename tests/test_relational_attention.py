"""Relational attention kernels (dense and FlexAttention) against the loop reference; the processor."""

from __future__ import annotations

import random
import threading

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor
from reference_relational import (
    random_conditions,
    ref_attention,
    ref_csam,
    ref_exact_mcam_attention,
    ref_mcam_bias,
)

from lumosx_model.attention import (
    RelationalAttnProcessor,
    RelationalContext,
    current_context,
    masked_self_attention,
    mcam_cross_attention,
    relational_context,
)
from lumosx_model.layout import Condition, SampleLayout
from lumosx_model.masks import csam_block_mask, csam_dense

# Eager FlexAttention (unfused, CPU) is what these tests check against the reference; the GPU compiles it.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

GRID = (2, 2, 3)  # video T', H', W'


def random_layouts(seed: int, size: int = 3) -> list[SampleLayout]:
    rng = random.Random(seed)
    return [
        SampleLayout.from_conditions(Condition(*c) for c in random_conditions(rng, max_persons=2))
        for _ in range(size)
    ]


def qkv(bsz, lq, lk, heads=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(bsz, lq, heads, dim, generator=g),
        torch.randn(bsz, lk, heads, dim, generator=g),
        torch.randn(bsz, lk, heads, dim, generator=g),
    )


def self_attention_case(seed):
    layouts = random_layouts(seed)
    seq_len = 12 + 6 * max(len(lay) for lay in layouts)
    q, k, v = qkv(len(layouts), seq_len, seq_len, seed=seed)
    conds = [[(c.kind, c.label, c.group) for c in lay.conditions] for lay in layouts]
    expected = ref_attention(q, k, v, allowed=ref_csam(conds, *GRID, seq_len))
    return layouts, seq_len, (q, k, v), expected


def cross_attention_case(seed, n=3, grid_hw=(3, 4), ltxt=7):
    q, k, v = qkv(2, n * grid_hw[0] * grid_hw[1], ltxt, seed=seed)
    templates = torch.randint(-1, 2, (2, n, ltxt), generator=torch.Generator().manual_seed(seed)).float()
    templates[1, -1] = 0  # a padding slot
    return q, k, v, templates


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_self_attention_matches_reference(seed):
    layouts, seq_len, (q, k, v), expected = self_attention_case(seed)
    mask = csam_dense(layouts, GRID, seq_len)[:, None]
    out = masked_self_attention(q, k, v, mask, backend="dense")
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_flex_self_attention_matches_reference(seed):
    layouts, seq_len, (q, k, v), expected = self_attention_case(seed)
    block_mask = csam_block_mask(layouts, GRID, seq_len, "cpu")
    with torch.no_grad():  # FlexAttention has no CPU backward
        out = masked_self_attention(q, k, v, block_mask, backend="flex", compiled=False)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["paper", "release"])
@pytest.mark.parametrize("backend", ["dense", "flex"])
def test_pooled_mcam_cross_attention_matches_reference(backend, mode):
    q, k, v, templates = cross_attention_case(0)
    bias = ref_mcam_bias(q, k, templates, 3, 4, ratio=0.5, mode=mode, pool=2)
    expected = ref_attention(q, k, v, bias=bias)
    with torch.no_grad():
        out = mcam_cross_attention(
            q, k, v, templates, (3, 4), ratio=0.5, mode=mode, pool=2, backend=backend, compiled=False
        )
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["dense", "flex"])
def test_exact_mcam_cross_attention_matches_reference(backend):
    q, k, v, templates = cross_attention_case(1)
    expected = ref_exact_mcam_attention(q, k, v, templates, 3, 4, ratio=0.5)
    with torch.no_grad():
        out = mcam_cross_attention(
            q, k, v, templates, (3, 4), ratio=0.5, mode="exact", backend=backend, compiled=False
        )
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-4)


def test_mcam_bias_changes_attention_only_where_templates_are_nonzero():
    q, k, v, templates = cross_attention_case(2)
    plain = ref_attention(q, k, v)
    out = mcam_cross_attention(q, k, v, templates, (3, 4), ratio=0.5, mode="exact")
    padding_rows = slice(2 * 12, 3 * 12)  # sample 1's zeroed last slot
    torch.testing.assert_close(out[1, padding_rows].double(), plain[1, padding_rows], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out[0].double(), plain[0], atol=1e-3)


def test_dense_kernels_backpropagate():
    layouts, seq_len, (q, k, v), _ = self_attention_case(0)
    q.requires_grad_(True)
    mask = csam_dense(layouts, GRID, seq_len)[:, None]
    masked_self_attention(q, k, v, mask, backend="dense").sum().backward()
    assert torch.isfinite(q.grad).all()
    for mode in ("paper", "release", "exact"):
        qc, kc, vc, templates = cross_attention_case(3)
        qc.requires_grad_(True)
        mcam_cross_attention(
            qc, kc, vc, templates, (3, 4), ratio=0.5, mode=mode, pool=2
        ).square().sum().backward()
        assert torch.isfinite(qc.grad).all() and qc.grad.abs().sum() > 0


@pytest.mark.slow
def test_compiled_flex_kernels_match_dense():
    """The fused path the GPU runs, compiled for CPU (~30-60 s of compilation)."""
    layouts, seq_len, (q, k, v), expected = self_attention_case(0)
    block_mask = csam_block_mask(layouts, GRID, seq_len, "cpu")
    qc, kc, vc, templates = cross_attention_case(1)
    with torch.no_grad():
        out = masked_self_attention(q, k, v, block_mask, backend="flex", compiled=True)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-4)
        fused = mcam_cross_attention(qc, kc, vc, templates, (3, 4), ratio=0.5, mode="exact", backend="flex")
        dense = mcam_cross_attention(qc, kc, vc, templates, (3, 4), ratio=0.5, mode="exact", backend="dense")
    torch.testing.assert_close(fused, dense, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- processor


def wan_attention(cross: bool) -> WanAttention:
    torch.manual_seed(0)
    return WanAttention(
        dim=32, heads=2, dim_head=16, eps=1e-6, cross_attention_dim_head=16 if cross else None
    )


def test_processor_without_context_is_wan_processor():
    x, text = torch.randn(2, 10, 32), torch.randn(2, 5, 32)
    rotary = (torch.randn(1, 10, 1, 16), torch.randn(1, 10, 1, 16))
    for cross in (False, True):
        attn = wan_attention(cross)
        args = (x, text if cross else None, None, None if cross else rotary)
        expected = WanAttnProcessor()(attn, *args)
        torch.testing.assert_close(RelationalAttnProcessor()(attn, *args), expected, rtol=0, atol=0)


def test_processor_with_context_applies_mask_and_bias():
    video, hw = 4, 3  # 4 video tokens, 2 condition frames of 3 tokens
    x, text = torch.randn(1, video + 2 * hw, 32), torch.randn(1, 5, 32)
    ones = torch.ones(1, 1, 1, 16)
    allow_all = torch.ones(1, 1, video + 2 * hw, video + 2 * hw, dtype=torch.bool)
    zero_templates = torch.zeros(1, 2, 5)
    ctx = RelationalContext(
        num_video_tokens=video,
        grid_hw=(1, hw),
        backend="dense",
        self_mask=allow_all,
        templates=zero_templates,
        mcam_mode="exact",
    )
    with relational_context(ctx):
        for cross in (False, True):  # an all-true mask and zero templates change nothing
            attn = wan_attention(cross)
            args = (x, text if cross else None, None, None if cross else (ones, ones * 0))
            torch.testing.assert_close(
                RelationalAttnProcessor()(attn, *args), WanAttnProcessor()(attn, *args), atol=1e-6, rtol=1e-5
            )
    attn = wan_attention(True)
    biased = RelationalContext(
        num_video_tokens=video,
        grid_hw=(1, hw),
        backend="dense",
        self_mask=allow_all,
        templates=torch.ones(1, 2, 5),
        mcam_mode="exact",
    )
    plain = WanAttnProcessor()(attn, x, text)
    with relational_context(biased):
        out = RelationalAttnProcessor()(attn, x, text)
    torch.testing.assert_close(out[:, :video], plain[:, :video], atol=1e-6, rtol=1e-5)  # video rows: no bias
    assert not torch.allclose(out[:, video:], plain[:, video:], atol=1e-4)


def test_context_is_nested_and_thread_local():
    a = RelationalContext(1, (1, 1), "dense", None)
    b = RelationalContext(2, (1, 1), "dense", None)
    seen = []
    with relational_context(a):
        with relational_context(b):
            assert current_context() is b
            thread = threading.Thread(target=lambda: seen.append(current_context()))
            thread.start()
            thread.join()
        assert current_context() is a
    assert current_context() is None and seen == [None]
