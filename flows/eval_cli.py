"""`lumosx-eval`: score generated videos against their benchmark cases (the `evaluate` flow).

    lumosx-eval --videos gen/subject --cases bench/subject_consistent --out eval/subject [--profile paper]
    lumosx-eval ... --profile offline --set identity_max_frames=16 --set face_detector.device=cpu
    lumosx-eval ... --no-prefect          # the same evaluation in this process, without a Prefect server

Writes <out>/metrics.parquet (one row per video, every metric), failures.parquet (why a score is low),
binding.parquet (every attribute decision of the binding score), summary.json and summary.md.
Exit codes: 0 done, 1 some videos missing or failed, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from schemas.evaluation import PROFILES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lumosx-eval", description=__doc__.split("\n")[0])
    p.add_argument("--videos", required=True, help="folder of generated <key>.mp4 (lumosx-train infer --out)")
    p.add_argument("--cases", required=True, help="folder of case folders (build-benchmark's *_consistent/)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--ground-truth", help="folder of ground-truth <key>.mp4 (default: <cases>/../ground_truth)"
    )
    p.add_argument("--profile", default="paper", choices=sorted(PROFILES))
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. binding_frames=5 or video_text.device=cuda",
    )
    p.add_argument("--method", default="LumosX", help="row name in the summary table")
    p.add_argument("--no-prefect", action="store_true", help="run in this process without Prefect")
    p.add_argument("--log-level", default="WARNING")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING))
    from pydantic import ValidationError

    from flows.preflight import PreflightError, parse_overrides
    from models.base import ModelLoadError

    try:
        overrides = parse_overrides(args.set)
        kwargs = dict(
            profile=args.profile, overrides=overrides, ground_truth=args.ground_truth, method=args.method
        )
        if args.no_prefect:
            from flows.evaluate import run_evaluation

            summary = run_evaluation(args.videos, args.cases, args.out, **kwargs).model_dump()
        else:
            from flows.evaluate import evaluate

            summary = evaluate(videos=args.videos, cases=args.cases, out=args.out, **kwargs)
    except (PreflightError, ValidationError, ModelLoadError, FileNotFoundError, ValueError) as e:
        print(f"lumosx-eval: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    from tasks.evaluation.report import SUMMARY_MD

    with open(os.path.join(args.out, SUMMARY_MD), encoding="utf-8") as f:
        print(f.read())
    failed = any(
        "model_error" in t["failures"] or "unreadable_video" in t["failures"] for t in summary["tasks"]
    )
    return 1 if summary["videos_missing"] or failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
