"""SampleLayout canonical order and R2PE positions, against the loop reference of SPEC §2."""

from __future__ import annotations

import random

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from reference_relational import random_conditions, ref_positions

from lumosx_model.layout import Condition, LayoutError, SampleLayout
from lumosx_model.positions import batch_positions, gather_rotary, r2pe_positions


def layout_of(conds) -> SampleLayout:
    return SampleLayout.from_conditions(Condition(kind, label, group) for kind, label, group in conds)


def as_tuples(layout: SampleLayout):
    return [(c.kind, c.label, c.group) for c in layout.conditions]


def test_from_conditions_orders_canonically_and_renumbers_groups():
    layout = SampleLayout.from_conditions(
        [
            Condition("attribute", "red hat", 7),
            Condition("face", "woman", 3),
            Condition("object", "dog", -1),
            Condition("face", "man", 7),
            Condition("background", "garden", -1),
            Condition("attribute", "blue scarf", 3),
            Condition("object", "ball", -1),
        ]
    )
    assert as_tuples(layout) == [
        ("background", "garden", -1),
        ("object", "dog", -1),
        ("object", "ball", -1),
        ("face", "man", 0),  # group 7 appeared first
        ("attribute", "red hat", 0),
        ("face", "woman", 1),
        ("attribute", "blue scarf", 1),
    ]
    assert layout.num_groups == 2 and layout.num_bo == 3 and len(layout) == 7
    assert layout.block_ids() == [0, 1, 2, 3, 3, 4, 4]
    assert layout.token_ranges((2, 3, 4)) == [(24 + 12 * i, 36 + 12 * i) for i in range(7)]


def test_whole_person_cutout_is_a_group_with_one_face_kind_image():
    layout = SampleLayout.from_conditions([Condition("face", "man in a suit", 0)])
    assert layout.num_groups == 1 and layout.block_ids() == [0]


@pytest.mark.parametrize(
    "conds, message",
    [
        ([Condition("background", "a", -1), Condition("background", "b", -1)], "at most one background"),
        ([Condition("attribute", "hat", 0)], "exactly one face"),
        ([Condition("face", "a", 0), Condition("face", "b", 0)], "exactly one face"),
    ],
)
def test_from_conditions_rejects_invalid_samples(conds, message):
    with pytest.raises(LayoutError, match=message):
        SampleLayout.from_conditions(conds)


def test_condition_and_constructor_validation():
    with pytest.raises(LayoutError, match="unknown condition kind"):
        Condition("person", "x", 0)
    with pytest.raises(LayoutError, match="group index"):
        Condition("face", "x")
    with pytest.raises(LayoutError, match="group=-1"):
        Condition("object", "x", 2)
    with pytest.raises(LayoutError, match="non-empty"):
        Condition("object", "  ")
    with pytest.raises(LayoutError, match="canonical order"):
        SampleLayout((Condition("face", "a", 0), Condition("object", "b")))
    with pytest.raises(LayoutError, match="numbered 0..G-1"):
        SampleLayout((Condition("face", "a", 1),))
    with pytest.raises(LayoutError, match="directly follow"):
        SampleLayout((Condition("face", "a", 0), Condition("face", "b", 1), Condition("attribute", "c", 0)))


def test_from_conditions_is_idempotent_on_random_layouts():
    rng = random.Random(0)
    for _ in range(100):
        layout = layout_of(random_conditions(rng))
        assert SampleLayout.from_conditions(layout.conditions) == layout
        kinds = [c.kind for c in layout.conditions]
        assert kinds.count("background") <= 1


@pytest.mark.parametrize("r2pe", [True, False])
def test_r2pe_positions_match_reference_on_random_layouts(r2pe):
    rng = random.Random(1 + r2pe)
    for _ in range(60):
        layout = layout_of(random_conditions(rng))
        grid = (rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 4))
        got = r2pe_positions(layout, grid, r2pe=r2pe)
        expected = torch.tensor(ref_positions(as_tuples(layout), *grid, r2pe=r2pe))
        assert got.dtype == torch.long
        assert torch.equal(got, expected)


def test_r2pe_worked_example():
    # background, one object, one person with two attributes; video grid T=2, H'=1, W'=2.
    layout = SampleLayout.from_conditions(
        [
            Condition("background", "street", -1),
            Condition("object", "bike", -1),
            Condition("face", "man", 0),
            Condition("attribute", "cap", 0),
            Condition("attribute", "coat", 0),
        ]
    )
    pos = r2pe_positions(layout, (2, 1, 2)).tolist()
    cond = [pos[4 + 2 * i : 6 + 2 * i] for i in range(5)]
    assert cond[0] == [[2, 0, 0], [2, 0, 1]]  # background at T + 0
    assert cond[1] == [[3, 0, 0], [3, 0, 1]]  # object at T + 1
    assert cond[2] == [[4, 0, 0], [4, 0, 1]]  # face: T + N_bo + g = 4, unshifted
    assert cond[3] == [[4, 1, 2], [4, 1, 3]]  # attribute 1: shifted by (H', W')
    assert cond[4] == [[4, 2, 4], [4, 2, 5]]  # attribute 2: shifted by 2·(H', W')


def test_batch_positions_pads_slots():
    layouts = [layout_of([("face", "a", 0)]), layout_of([("object", "x", -1), ("face", "a", 0)])]
    pos = batch_positions(layouts, (1, 2, 2), 3)
    assert pos.shape == (2, 4 + 3 * 4, 3)
    assert torch.equal(pos[1, : 4 + 8], r2pe_positions(layouts[1], (1, 2, 2)))
    with pytest.raises(ValueError, match="slots"):
        batch_positions(layouts, (1, 2, 2), 1)


@pytest.mark.parametrize("head_dim, grid", [(32, (3, 5, 7)), (128, (21, 30, 52))])
def test_gathered_rotary_at_video_grid_equals_wan_builtin(head_dim, grid):
    rope = WanRotaryPosEmbed(head_dim, (1, 2, 2), 1024)
    t, h, w = grid
    builtin_cos, builtin_sin = rope(torch.empty(1, 16, t, 2 * h, 2 * w, device="meta"))
    video_only = r2pe_positions(SampleLayout(()), grid)
    cos, sin = gather_rotary(rope, video_only)
    assert cos.shape == builtin_cos.shape == (1, t * h * w, 1, head_dim)
    assert torch.equal(cos, builtin_cos) and torch.equal(sin, builtin_sin)


def test_gather_rotary_rejects_out_of_range_positions():
    rope = WanRotaryPosEmbed(32, (1, 2, 2), 16)
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        gather_rotary(rope, torch.tensor([[0, 0, 16]]))
