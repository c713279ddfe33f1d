"""Orchestration overhead: a curate run vs the same stages called in a plain Python loop, in one run.

    .venv/bin/python benchmarks/bench_overhead.py --videos 64 [--executor ray|local] [--batch-size 4]

Both sides curate the same N distinct small videos (the sample videos, shifted and re-encoded, with their
sidecar captions) with the offline profile (real OpenCV HOG and dlib), and both write the samples into a tar:

- loop: every stage built once in this process, then for each batch `run_stage` stage after stage, the samples
  appended to one tar. Model loading is not counted.
- run: the `curate` Prefect flow (its temporary server in this process), with the chosen executor (a local Ray
  by default). One-off start-up is not counted in the ratio but printed beside it: Prefect's server (the time
  from calling the flow to its first line), Ray's start, and the stage replicas' start (model loading).

ratio = run seconds (start-up excluded) / loop seconds. Target: <= 1.15 at 64 videos, <= 1.05 at 1,000.
Also prints the per-stage seconds per video from the run's report.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def make_variants(src_videos: list[Path], n: int, out_dir: Path) -> list[Path]:
    """n distinct videos (distinct content ids) from the sample videos: each a shifted crop, re-encoded."""
    import av
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(n):
        src = src_videos[i % len(src_videos)]
        dst = out_dir / f"{src.stem}_{i:04d}_v2.mp4"
        if not dst.exists():
            with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
                vin = inp.streams.video[0]
                w, h = vin.codec_context.width - 16, vin.codec_context.height - 16
                crf = str(20 + (i // 256) % 8)  # with the shifts below: distinct bytes for up to 6,144 videos
                stream = out.add_stream("libx264", rate=16, options={"preset": "ultrafast", "crf": crf})
                stream.width, stream.height, stream.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
                dx, dy = i % 16, (i // 16) % 16
                for frame in inp.decode(vin):
                    arr = frame.to_ndarray(format="rgb24")[dy : dy + stream.height, dx : dx + stream.width]
                    for packet in stream.encode(
                        av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
                    ):
                        out.mux(packet)
                for packet in stream.encode():
                    out.mux(packet)
        caption = src.with_suffix(".txt")
        if caption.exists():
            dst.with_suffix(".txt").write_text(caption.read_text())
        made.append(dst)
    return made


def videos(n: int) -> Path:
    from flows.sample_data import make_sample_videos

    root = Path(tempfile.gettempdir()) / "lumosx_bench"
    base = root / "base"
    if not (base / ".complete").exists():
        make_sample_videos(base)
        (base / ".complete").touch()
    out = root / f"videos_{n}"
    make_variants(sorted(base.glob("*.mp4")), n, out)
    return out


def plain_loop(inp: Path, config, out: Path) -> dict:
    """The same stages in a plain loop: what the run's orchestration is compared with."""
    from tasks.base import VideoContext
    from tasks.discovery import discover
    from tasks.pipeline import Pipeline
    from tasks.runner import run_stage

    pipeline = Pipeline.for_config(config)
    stages = [cls(config) for cls in pipeline.classes]
    t0 = time.perf_counter()
    for stage in stages:
        stage.setup()
    load = time.perf_counter() - t0
    sources = [f for f in discover(str(inp), config.ingest.extensions) if hasattr(f, "version")]
    t0 = time.perf_counter()
    samples = 0
    with tarfile.open(out, "w") as tar:
        bs = config.run.batch_size
        for i in range(0, len(sources), bs):
            items = [VideoContext(source=s, fingerprints=pipeline.fingerprints) for s in sources[i : i + bs]]
            for stage in stages:
                run_stage(stage, items)
            for ctx in items:
                for name, data in (ctx.output or {}).items():
                    info = tarfile.TarInfo(f"{ctx.video_id}.{name}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                samples += ctx.output is not None
    return {"seconds": time.perf_counter() - t0, "model_load_seconds": load, "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=64)
    parser.add_argument("--executor", choices=["ray", "local"], default="ray")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    from schemas.config import load_config

    overrides = {"run": {"batch_size": args.batch_size}}
    config = load_config("offline", overrides)
    inp = videos(args.videos)
    with tempfile.TemporaryDirectory() as tmp:
        loop = plain_loop(inp, config, Path(tmp) / "loop.tar")

        if args.executor == "ray":
            from tasks.ray_executor import start_local_ray

            start_local_ray(config)  # as the CLI does: Ray starts while Prefect starts its server
        from flows.curate import curate

        os.environ["LUMOSX_FLOW_CALLED_AT"] = repr(time.time())
        t0 = time.perf_counter()
        report = curate(
            input=str(inp),
            output=str(Path(tmp) / "out"),
            profile="offline",
            overrides=overrides,
            progress=False,
            executor=args.executor,
        )
        outer = time.perf_counter() - t0
    startup = report["startup"]
    run_s = report["wall_seconds"] - startup.get("seconds", 0.0)
    print(f"== {args.videos} videos, offline profile, batch {args.batch_size}, executor {args.executor} ==")
    print(f"{'stage':>10} {'videos':>7} {'s/video':>9} {'replicas':>9}")
    for name, s in report["stages"].items():
        spv = f"{s['seconds_per_video']:.3f}" if s["seconds_per_video"] is not None else "-"
        print(f"{name:>10} {s['processed']:>7} {spv:>9} {s['replicas'] or '-':>9}")
    result = {
        "videos": args.videos,
        "samples": report["samples"],
        "loop_samples": loop["samples"],
        "loop_seconds": round(loop["seconds"], 3),
        "run_seconds": round(run_s, 3),
        "ratio": round(run_s / loop["seconds"], 3),
        "startup": {
            "prefect_server_s": startup.get("prefect_seconds"),
            "ray_start_s": startup.get("ray_start_seconds"),
            "replicas_ready_s": startup.get("pools_ready_seconds", startup.get("model_load_seconds")),
            "executor_total_s": startup.get("seconds"),
        },
        "loop_model_load_s": round(loop["model_load_seconds"], 3),
        "flow_call_s": round(outer, 3),
        "report_overhead_vs_busiest_stage": report["overhead"],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
