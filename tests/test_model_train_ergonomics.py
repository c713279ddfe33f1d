"""Trainer ergonomics on fixture shards with tiny models: EMA (saved with checkpoints, exact on resume), LR
schedule by name, progress with speed and ETA, validation videos logged to the tracker, Wan-layout export."""

from __future__ import annotations

import io
import logging
import math

import av
import pytest
import torch
from model_fixtures import case_folder, one_torch_thread, sample, tiny_train_config, write_shards  # noqa: F401 (one_torch_thread: autouse)
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lumosx_model.config import TrainConfig
from lumosx_model.train import EMA_WEIGHTS, Trainer
from lumosx_model.transformer import RelationalWanTransformer
from lumosx_model.wan_original import load_original_transformer


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("ergonomics_shards")
    return write_shards(root, [sample(f"e{i:02d}", persons=1 + i % 2, seed=i) for i in range(4)], per_shard=2)


def _scalars(logdir) -> dict[str, list[float]]:
    out = {}
    for events in logdir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out[tag] = [e.value for e in acc.Scalars(tag)]
        for tag in acc.Tags()["images"]:
            out[tag] = [e.encoded_image_string for e in acc.Images(tag)]
    return out


def test_resumed_run_has_the_same_ema_weights(tmp_path, shards):
    overrides = dict(max_steps=4, checkpoint_every=2, ema={"enabled": True, "decay": 0.7})
    full = Trainer(tiny_train_config(tmp_path / "full", shards, **overrides))
    full.fit()
    expected = [p.clone() for p in full.ema.shadow_params]
    weights = [p.detach().clone() for p in full._ema_params]
    full.close()
    assert any(
        not torch.equal(a, b) for a, b in zip(expected, weights, strict=True)
    )  # EMA is not the weights

    first = Trainer(tiny_train_config(tmp_path / "cut", shards, **{**overrides, "max_steps": 2}))
    first.fit()
    first.close()
    assert (tmp_path / "cut" / "checkpoints" / "step-0000002" / EMA_WEIGHTS).is_file()
    resumed = Trainer(tiny_train_config(tmp_path / "cut", shards, **overrides))
    assert resumed.ema.optimization_step == 2
    resumed.fit()
    got = resumed.ema.shadow_params
    resumed.close()
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # The final export holds the EMA weights.
    exported = RelationalWanTransformer.from_pretrained(tmp_path / "cut" / "transformer").state_dict()
    names = [n for n, _ in resumed.accelerator.unwrap_model(resumed.model).named_parameters()]
    for name, value in zip(names, got, strict=True):
        torch.testing.assert_close(exported[name], value.cpu(), rtol=1e-6, atol=1e-7)


def test_schedule_progress_validation_tracker_and_wan_export(tmp_path, shards, caplog):
    cases = tmp_path / "cases"
    good = case_folder(cases)
    bad = cases / "case_broken"
    bad.mkdir()
    (bad / "caption.txt").write_text("no separator here")
    cfg = tiny_train_config(
        tmp_path / "run",
        shards,
        max_steps=6,
        log_every=2,
        checkpoint_every=100,
        export_wan=True,
        optim={"lr": 1e-3, "warmup_steps": 2, "scheduler": "cosine"},
        validation={"cases": [str(good), str(bad)], "every": 3, "steps": 1, "guidance_scale": 1.0},
    )
    trainer = Trainer(cfg)
    lrs = []
    step = trainer.train_step

    def spy():
        loss = step()
        lrs.append(trainer.scheduler.get_last_lr()[0])
        return loss

    trainer.train_step = spy
    with caplog.at_level(logging.INFO, logger="lumosx_model.train"):
        trainer.fit()
    exported = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    trainer.close()

    # cosine with 2 warmup steps over 6: k/2 during warmup, then 0.5 (1 + cos(pi (k - 2) / 4))
    hand = [0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0]
    assert lrs == pytest.approx([1e-3 * f for f in hand], abs=1e-12)

    progress = [r.getMessage() for r in caplog.records if "steps/s" in r.getMessage()]
    assert len(progress) == 3 and all("samples/s" in m and "ETA" in m for m in progress)
    assert "step 2/6 loss" in progress[0] and "step 6/6 loss" in progress[-1]
    assert any("case_broken skipped" in r.getMessage() for r in caplog.records)

    for step in (3, 6):
        video = tmp_path / "run" / "validation" / f"step-{step:07d}" / "case_0.mp4"
        with av.open(str(video)) as container:
            frames = list(container.decode(video=0))
        assert len(frames) == 5 and (frames[0].width, frames[0].height) == (48, 32)
    logged = _scalars(tmp_path / "run" / "logs")
    assert len(logged["train/steps_per_s"]) == 3 and len(logged["train/samples_per_s"]) == 3
    gifs = [Image.open(io.BytesIO(data)) for data in logged["validation/case_0"]]  # at steps 3 and 6
    assert [(g.format, g.n_frames, g.size) for g in gifs] == [
        ("GIF", 5, (48, 32))
    ] * 2  # plays in TensorBoard

    wan = load_original_transformer(tmp_path / "run" / "transformer_wan").state_dict()
    for name, value in exported.items():
        assert torch.equal(wan[name], value)


def test_tracker_choice(tmp_path, shards, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ImportError, match="pip install wandb"):
        Trainer(tiny_train_config(tmp_path / "w", shards, tracker="wandb"))
    trainer = Trainer(tiny_train_config(tmp_path / "n", shards, tracker="none", max_steps=1))
    trainer.fit()
    trainer.close()
    assert not list((tmp_path / "n").rglob("events.out.tfevents.*"))


def test_tiny_preset_reads_the_demo_output():
    assert TrainConfig.preset("tiny", output_dir="x").data.shards == ["demo-out/shards/*.tar"]
