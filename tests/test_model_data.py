"""Shard pipeline: video decoding and resampling, buckets, stage filter, collation, determinism, resume skip,
latent cache."""

from __future__ import annotations

import gc
import itertools
import json
import os
import sys
import threading

import pytest
import torch
from model_fixtures import mp4_bytes, one_torch_thread, sample, write_shards  # noqa: F401 (one_torch_thread: autouse)

from lumosx_model.components import FrozenEncoders
from lumosx_model.config import DataConfig, TrainConfig
from lumosx_model.data import (
    ClipTooShortError,
    LatentCache,
    build_pipeline,
    decode_clip,
    make_loader,
    nearest_bucket,
)


@pytest.fixture(scope="module")
def tokenizer():
    return FrozenEncoders.tiny(text_len=64).prompt_tokenizer


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    samples = [sample(f"s{i:02d}", persons=1 + i % 3, seed=i) for i in range(8)]
    samples[3]["meta.json"] = b"{not json"  # malformed: skipped with a warning, the stream goes on
    return write_shards(root, samples, per_shard=3)


def _cfg(shards, **kw) -> DataConfig:
    base = dict(
        shards=shards,
        buckets=[(32, 48)],
        num_frames=5,
        fps=16,
        batch_size=2,
        num_workers=0,
        shard_shuffle=0,
        shuffle_buffer=0,
        temporal_crop="random",
    )
    base.update(kw)
    return DataConfig(**base)


def test_decode_resamples_by_timestamp_and_crops():
    data = mp4_bytes(64, 32, frames=24, fps=24, seed=1)  # the blue channel encodes the source frame index
    frames = decode_clip(data, num_frames=5, fps=16, size=(32, 48), temporal_crop="start")
    assert frames.shape == (5, 32, 48, 3) and frames.dtype == torch.uint8
    blue = frames[..., 2].float().mean(dim=(1, 2))
    index = torch.round((blue - blue[0]) / 10)
    # frame on screen at i/16 s in a 24 fps video: floor(i * 1.5)
    assert index.tolist() == [0, 1, 3, 4, 6]
    with pytest.raises(ClipTooShortError):
        decode_clip(data, num_frames=81, fps=16, size=(32, 48), temporal_crop="start")


def test_decode_upsamples_low_fps_by_repeating_frames():
    frames = decode_clip(
        mp4_bytes(48, 32, frames=8, fps=8), num_frames=9, fps=16, size=(32, 48), temporal_crop="start"
    )
    blue = frames[..., 2].float().mean(dim=(1, 2))
    assert torch.round((blue - blue[0]) / 10).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4]


def test_nearest_bucket():
    buckets = [(480, 832), (832, 480), (624, 624)]
    assert nearest_bucket(1920, 1080, buckets) == (480, 832)
    assert nearest_bucket(720, 1280, buckets) == (832, 480)
    assert nearest_bucket(1000, 1100, buckets) == (624, 624)


def test_batches_with_different_layouts_collate(shards, tokenizer):
    cfg = _cfg(shards, whole_person_prob=0.0)
    batches = list(itertools.islice(iter(build_pipeline(cfg, tokenizer, seed=0)), 3))
    saw_padding = False
    for batch in batches:
        b = len(batch)
        assert b == 2 and batch.video.shape == (2, 3, 5, 32, 48)
        n_max = batch.cond_pixels.shape[1]
        assert batch.cond_pixels.shape == (2, n_max, 3, 32, 48)
        assert batch.mcam_templates.shape == (2, n_max, 64) and batch.input_ids.shape == (2, 64)
        assert [len(layout) for layout in batch.layouts] == batch.cond_counts.tolist()
        assert int(batch.cond_counts.max()) == n_max
        for i, layout in enumerate(batch.layouts):
            n = len(layout)
            assert batch.cond_pixels[i, n:].eq(0).all() and batch.mcam_templates[i, n:].eq(0).all()
            assert batch.cond_pixels[i, :n].abs().sum(dim=(1, 2, 3)).gt(0).all()
            saw_padding |= n < n_max
            # every labelled condition finds its words in the prompt (MCAM template row not empty)
            for row, cond in zip(batch.mcam_templates[i, :n], layout.conditions, strict=True):
                assert row.gt(0).any(), cond
    assert saw_padding  # 1-, 2- and 3-person samples were mixed in one batch
    keys = [k for batch in batches for k in batch.keys]
    assert "s03" not in keys and len(set(keys)) == len(keys)


def test_stage_filter_by_number_of_persons(shards, tokenizer):
    cfg = _cfg(shards, max_persons=1, min_persons=1, batch_size=1)
    batches = list(itertools.islice(iter(build_pipeline(cfg, tokenizer, seed=0)), 4))
    for batch in batches:
        assert batch.layouts[0].num_groups == 1
    assert {k for b in batches for k in b.keys} <= {"s00", "s06"}


