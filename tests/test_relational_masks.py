"""CSAM masks and MCAM templates / paper and release biases against the loop reference, on random batches of layouts."""

from __future__ import annotations

import random

import pytest
import torch
from reference_relational import random_conditions, ref_csam, ref_mcam_bias, ref_template, ref_word_mask

from lumosx_model.layout import Condition, SampleLayout
from lumosx_model.masks import (
    PAD,
    VIDEO,
    csam_block_mask,
    csam_dense,
    mcam_bias_paper,
    mcam_bias_release,
    mcam_template,
    pad_templates,
    token_segments,
    word_mask,
)


def layout_of(conds) -> SampleLayout:
    return SampleLayout.from_conditions(Condition(kind, label, group) for kind, label, group in conds)


def as_tuples(layout):
    return [(c.kind, c.label, c.group) for c in layout.conditions]


def random_batch(rng, size):
    return [layout_of(random_conditions(rng)) for _ in range(size)]


@pytest.mark.parametrize("csam", [True, False])
def test_csam_dense_matches_reference_on_random_batches(csam):
    rng = random.Random(10 + csam)
    grid = (2, 1, 3)
    for trial in range(12):
        layouts = random_batch(rng, rng.randint(2, 3))
        extra = 5 if trial % 3 == 0 else 0  # tail padding, e.g. to a kernel-friendly length
        seq_len = 6 + 3 * max(len(lay) for lay in layouts) + extra
        got = csam_dense(layouts, grid, seq_len, csam=csam)
        expected = ref_csam([as_tuples(lay) for lay in layouts], *grid, seq_len, csam=csam)
        assert torch.equal(got, expected)


def test_csam_semantics_on_a_small_example():
    layout = layout_of([("object", "cup", -1), ("face", "man", 0), ("attribute", "hat", 0)])
    mask = csam_dense([layout, layout_of([("face", "woman", 0)])], (1, 1, 2))
    video, cup, face, hat = slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)
    m = mask[0]
    assert m[video].all()  # video sees everything real
    assert m[cup, cup].all() and not m[cup, video].any() and not m[cup, face].any()
    assert m[face, hat].all() and m[hat, face].all()  # one group = one block
    assert not m[face, cup].any() and not m[hat, video].any()
    # sample 1 has one condition and two padding slots: nobody attends to padding, padding only to itself
    m1 = mask[1]
    pad = slice(4, 8)
    assert not m1[:4, pad].any()
    assert torch.equal(m1[pad, :], torch.eye(8, dtype=torch.bool)[pad, :])


def test_token_segments_and_seq_len_check():
    layouts = [layout_of([("background", "bg", -1), ("face", "a", 0)])]
    seg = token_segments(layouts, (1, 1, 1), 4)
    assert seg.tolist() == [[VIDEO, 0, 1, PAD]]
    with pytest.raises(ValueError, match="shorter"):
        token_segments(layouts, (1, 1, 1), 2)


@pytest.mark.parametrize("csam", [True, False])
def test_block_mask_encodes_the_dense_mask(csam):
    rng = random.Random(3)
    layouts = random_batch(rng, 3)
    grid = (1, 2, 3)
    seq_len = 6 + 6 * max(len(lay) for lay in layouts)
    block_mask = csam_block_mask(layouts, grid, seq_len, "cpu", csam=csam, block_size=16)
    dense = csam_dense(layouts, grid, seq_len, csam=csam)
    b, q, k = torch.meshgrid(*(torch.arange(n) for n in dense.shape), indexing="ij")
    evaluated = block_mask.mask_mod(b, torch.zeros_like(b), q, k)
    assert torch.equal(evaluated, dense)
    assert block_mask.shape == (3, 1, seq_len, seq_len)


