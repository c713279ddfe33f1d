"""`lumosx-curate`: run the curate flow, the built-in demo, and the helpers around them.

Exit status of `run` and `demo`: 0 when every video went through, otherwise the number of videos that failed
(capped at 125), so a scheduler sees a partial run without parsing logs; the failures table says why.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml


def _parse_set(pairs: list[str]) -> dict[str, Any]:
    """`--set faces.min_size_px=48 --set run.batch_size=4` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects key.path=value, got {pair!r}")
        path, raw = pair.split("=", 1)
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    return out


def _exit_code(report: dict[str, Any]) -> int:
    return min(int(report["videos_failed"]), 125)


def _print_summary(report: dict[str, Any], output: str) -> None:
    print(json.dumps({k: report[k] for k in ("samples", "shards", "videos_found", "videos_failed")}))
    print(f"shards, manifest.parquet, index.json, failures.parquet and report.json are in {output}")
    if report["random_weight_stages"]:
        print(f"WARNING: stages {report['random_weight_stages']} ran with RANDOM WEIGHTS: not training data")


def _flow(args: argparse.Namespace):
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.curate import curate

    return (
        curate.with_options(task_runner=ThreadPoolTaskRunner(max_workers=args.threads))
        if args.threads
        else curate
    )


def _run(args: argparse.Namespace) -> int:
    report = _flow(args)(
        input=args.input,
        output=args.output,
        profile=args.profile,
        overrides=_parse_set(args.set),
        limit=args.limit,
        progress=not args.no_progress,
    )
    _print_summary(report, args.output)
    return _exit_code(report)


def _demo(args: argparse.Namespace) -> int:
    from flows.curate import BUILTIN_SAMPLES

    report = _flow(args)(
        input=BUILTIN_SAMPLES,
        output=args.output,
        profile=args.profile,
        overrides=_parse_set(args.set),
        progress=not args.no_progress,
    )
    _print_summary(report, args.output)
    return _exit_code(report)


def _sample_data(args: argparse.Namespace) -> int:
    from flows.sample_data import make_bad_videos, make_sample_videos

    paths = make_sample_videos(Path(args.output))
    if args.bad:
        paths += list(make_bad_videos(Path(args.output)).values())
    for p in paths:
        print(p)
    return 0


def _single_dir(args: argparse.Namespace) -> argparse.Namespace:
    if len(args.shards) == 1:
        args.shards = args.shards[0]  # a directory or one shard
    return args


def _export(args: argparse.Namespace) -> int:
    from tasks.official_export import export_cases

    report = export_cases(args.shards, args.output, task=args.task, overwrite=args.overwrite)
    print(json.dumps({"written": len(report.written), "failed": report.reasons()}))
    return min(len(report.failures), 125)


def _build_benchmark(args: argparse.Namespace) -> int:
    from flows.benchmark_builder import build_benchmark

    summary = build_benchmark(
        shards=args.shards,
        out_dir=args.output,
        mix=args.mix,
        seed=args.seed,
        train_shards=args.train_shards,
        overwrite=args.overwrite,
    )
    print(json.dumps(summary, default=str)[:2000])
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Without PREFECT_API_URL the flow starts a temporary local server; 20 s (the default) is tight on 2 busy cores.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    parser = argparse.ArgumentParser(prog="lumosx-curate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    def common(p: argparse.ArgumentParser, default_profile: str) -> None:
        p.add_argument(
            "--profile", default=default_profile, help="paper | offline | test | path to a YAML profile"
        )
        p.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable"
        )
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument("--threads", type=int, default=None, help="task-runner threads (default 4)")

    run = sub.add_parser("run", help="curate a folder, glob or fsspec URL of videos")
    run.add_argument("input")
    run.add_argument("output")
    run.add_argument("--limit", type=int, default=None)
    common(run, "paper")
    run.set_defaults(func=_run)

    demo = sub.add_parser("demo", help="build the sample videos and curate them (offline profile, CPU)")
    demo.add_argument("output", nargs="?", default="demo-out")
    common(demo, "offline")
    demo.set_defaults(func=_demo)

    sd = sub.add_parser("sample-data", help="write the built-in sample videos (and, with --bad, broken ones)")
    sd.add_argument("output")
    sd.add_argument("--bad", action="store_true")
    sd.set_defaults(func=_sample_data)

    ex = sub.add_parser("export", help="write shard samples as official LumosX case folders")
    ex.add_argument("shards", nargs="+", help="shard files or a directory of shards")
    ex.add_argument("output")
    ex.add_argument("--task", choices=["subject", "identity"], default="subject")
    ex.add_argument("--overwrite", action="store_true")
    ex.set_defaults(func=lambda a: _export(_single_dir(a)))

    bb = sub.add_parser("build-benchmark", help="held-out identity/subject test sets in the official layout")
    bb.add_argument("shards", help="directory of curated shards to draw from")
    bb.add_argument("output")
    bb.add_argument("--mix", type=int, nargs=3, default=[220, 230, 50], metavar=("ONE", "TWO", "THREE"))
    bb.add_argument("--seed", type=int, default=0)
    bb.add_argument(
        "--train-shards", default=None, help="shards used for training, to keep out of the test set"
    )
    bb.add_argument("--overwrite", action="store_true")
    bb.set_defaults(func=_build_benchmark)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