def test_aspect_buckets_group_batches(tmp_path, tokenizer):
    samples = [sample(f"w{i}", persons=1, width=48, height=32, seed=i) for i in range(3)]
    samples += [sample(f"t{i}", persons=1, width=32, height=48, seed=i) for i in range(3)]
    paths = write_shards(tmp_path, samples, per_shard=2)
    cfg = _cfg(paths, buckets=[(32, 48), (48, 32)], shard_shuffle=4, shuffle_buffer=4)
    for batch in itertools.islice(iter(build_pipeline(cfg, tokenizer, seed=3)), 4):
        wide = batch.keys[0].startswith("w")
        assert all(k.startswith("w") == wide for k in batch.keys)
        assert batch.video.shape[-2:] == ((32, 48) if wide else (48, 32))
        assert batch.cond_pixels.shape[-2:] == batch.video.shape[-2:]


def _keys(loader, n):
    return [tuple(b.keys) for b in itertools.islice(iter(loader), n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_is_deterministic_and_resume_skips_exactly(shards, tokenizer, workers):
    cfg = _cfg(shards, shard_shuffle=3, shuffle_buffer=3, num_workers=workers)
    full = list(itertools.islice(iter(make_loader(build_pipeline(cfg, tokenizer, seed=7), workers)), 6))
    again = list(itertools.islice(iter(make_loader(build_pipeline(cfg, tokenizer, seed=7), workers)), 6))
    assert [b.keys for b in full] == [b.keys for b in again]
    assert all(
        torch.equal(a.cond_pixels, b.cond_pixels) and torch.equal(a.video, b.video)
        for a, b in zip(full, again, strict=True)
    )
    resumed = list(
        itertools.islice(
            iter(make_loader(build_pipeline(cfg, tokenizer, seed=7, skip_batches=3), workers)), 3
        )
    )
    assert [b.keys for b in resumed] == [b.keys for b in full[3:]]
    assert all(torch.equal(a.cond_pixels, b.cond_pixels) for a, b in zip(resumed, full[3:], strict=True))
    other = list(itertools.islice(iter(make_loader(build_pipeline(cfg, tokenizer, seed=8), workers)), 6))
    assert [b.keys for b in other] != [b.keys for b in full]


def test_latent_cache_round_trip_and_use(shards, tokenizer, tmp_path):
    enc = FrozenEncoders.tiny(text_len=64)
    cfg = _cfg(shards, cache_dir=str(tmp_path), temporal_crop="start", batch_size=1)
    cache = LatentCache(
        tmp_path, encoder_fingerprint=enc.fingerprint, num_frames=5, fps=16, temporal_crop="start"
    )
    first = next(iter(build_pipeline(cfg, tokenizer, seed=0, cache=cache)))
    assert first.video is not None and first.video_latents is None  # nothing cached yet
    latents = enc.encode_video(first.video)
    text = enc.encode_text(first.input_ids, first.attention_mask)
    cache.save(first.keys[0], (32, 48), latents[0], text[0], int(first.attention_mask[0].sum()))
    second = next(iter(build_pipeline(cfg, tokenizer, seed=0, cache=cache)))
    assert second.keys == first.keys and second.video is None
    torch.testing.assert_close(second.video_latents, latents)
    torch.testing.assert_close(second.text_embeds, text)
    assert torch.equal(second.cond_pixels, first.cond_pixels)  # the rest of the sample is unchanged
    other = LatentCache(tmp_path, encoder_fingerprint="other", num_frames=5, fps=16, temporal_crop="start")
    assert not other.has(first.keys[0], (32, 48))


def test_config_validation():
    with pytest.raises(ValueError, match="4k\\+1"):
        DataConfig(shards=["x"], num_frames=80)
    with pytest.raises(ValueError, match="multiples of 16"):
        DataConfig(shards=["x"], buckets=[(30, 48)])
    with pytest.raises(ValueError, match="temporal_crop"):
        DataConfig(shards=["x"], cache_dir="/tmp/c", temporal_crop="random")


def test_fixed_condition_slots_give_every_batch_the_same_shape(shards, tokenizer):
    # caps: 1 background + 1 object + 3 persons x (face + 3 attributes) = 14 slots
    cfg = _cfg(shards, max_objects=1, condition_slots="auto", whole_person_prob=0.0)
    assert cfg.max_conditions == cfg.num_condition_slots == 14
    counts = set()
    for batch in itertools.islice(iter(build_pipeline(cfg, tokenizer, seed=0)), 4):
        assert batch.cond_pixels.shape == (2, 14, 3, 32, 48)
        assert batch.mcam_templates.shape == (2, 14, 64)
        for i, layout in enumerate(batch.layouts):
            n = len(layout)
            assert batch.cond_counts[i] == n
            assert batch.cond_pixels[i, n:].eq(0).all() and batch.mcam_templates[i, n:].eq(0).all()
            assert batch.cond_pixels[i, :n].abs().sum(dim=(1, 2, 3)).gt(0).all()
        counts.add(tuple(batch.cond_counts.tolist()))
    assert len({c for pair in counts for c in pair}) > 1  # different layouts, one shape

    # The same samples, conditions and pixels as without fixed slots: only the padding differs.
    plain = next(iter(build_pipeline(_cfg(shards, max_objects=1, whole_person_prob=0.0), tokenizer, seed=0)))
    fixed = next(
        iter(
            build_pipeline(
                _cfg(shards, max_objects=1, whole_person_prob=0.0, condition_slots=20), tokenizer, seed=0
            )
        )
    )
    n = plain.cond_pixels.shape[1]
    assert n == int(plain.cond_counts.max()) < 20 and fixed.cond_pixels.shape[1] == 20
    assert fixed.keys == plain.keys and torch.equal(fixed.cond_pixels[:, :n], plain.cond_pixels)
    assert torch.equal(fixed.mcam_templates[:, :n], plain.mcam_templates)


def test_objects_beyond_max_objects_are_dropped_at_random(tmp_path, tokenizer):
    one = sample("many", persons=1, seed=0)
    meta = json.loads(one["meta.json"])
    labels = ["wooden table", "red cup", "old lamp", "green vase"]
    meta["objects"] = [
        {"label": label, "image": f"object_{i}.png", "mask": f"objmask_{i}.png"}
        for i, label in enumerate(labels)
    ]
    meta["caption"] += " with a red cup, an old lamp and a green vase"
    one.update({f"object_{i}.png": one["object_0.png"] for i in range(1, 4)})
    one["meta.json"], one["caption.txt"] = json.dumps(meta).encode(), meta["caption"].encode()
    paths = write_shards(tmp_path, [one])
    cfg = _cfg(paths, batch_size=1, max_objects=2, condition_slots="auto")
    assert cfg.num_condition_slots == 1 + 2 + 3 * 4
    kept = set()
    for batch in itertools.islice(iter(build_pipeline(cfg, tokenizer, seed=0)), 6):
        objects = [c.label for c in batch.layouts[0].conditions if c.kind == "object"]
        assert len(objects) == 2 and objects == sorted(objects, key=labels.index)  # caption order kept
        kept.add(tuple(objects))
    assert len(kept) > 1


def test_condition_slot_config():
    with pytest.raises(ValueError, match="set max_objects"):
        DataConfig(shards=["x"], condition_slots="auto")
    with pytest.raises(ValueError, match="set max_objects"):
        DataConfig(shards=["x"], condition_slots=64)
    with pytest.raises(ValueError, match=r"condition_slots=10 is below the 11 .*1 background \+ 2 objects"):
        DataConfig(shards=["x"], max_objects=2, max_persons=2, max_attributes=3, condition_slots=10)
    no_objects = DataConfig(shards=["x"], use_objects=False, use_background=False, condition_slots="auto")
    assert no_objects.num_condition_slots == 3 * 4
    assert DataConfig(shards=["x"]).num_condition_slots is None  # default: pad to each batch's largest count
    # The paper presets pad to what their caps allow: one person in stage 1, up to three in stage 2.
    assert TrainConfig.preset("paper_stage1").data.num_condition_slots == 1 + 3 + 1 * 4
    assert TrainConfig.preset("paper_stage2").data.num_condition_slots == 1 + 3 + 3 * 4


def test_abandoned_loader_workers_exit_cleanly(shards, tokenizer, monkeypatch):
    """The endless stream's loader is always abandoned mid-stream; its workers must still exit with code 0.

    Forked workers inherit the parent's thread-exit hooks; Prefect 3's services leave one that fails in a
    forked child. Such a hook made every worker exit with code 1 and the loader's ``__del__`` report it.
    """
    parent = os.getpid()

    def fails_in_forked_children() -> None:
        if os.getpid() != parent:
            raise AssertionError("a parent's thread-exit hook ran in a forked worker")

    monkeypatch.setattr(
        threading, "_threading_atexits", [*threading._threading_atexits, fails_in_forked_children]
    )
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    cfg = _cfg(shards, num_workers=2)
    batches = iter(make_loader(build_pipeline(cfg, tokenizer, seed=0), 2))
    assert len(list(itertools.islice(batches, 3))) == 3
    del batches  # shuts the workers down (DataLoader iterator __del__), while they are still producing
    gc.collect()
    assert [u.exc_value for u in unraisable] == []


def test_prompts_and_labels_are_cleaned_like_wan(tokenizer):
    """Irregular whitespace and HTML entities tokenize as the clean prompt does (as Wan and WanPipeline encode),
    and a label typed with them is still found inside the prompt."""
    from lumosx_model.masks import word_mask

    messy, clean = ["a  man\twith a black   hat &amp; red shirt "], ["a man with a black hat & red shirt"]
    assert torch.equal(tokenizer(messy)[0], tokenizer(clean)[0])
    ids = tokenizer(messy)[0][0].tolist()
    assert tokenizer.label_ids("black  hat") == tokenizer.label_ids("black hat")
    assert word_mask(ids, tokenizer.label_ids(" black  hat")).sum() == len(tokenizer.label_ids("black hat"))