def test_word_mask_marks_every_contiguous_match():
    prompt = [5, 1, 2, 9, 1, 2, 1, 2, 3]
    assert word_mask(prompt, [1, 2]).tolist() == [0, 1, 1, 0, 1, 1, 1, 1, 0]
    assert word_mask(prompt, [2, 1, 2]).tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 0]
    assert not word_mask(prompt, [7]).any()
    assert not word_mask([1], [1, 2]).any()
    with pytest.raises(ValueError, match="empty"):
        word_mask(prompt, [])


def test_word_mask_matches_reference_randomly():
    rng = random.Random(4)
    for _ in range(200):
        prompt = [rng.randint(0, 3) for _ in range(rng.randint(0, 12))]
        label = [rng.randint(0, 3) for _ in range(rng.randint(1, 3))]
        assert word_mask(prompt, label).tolist() == ref_word_mask(prompt, label)


def test_mcam_template_levels_for_two_and_three_persons():
    # prompt: "man(1) hat(2) woman(3) scarf(4) kid(5) dog(6)"
    prompt = [1, 2, 3, 4, 5, 6]
    two = layout_of(
        [("face", "man", 0), ("attribute", "hat", 0), ("face", "woman", 1), ("object", "dog", -1)]
    )
    tmpl = mcam_template(two, prompt, [[6], [1], [2], [3]])  # canonical order: dog, man, hat, woman
    assert tmpl.tolist() == [
        [0, 0, 0, 0, 0, 1],
        [1, 1, -1, 0, 0, 0],
        [1, 1, -1, 0, 0, 0],
        [-1, -1, 1, 0, 0, 0],
    ]
    three = layout_of([("face", "man", 0), ("face", "woman", 1), ("face", "kid", 2)])
    tmpl = mcam_template(three, prompt, [[1], [3], [5]])
    assert tmpl[0].tolist() == [1, 0, -0.5, 0, -0.5, 0]
    one = layout_of([("face", "man", 0), ("attribute", "hat", 0)])
    assert mcam_template(one, prompt, [[1], None]).tolist() == [[1, 0, 0, 0, 0, 0]] * 2
    with pytest.raises(ValueError, match="label token lists"):
        mcam_template(one, prompt, [[1]])


def test_mcam_template_matches_reference_on_random_layouts():
    rng = random.Random(5)
    for _ in range(80):
        layout = layout_of(random_conditions(rng))
        prompt = [rng.randint(0, 6) for _ in range(rng.randint(1, 16))]
        labels = [
            None if rng.random() < 0.15 else [rng.randint(0, 6) for _ in range(rng.randint(1, 2))]
            for _ in layout.conditions
        ]
        got = mcam_template(layout, prompt, labels)
        expected = ref_template(as_tuples(layout), prompt, labels)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_pad_templates():
    out = pad_templates([torch.ones(2, 3), torch.ones(1, 6)], 3, 4)
    assert out.shape == (2, 3, 4)
    assert out[0].sum() == 6 and out[0, :, 3].sum() == 0 and out[1].sum() == 4
    with pytest.raises(ValueError, match="slots"):
        pad_templates([torch.ones(4, 3)], 3, 4)


@pytest.mark.parametrize("grid_hw, pool", [((4, 4), 2), ((5, 7), 3), ((3, 2), 8), ((6, 5), 1)])
def test_mcam_bias_paper_matches_reference(grid_hw, pool):
    torch.manual_seed(0)
    bsz, n, heads, dim, ltxt = 2, 3, 2, 8, 5
    hw = grid_hw[0] * grid_hw[1]
    q = torch.randn(bsz, n * hw, heads, dim, dtype=torch.float64)
    k = torch.randn(bsz, ltxt, heads, dim, dtype=torch.float64)
    templates = torch.randint(-1, 2, (bsz, n, ltxt)).double()
    got = mcam_bias_paper(q, k, templates, grid_hw, ratio=0.5, pool=pool)
    expected = ref_mcam_bias(q, k, templates, *grid_hw, ratio=0.5, mode="paper", pool=pool)
    torch.testing.assert_close(got, expected)
    if pool == 1:  # 1×1 tiles: the approximation is exact
        exact = ref_mcam_bias(q, k, templates, *grid_hw, ratio=0.5, mode="exact")
        torch.testing.assert_close(got, exact)


