"""Trainer on fixture shards with tiny models: overfits a fixed batch, resumes exactly, exports weights."""

from __future__ import annotations

import itertools

import pytest
import torch
from model_fixtures import one_torch_thread, sample, tiny_train_config, write_shards  # noqa: F401 (one_torch_thread: autouse)

from lumosx_model.components import load_transformer
from lumosx_model.config import ModelConfig
from lumosx_model.train import Trainer, find_latest_checkpoint, shifted_sigmas


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_shards")
    return write_shards(root, [sample(f"s{i:02d}", persons=1 + i % 3, seed=i) for i in range(6)], per_shard=2)


def test_shifted_sigmas():
    u = torch.linspace(0, 1, 5)
    torch.testing.assert_close(shifted_sigmas(u, 1.0), u)
    s = shifted_sigmas(u, 3.0)
    assert s[0] == 0 and s[-1] == 1 and (s[1:-1] > u[1:-1]).all()


def test_overfits_a_fixed_batch(tmp_path, shards):
    cfg = tiny_train_config(
        tmp_path,
        shards[:1],
        max_steps=100,
        checkpoint_every=1000,
        data={
            "batch_size": 1,
            "shard_shuffle": 0,
            "shuffle_buffer": 0,
            "temporal_crop": "start",
            "whole_person_prob": 0.0,
            "augment": {"enabled": False},
        },
        optim={"lr": 3e-3, "warmup_steps": 0, "weight_decay": 0.0},
    )
    trainer = Trainer(cfg)
    fixed = next(iter(trainer.loader))

    def loss() -> float:  # same noise and sigmas each time
        return sum(trainer.evaluate(fixed, seed=s) for s in range(4)) / 4

    before = loss()
    losses = trainer.fit()
    after = loss()
    trainer.close()
    assert len(losses) == 100 and all(torch.isfinite(torch.tensor(losses)))
    assert after <= 0.5 * before, (before, after)


def test_resume_replays_the_uninterrupted_run(tmp_path, shards):
    overrides = dict(max_steps=4, checkpoint_every=2, grad_accum=1)
    full = Trainer(tiny_train_config(tmp_path / "full", shards, **overrides))
    expected = full.fit()
    full_weights = {k: v.clone() for k, v in full.accelerator.unwrap_model(full.model).state_dict().items()}
    full.close()

    first = Trainer(tiny_train_config(tmp_path / "cut", shards, **{**overrides, "max_steps": 2}))
    head = first.fit()
    first.close()
    assert find_latest_checkpoint(tmp_path / "cut").name == "step-0000002"

    resumed = Trainer(tiny_train_config(tmp_path / "cut", shards, **overrides))  # resume_from: latest
    assert resumed.state.step == 2 and resumed.state.batches_consumed == 2
    tail = resumed.fit()
    weights = resumed.accelerator.unwrap_model(resumed.model).state_dict()
    resumed.close()

    assert head == expected[:2]
    assert tail == pytest.approx(expected[2:], rel=1e-6, abs=1e-7)
    for name, value in full_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-6, atol=1e-7)


def test_export_loads_back_and_logs(tmp_path, shards):
    trainer = Trainer(
        tiny_train_config(tmp_path, shards, max_steps=2, checkpoint_every=1, keep_checkpoints=1, grad_accum=2)
    )
    trainer.fit()
    trained = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    trainer.close()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [
        "step-0000002"
    ]  # pruned to the last one
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    for source in (tmp_path / "transformer", tmp_path, tmp_path / "checkpoints" / "step-0000002"):
        loaded = load_transformer(ModelConfig(tiny=True, transformer_path=str(source))).state_dict()
        for name, value in trained.items():
            torch.testing.assert_close(loaded[name], value)


def test_stage_filter_reaches_the_trainer(tmp_path, shards):
    trainer = Trainer(tiny_train_config(tmp_path, shards, max_steps=1, data={"max_persons": 1}))
    for batch in itertools.islice(iter(trainer.loader), 3):
        assert all(layout.num_groups == 1 for layout in batch.layouts)
    trainer.close()


def test_trains_on_fixed_condition_slots(tmp_path, shards):
    # 1 background + 1 object + 3 persons x (face + 3 attributes) = 14 slots, whatever each batch holds
    cfg = tiny_train_config(tmp_path, shards, max_steps=2, data={"max_objects": 1, "condition_slots": "auto"})
    trainer = Trainer(cfg)
    shapes, counts = set(), set()
    forward = trainer.model.forward

    def spy(hidden, t, text, **kw):
        shapes.add(tuple(kw["cond_latents"].shape[:2]) + tuple(kw["mcam_templates"].shape))
        counts.update(len(layout) for layout in kw["layouts"])
        return forward(hidden, t, text, **kw)

    trainer.model.forward = spy
    losses = trainer.fit()
    trainer.close()
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert shapes == {(2, 14, 2, 14, 64)} and max(counts) < 14


def test_bad_resume_path_is_a_clear_error(tmp_path, shards):
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        Trainer(tiny_train_config(tmp_path, shards, resume_from=str(tmp_path / "nope")))


def test_cli_cache_then_train_on_cached_latents(tmp_path, shards):
    from lumosx_model.cli import main
    from lumosx_model.train import Trainer

    sets = [
        "--set",
        f"output_dir={tmp_path / 'run'}",
        "--set",
        f"data.shards={list(shards)}",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
        "--set",
        "data.temporal_crop=start",
        "--set",
        "max_steps=2",
    ]
    assert main(["cache", "--preset", "tiny", *sets]) == 0
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 6
    assert main(["cache", "--preset", "tiny", *sets]) == 0  # idempotent: nothing rewritten
    cfg = tiny_train_config(
        tmp_path / "run2", shards, data={"cache_dir": str(tmp_path / "cache"), "temporal_crop": "start"}
    )
    trainer = Trainer(cfg)
    batch = next(iter(trainer.loader))
    assert batch.video is None and batch.video_latents.shape == (2, 16, 2, 4, 6)
    trainer.close()
    assert main(["train", "--preset", "tiny", *sets]) == 0
    assert (tmp_path / "run" / "transformer" / "config.json").is_file()
