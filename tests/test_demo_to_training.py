"""The two halves together: shards written by the curate demo train the tiny relational model, and a case
exported from them goes through inference."""

from __future__ import annotations

from pathlib import Path

import av
import pytest
import torch

from lumosx_model.config import InferenceConfig, TrainConfig
from lumosx_model.inference import generate_case
from lumosx_model.train import Trainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory, prefect_harness, sample_videos) -> list[str]:
    from flows.curate import curate

    out = tmp_path_factory.mktemp("demo") / "out"
    videos = sample_videos[0].parent
    report = curate(input=str(videos), output=str(out), profile="offline", progress=False, executor="local")
    assert report["samples"] >= 2
    return sorted(str(p) for p in (out / "shards").glob("*.tar"))


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: intra-op threads only contend on 2 busy cores
    yield
    torch.set_num_threads(threads)


def test_tiny_model_overfits_a_batch_of_demo_shards(tmp_path: Path, demo_shards, one_thread):
    cfg = TrainConfig.preset(
        "tiny",
        output_dir=str(tmp_path),
        max_steps=80,
        checkpoint_every=1000,
        data={
            "shards": demo_shards,
            "batch_size": 1,
            "shard_shuffle": 0,
            "shuffle_buffer": 0,
            "temporal_crop": "start",
            "whole_person_prob": 0.0,
            "augment": {"enabled": False},
            "max_persons": 6,
            "max_subjects": 3,
        },
        optim={"lr": 3e-3, "warmup_steps": 0, "weight_decay": 0.0},
    )
    trainer = Trainer(cfg)
    fixed = next(iter(trainer.loader))
    assert int(fixed.cond_counts[0]) >= 1, "demo samples must give face conditions"

    def loss() -> float:
        return sum(trainer.evaluate(fixed, seed=s) for s in range(4)) / 4

    before = loss()
    trainer.fit()
    after = loss()
    trainer.close()
    assert after <= 0.5 * before, (before, after)


def test_case_exported_from_demo_shards_generates_an_mp4(tmp_path: Path, demo_shards, one_thread):
    from flows.cli import main

    # Through the CLI: multi-person identity-only (v1) samples have no labels to bind faces to words, so they
    # are skipped with a reason; the exit status counts them.
    status = main(["export", *demo_shards, str(tmp_path / "cases"), "--task", "identity"])
    cases = sorted(p for p in (tmp_path / "cases").iterdir() if p.is_dir())
    assert cases and 0 <= status < len(cases) + 3
    cfg = InferenceConfig.preset("inference_tiny")
    out = generate_case(cases[0], tmp_path / "out.mp4", cfg)
    with av.open(str(out)) as container:
        frames = list(container.decode(video=0))
    assert (len(frames), frames[0].width, frames[0].height) == (cfg.num_frames, cfg.width, cfg.height)
