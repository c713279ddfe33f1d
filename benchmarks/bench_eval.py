"""Evaluation throughput: videos per minute for the identity metric with dlib's real offline weights, and for the
full subject metrics (ViCLIP-T/V, dynamic degree, two-tier, binding) with the offline profile's tiny builds.

    PYTHONPATH=. python benchmarks/bench_eval.py [--videos 4] [--seconds 3] [--fps 16]

The demo clips (flows/eval_samples.py, 640 x 360) are copied under N keys; models are loaded before the clock
starts (they load once per worker in a real run). Identity: every frame, as the paper's protocol. The tiny
builds' numbers are noise; their *timings* show the pipeline's own cost, not the real models' (X-CLIP, OWLv2,
Florence-2, CLIP ViT-L/14 and DINOv2 cost far more per call, and want a GPU).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _replicate(paths: dict[str, Path], task_dir: str, gen_dir: str, key: str, n: int) -> None:
    cases = paths["bench"] / task_dir
    for i in range(1, n):
        shutil.copytree(cases / key, cases / f"{key}_{i}")
        shutil.copy(paths["gen"] / gen_dir / f"{key}.mp4", paths["gen"] / gen_dir / f"{key}_{i}.mp4")
        gt = paths["bench"] / "ground_truth" / f"{key}.mp4"
        if gt.is_file():
            shutil.copy(gt, paths["bench"] / "ground_truth" / f"{key}_{i}.mp4")


def _run(label: str, videos: Path, cases: Path, out: Path, overrides: dict) -> None:
    from flows.evaluate import evaluate_batch, evaluator_for, plan

    cfg, items, _ = plan(str(videos), str(cases), None, "offline", overrides)
    evaluator_for(cfg).load({i.task for i in items})
    evaluate_batch(cfg, items[:1])  # warm-up: first-call costs (lazy imports, ONNX/torch init)
    started = time.perf_counter()
    rows = evaluate_batch(cfg, items)
    wall = time.perf_counter() - started
    per_metric: dict[str, list[float]] = {}
    for r in rows:
        for name, s in r.metric_seconds.items():
            per_metric.setdefault(name, []).append(s)
    frames = statistics.mean(r.num_frames for r in rows)
    print(
        f"{label}: {len(rows)} videos ({frames:.0f} frames each) in {wall:.1f} s = "
        f"{60 * len(rows) / wall:.1f} videos/min"
    )
    for name, secs in per_metric.items():
        print(f"    {name:<10} {statistics.mean(secs):6.2f} s/video")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--fps", type=int, default=16)
    args = parser.parse_args(argv)
    import torch

    from flows.eval_samples import write_eval_demo

    print(f"CPU threads: {torch.get_num_threads()}, clips {args.seconds:g} s at {args.fps} fps, 640 x 360")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_eval_demo(tmp, seconds=args.seconds, fps=args.fps)
        _replicate(paths, "identity_consistent", "identity", "two_people", args.videos)
        _replicate(paths, "subject_consistent", "subject", "binding_demo", args.videos)
        _run(
            "identity metric (dlib HOG detector + dlib ResNet recogniser, every frame)",
            paths["gen"] / "identity",
            paths["bench"] / "identity_consistent",
            Path(tmp) / "o1",
            {"video_text": None, "optical_flow": None},
        )
        _run(
            "subject metrics (offline profile: tiny X-CLIP, RAFT, OWLv2, CLIP, DINOv2; real dlib, HOG, colour)",
            paths["gen"] / "subject",
            paths["bench"] / "subject_consistent",
            Path(tmp) / "o2",
            {},
        )


if __name__ == "__main__":
    main()