@pytest.mark.parametrize("grid_hw, pool", [((10, 12), 8), ((5, 7), 3), ((3, 2), 8), ((4, 6), 2)])
def test_mcam_bias_release_matches_reference(grid_hw, pool):
    torch.manual_seed(1)
    bsz, n, heads, dim, ltxt = 2, 2, 2, 4, 3
    hw = grid_hw[0] * grid_hw[1]
    q = torch.randn(bsz, n * hw, heads, dim, dtype=torch.float64)
    k = torch.randn(bsz, ltxt, heads, dim, dtype=torch.float64)
    templates = torch.randint(-1, 2, (bsz, n, ltxt)).double()
    got = mcam_bias_release(q, k, templates, grid_hw, ratio=0.5, pool=pool)
    expected = ref_mcam_bias(q, k, templates, *grid_hw, ratio=0.5, mode="release", pool=pool)
    torch.testing.assert_close(got, expected)


def test_mcam_bias_release_hand_computed_on_10x12():
    """10×12 grid, 8×8 tiles: padded to 16×16. With q = 1 on columns 0–7 and 4 on columns 8–11 (one head,
    d = 1, one text key equal to 1, M = 1, r = 1) the bias is the tile mean of q:

    * paper: tiles average their valid tokens, so every token gets its own q (1 or 4);
    * release: tile (0, 0) = 64·1/64 = 1, tile (0, 1) = 32·4/64 = 2 (its 32 padding zeros count), and token
      ``i = 12y + x`` reads padded position ``(i // 16, i % 16)``, always in tile row 0 since i < 128.
    """
    hh, ww = 10, 12
    q_grid = torch.ones(hh, ww, dtype=torch.float64)
    q_grid[:, 8:] = 4.0
    q = q_grid.reshape(1, hh * ww, 1, 1)
    k = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    templates = torch.ones(1, 1, 1, dtype=torch.float64)
    paper = mcam_bias_paper(q, k, templates, (hh, ww), ratio=1.0).reshape(hh, ww)
    release = mcam_bias_release(q, k, templates, (hh, ww), ratio=1.0).reshape(hh, ww)
    torch.testing.assert_close(paper, q_grid)
    expected = torch.tensor(
        [[1.0 if (12 * y + x) % 16 < 8 else 2.0 for x in range(ww)] for y in range(hh)], dtype=torch.float64
    )
    torch.testing.assert_close(release, expected)
    # Spot checks, by hand:
    assert release[0, 8] == 2.0  # own tile (0, 1), but the padding halves the mean (paper: 4)
    assert release[1, 0] == 2.0  # i = 12 -> padded (0, 12): shifted into tile (0, 1) (paper: 1)
    assert release[1, 4] == 1.0  # i = 16 -> padded (1, 0): tile (0, 0)
    assert release[9, 11] == 1.0  # i = 119 -> padded (7, 7): tile (0, 0) (paper: 4)
    assert release[8, 0] == 1.0  # i = 96 -> padded (6, 0): tile (0, 0) although the token lies in tile row 1
    assert (release != paper).float().mean() > 0.5


@pytest.mark.parametrize("grid_hw", [(8, 8), (16, 24), (24, 8)])
def test_mcam_bias_release_equals_paper_on_multiples_of_the_tile(grid_hw):
    torch.manual_seed(2)
    n, heads, dim, ltxt = 2, 2, 8, 6
    q = torch.randn(2, n * grid_hw[0] * grid_hw[1], heads, dim)
    k = torch.randn(2, ltxt, heads, dim)
    templates = torch.randint(-1, 2, (2, n, ltxt)).float()
    release = mcam_bias_release(q, k, templates, grid_hw, ratio=0.5, pool=8)
    torch.testing.assert_close(release, mcam_bias_paper(q, k, templates, grid_hw, ratio=0.5, pool=8))
