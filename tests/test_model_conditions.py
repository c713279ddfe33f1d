"""Conditions -> white canvases -> one-frame latents; train-time choices (caps, whole-person mode)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from model_fixtures import case_folder, one_torch_thread, png_bytes, sample  # noqa: F401 (one_torch_thread: autouse)
from PIL import Image

from lumosx_model.components import FrozenEncoders
from lumosx_model.conditions import (
    ConditionAugment,
    ConditionImage,
    SampleFormatError,
    condition_pixels,
    conditions_from_case,
    conditions_from_meta,
    encode_conditions,
    fit_on_white,
    layout_of,
    load_rgb,
)
from lumosx_model.config import AugmentConfig
from lumosx_model.layout import Condition
from schemas.official_case import read_case

CANVAS = (32, 48)  # (height, width)


def _meta_members(s: dict) -> tuple[dict, dict]:
    return json.loads(s["meta.json"]), {k: v for k, v in s.items() if isinstance(v, bytes)}


def _array(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image))


def test_fit_on_white_keeps_aspect_and_pads_white():
    out = _array(fit_on_white(Image.new("RGB", (10, 40), (0, 0, 0)), CANVAS))
    assert out.shape == (32, 48, 3)
    dark = (out.sum(-1) == 0).nonzero()
    # 10x40 fitted into 48x32 -> 8x32, centered: columns 20..27, all rows
    assert (
        dark[:, 1].min() == 20 and dark[:, 1].max() == 27 and dark[:, 0].min() == 0 and dark[:, 0].max() == 31
    )
    assert (out[:, :20] == 255).all() and (out[:, 28:] == 255).all()


def test_alpha_cutouts_become_white():
    img = load_rgb(png_bytes(6, 6, (10, 20, 30), alpha=True))
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((3, 3)) == (10, 20, 30)


@pytest.mark.parametrize("kind", ["face", "attribute", "object", "background"])
def test_augmentation_keeps_white_padding_and_is_seeded(kind):
    aug = ConditionAugment(AugmentConfig(), CANVAS)
    tall = Image.new("RGB", (10, 40), (30, 60, 90))
    outs = []
    for seed in range(6):
        out = _array(aug(tall, kind, seed=seed))
        assert out.shape == (32, 48, 3)
        # The image never leaves its fitted 8-px column (the crop keeps the fitted size, downscale shrinks,
        # affine keeps the image's own canvas), so everything outside it is padding and must be pure white.
        assert (out[:, :20] == 255).all() and (out[:, 28:] == 255).all()
        outs.append(out)
    assert torch.equal(outs[3], _array(aug(tall, kind, seed=3)))
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_augmentation_does_not_touch_the_global_rng():
    aug = ConditionAugment(AugmentConfig(), CANVAS)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    aug(Image.new("RGB", (20, 20), (1, 2, 3)), "face", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_condition_pixels_range_and_order():
    conds = [
        ConditionImage(Condition("face", "man", 0), Image.new("RGB", (10, 10), (0, 0, 0))),
        ConditionImage(Condition("attribute", "hat", 0), Image.new("RGB", (10, 10), (255, 255, 255))),
    ]
    px = condition_pixels(conds, CANVAS)
    assert px.shape == (2, 3, 32, 48) and px.min() == -1 and px.max() == 1
    assert px[0, :, 16, 24].eq(-1).all() and px[1].eq(1).all()
    assert condition_pixels([], CANVAS).shape == (0, 3, 32, 48)


def test_conditions_from_meta_canonical_order_and_labels():
    meta, members = _meta_members(sample("k", persons=2))
    conds = conditions_from_meta(meta, members, rng=random.Random(0), whole_person_prob=0.0)
    assert [(c.condition.kind, c.condition.label, c.condition.group) for c in conds] == [
        ("background", "garden", -1),
        ("object", "wooden table", -1),
        ("face", "man", 0),
        ("attribute", "black shirt", 0),
        ("attribute", "white hat", 0),
        ("face", "woman", 1),
        ("attribute", "red dress", 1),
        ("attribute", "blue scarf", 1),
    ]
    assert conds[5].image.size == (11, 12)  # images travel with their conditions (face of person 1)
    assert layout_of(conds).num_groups == 2


def test_caps_on_subjects_and_attributes():
    meta, members = _meta_members(sample("k", persons=4))
    for seed in range(10):
        conds = conditions_from_meta(
            meta, members, rng=random.Random(seed), max_subjects=3, max_attributes=1, whole_person_prob=0.0
        )
        assert layout_of(conds).num_groups == 3
        for g in range(3):
            assert sum(c.condition.kind == "attribute" and c.condition.group == g for c in conds) == 1
    kept = {
        tuple(
            c.condition.label
            for c in conditions_from_meta(
                meta, members, rng=random.Random(s), max_subjects=2, whole_person_prob=0.0
            )
            if c.condition.kind == "face"
        )
        for s in range(20)
    }
    assert len(kept) > 1  # a random subset, not always the first persons


def test_whole_person_mode_rate_and_shape():
    meta, members = _meta_members(sample("k", persons=1))
    rng = random.Random(0)
    n, whole = 2000, 0
    for _ in range(n):
        group = [
            c
            for c in conditions_from_meta(meta, members, rng=rng, whole_person_prob=0.3)
            if c.condition.group == 0
        ]
        if len(group) == 1:  # the whole-person cut-out alone, labelled with the person's phrase
            assert group[0].condition == Condition("face", "man", 0) and group[0].image.size == (8, 20)
            whole += 1
        else:
            assert len(group) == 3 and group[0].image.size == (10, 12)
    assert 0.26 < whole / n < 0.34
    always = conditions_from_meta(meta, members, rng=random.Random(0), whole_person_prob=1.0)
    assert [c.condition.kind for c in always] == ["background", "object", "face"]


def test_whole_person_mode_needs_a_whole_image():
    meta, members = _meta_members(sample("k", persons=2, whole=False))
    conds = conditions_from_meta(meta, members, rng=random.Random(0), whole_person_prob=1.0)
    assert sum(c.condition.kind == "attribute" for c in conds) == 4
    meta, members = _meta_members(sample("k", persons=2, schema_version=1))  # identity only, no labels
    conds = conditions_from_meta(meta, members, rng=random.Random(0), whole_person_prob=1.0)
    assert [c.condition for c in conds] == [Condition("face", None, 0), Condition("face", None, 1)]


def test_missing_member_is_a_clear_error():
    meta, members = _meta_members(sample("k", persons=1))
    del members["face_0.png"]
    with pytest.raises(SampleFormatError, match="face_0.png"):
        conditions_from_meta(meta, members, rng=random.Random(0), whole_person_prob=0.0)


def test_conditions_from_case(tmp_path):
    case = read_case(case_folder(tmp_path))
    conds = conditions_from_case(case)
    assert [c.condition.kind for c in conds] == [
        "background",
        "object",
        "face",
        "attribute",
        "face",
        "attribute",
    ]
    faces = conditions_from_case(case, identity_only=True)
    assert [c.condition for c in faces] == [Condition("face", "man", 0), Condition("face", "woman", 1)]


def test_encode_conditions_one_frame_each_with_zero_padding():
    enc = FrozenEncoders.tiny()
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 3, 32, 48) * 2 - 1
    lat = encode_conditions(enc, pixels, torch.tensor([3, 1]))
    assert lat.shape == (2, 3, 16, 4, 6)
    assert lat[1, 1:].eq(0).all() and lat[1, 0].abs().sum() > 0
    alone = enc.encode_images(pixels[0, 1:2])  # each image is its own one-frame latent: batch-independent
    torch.testing.assert_close(lat[0, 1:2], alone, rtol=1e-4, atol=1e-5)
    video_way = enc.encode_video(pixels[0, 1].unsqueeze(0).unsqueeze(2))[:, :, 0]
    torch.testing.assert_close(alone, video_way)


def test_whole_person_as_non_human_entry_like_the_release():
    meta, members = _meta_members(sample("k", persons=2))
    conds = conditions_from_meta(
        meta, members, rng=random.Random(0), whole_person_prob=1.0, whole_person_as_object=True
    )
    # Both persons become object-kind entries after the real objects: own word mask, no group, no negative level.
    assert [(c.condition.kind, c.condition.label, c.condition.group) for c in conds] == [
        ("background", "garden", -1),
        ("object", "wooden table", -1),
        ("object", "man", -1),
        ("object", "woman", -1),
    ]
    assert layout_of(conds).num_groups == 0
    # Same random draws as the default mode: with one whole person, the other keeps group 0.
    for seed in range(20):
        kw = dict(rng=random.Random(seed), whole_person_prob=0.5)
        default = conditions_from_meta(meta, members, **kw)
        kw["rng"] = random.Random(seed)
        release = conditions_from_meta(meta, members, **kw, whole_person_as_object=True)
        whole = [c for c in default if c.condition.kind == "face" and c.image.size == (8, 20)]
        assert sum(c.condition.kind == "object" for c in release) == 1 + len(whole)
        assert layout_of(release).num_groups == layout_of(default).num_groups - len(whole)
