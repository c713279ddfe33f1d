"""`lumosx-curate`: run the curate flow, the built-in demo, and the helpers around them.

Exit status of `run` and `demo` (BSD sysexits for errors, so a scheduler can tell them from failed videos):

    0       every video went through
    1-63    that many videos failed (63: 63 or more); failures.parquet says why. The run itself completed.
    64      bad command line                      66  the input does not exist
    70      an internal error (a bug: please report it with the traceback)
    73      the output cannot be written          74  stopped early: disk full, out of memory (rerun to finish)
    75      the output is in use by another run   78  configuration: profile, setting, model weights, resources
    130     interrupted (Ctrl-C)

Arguments, configuration, paths, model weights and the output's lock are checked before anything starts
(flows/preflight.py): a mistake costs one line and well under two seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from flows.preflight import (
    EX_CANTCREAT,
    EX_CONFIG,
    EX_IOERR,
    EX_NOINPUT,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_USAGE,
    MAX_FAILED_CODE,
    PreflightError,
    check_config,
    check_input,
    check_output,
    check_weights,
    parse_overrides,
    take_lock,
)

BUILTIN_SAMPLES = "builtin:samples"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EX_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _exit_code(report: dict[str, Any]) -> int:
    return min(int(report["videos_failed"]), MAX_FAILED_CODE)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lumosx-curate")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "unknown (not installed)"


@contextlib.contextmanager
def _stdout_reserved() -> Iterator[None]:
    """Send everything written to stdout during the block to stderr, at the file-descriptor level.

    stdout carries the final JSON summary and nothing else (`| jq` must work), yet libraries print there:
    ultralytics' warnings, native code, Ray. Python-level `print`s and fd 1 writes both go to stderr until the
    block ends; the summary is printed after it.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 (an embedding host): the Python-level redirect still applies
        saved = None
    if saved is not None:
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _say(args: argparse.Namespace, message: str) -> None:
    """A line for the person at the terminal (stderr), unless --quiet."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


def _print_summary(report: dict[str, Any], args: argparse.Namespace) -> None:
    keys = ("samples", "shards", "videos_found", "videos_failed", "failures_by_reason")
    summary = {k: report[k] for k in keys}
    summary["gallery"] = report.get("gallery")
    print(json.dumps(summary), flush=True)
    _say(args, f"shards, index.json, manifest.parquet, failures.parquet and report.json are in {args.output}")
    if report.get("gallery"):
        _say(args, f"gallery: {Path(report['gallery']).resolve().as_uri()}")
    if report["random_weight_samples"]:
        # Not silenced by --quiet: samples that are not data must never pass unnoticed.
        print(
            f"WARNING: {report['random_weight_samples']} samples were made with RANDOM WEIGHTS",
            file=sys.stderr,
        )


def _preflight(args: argparse.Namespace, input: str):
    config = check_config(args.profile, parse_overrides(args.set))
    check_input(input)
    check_output(args.output)
    check_weights(config)
    if args.executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise PreflightError(
                EX_CONFIG,
                "the Ray executor needs ray: pip install 'ray[default]' (or run with --executor local)",
            ) from None
    return config


def _curate(args: argparse.Namespace, input: str) -> int:
    config = _preflight(args, input)
    lock = take_lock(args.output)  # last: nothing is written for a run refused by the checks above
    try:
        return _start(args, input, config)
    finally:
        lock.release()


def _start(args: argparse.Namespace, input: str, config) -> int:
    if args.executor == "ray" and not args.ray_address:
        # A local Ray starts while Prefect starts its temporary server, not after it.
        from tasks.ray_executor import start_local_ray, stop_local_ray

        with _stdout_reserved():  # Ray's processes inherit this fd 1: none of them may write to our stdout
            start_local_ray(config)
        try:
            return _run_flow(args, input)
        finally:
            stop_local_ray()  # also when no partition needed it (a rerun with nothing to do)
    return _run_flow(args, input)


def _run_flow(args: argparse.Namespace, input: str) -> int:
    from flows.curate import curate

    # The flow reports how long Prefect took to reach its body (its temporary server starts in between).
    os.environ["LUMOSX_FLOW_CALLED_AT"] = repr(time.time())
    progress = not (args.no_progress or args.quiet) and sys.stderr.isatty()
    with _stdout_reserved(), _logs_above_progress(progress):
        state = curate(
            input=input,
            output=args.output,
            profile=args.profile,
            overrides=parse_overrides(args.set),
            limit=getattr(args, "limit", None),
            progress=progress,
            executor=args.executor,
            ray_address=args.ray_address,
            gallery=not args.no_gallery,
            return_state=True,
        )
    if not state.is_completed():
        result = state.result(raise_on_failure=False)
        return _fail(result if isinstance(result, BaseException) else None, state.message)
    report = state.result()
    _print_summary(report, args)
    return _exit_code(report)


@contextlib.contextmanager
def _logs_above_progress(progress: bool) -> Iterator[None]:
    """While the progress bar shows, log lines (ours and Prefect's) are written above it, never through it."""
    if not progress:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    # Only the loggers that print (a handler on stderr/stdout): the others propagate to them, and a redirect on
    # both would print every line twice.
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    printing = [
        lg
        for lg in loggers
        if any(
            isinstance(h, logging.StreamHandler) and h.stream in (sys.stderr, sys.stdout, sys.__stderr__)
            for h in lg.handlers
        )
    ]
    with logging_redirect_tqdm(loggers=printing):
        yield


def _fail(error: BaseException | None, message: str | None) -> int:
    from tasks.base import environment_fault
    from tasks.lock import OutputLocked

    print(f"lumosx-curate: {message or error}", file=sys.stderr)
    if error is not None and environment_fault(error) is not None:
        return EX_IOERR
    if isinstance(error, OutputLocked):
        return EX_TEMPFAIL
    try:
        from models.base import ModelLoadError
        from tasks.placement import PlacementError
        from tasks.ray_executor import StartupError

        if isinstance(error, ModelLoadError | PlacementError | StartupError):
            return EX_CONFIG
    except ImportError:
        pass
    return EX_SOFTWARE


def _run(args: argparse.Namespace) -> int:
    return _curate(args, args.input)


def _demo(args: argparse.Namespace) -> int:
    return _curate(args, BUILTIN_SAMPLES)


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
    return min(len(report.failures), MAX_FAILED_CODE)


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


def _gallery(args: argparse.Namespace) -> int:
    from tasks.discovery import is_local
    from tasks.gallery import build_gallery

    if args.shards:
        missing = [s for s in args.shards if not Path(s).exists()]
        if missing:
            raise PreflightError(EX_NOINPUT, f"{missing[0]} does not exist")
    elif is_local(args.output) and not Path(args.output).is_dir():
        raise PreflightError(EX_NOINPUT, f"{args.output} is not a curation output directory")
    try:
        summary = build_gallery(
            None if args.shards else args.output,
            dest=args.dest or (os.path.join(args.output, "gallery") if args.shards else None),
            shards=args.shards or None,
            failures=args.failures,
            page_size=args.page_size,
            max_samples=args.max_samples,
        )
    except (FileExistsError, PermissionError) as e:
        raise PreflightError(EX_CANTCREAT, str(e)) from None
    except OSError as e:  # disk full, an unreadable output: the machine, not a bug
        raise PreflightError(EX_IOERR, f"{type(e).__name__}: {e}") from None
    except ValueError as e:
        raise PreflightError(EX_USAGE, str(e)) from None
    print(json.dumps(summary.as_dict()), flush=True)
    _say(args, f"gallery: {Path(summary.path).resolve().as_uri()}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from tasks.output import OutputDir
    from tasks.shards import verify

    bad = verify(OutputDir(args.output))
    for line in bad:
        print(line)
    print(json.dumps({"damaged": len(bad)}))
    return min(len(bad), MAX_FAILED_CODE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lumosx-curate",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    def console(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--log-level",
            default=None,
            type=str.upper,
            choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
            help="logging level of this process and Prefect's console (default WARNING)",
        )
        p.add_argument(
            "-q",
            "--quiet",
            action="store_true",
            help="nothing but the final JSON summary on stdout and errors on stderr (no progress, no logs)",
        )

    def common(p: argparse.ArgumentParser, default_profile: str) -> None:
        p.add_argument(
            "--profile", default=default_profile, help="paper | offline | test | path to a YAML profile"
        )
        p.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable"
        )
        p.add_argument(
            "--no-progress",
            action="store_true",
            help="no progress bar (there is none when stderr is not a terminal)",
        )
        p.add_argument(
            "--no-gallery", action="store_true", help="do not write OUTPUT/gallery at the end of the run"
        )
        p.add_argument(
            "--executor",
            choices=["ray", "local"],
            default="ray",
            help="ray: stage actor pools on a Ray cluster (default; a local Ray without --ray-address); "
            "local: every stage in this process",
        )
        p.add_argument(
            "--ray-address", default=None, help="auto, or ray://head:10001 (default: start a local Ray)"
        )
        console(p)

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

    gl = sub.add_parser(
        "gallery",
        help="write a static HTML gallery (thumbnails, boxes, cut-outs, captions, failures) of an output",
    )
    gl.add_argument("output", help="a curation output directory (local or fsspec URL)")
    gl.add_argument("--shards", nargs="+", default=None, help="these shard files or directories instead")
    gl.add_argument("--dest", default=None, help="where to write it (default OUTPUT/gallery)")
    gl.add_argument(
        "--failures",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the page of failed videos grouped by reason (default on)",
    )
    gl.add_argument("--page-size", type=int, default=50, help="samples per page (default 50)")
    gl.add_argument("--max-samples", type=int, default=None, help="stop after this many samples")
    console(gl)
    gl.set_defaults(func=_gallery)

    vf = sub.add_parser("verify", help="check every shard of an output against index.json (size and sha256)")
    vf.add_argument("output")
    vf.set_defaults(func=_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Without PREFECT_API_URL the flow starts a temporary local server; 20 s (the default) is tight on 2 busy cores.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        args.log_level = "ERROR"
    chosen = getattr(args, "log_level", None)
    level = getattr(logging, str(chosen or "WARNING").upper(), logging.WARNING)
    # Prefect's console and Ray's driver follow the level (what Prefect sends to its UI does not change). A level
    # given on the command line wins over the environment; without one, the environment's own setting stays.
    put = os.environ.__setitem__ if chosen else os.environ.setdefault
    put("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", logging.getLevelName(level))
    put("RAY_LOGGER_LEVEL", logging.getLevelName(level).lower())  # read when ray is imported
    if not sys.stderr.isatty():
        os.environ.setdefault("PREFECT_LOGGING_COLORS", "false")
        os.environ.setdefault("NO_COLOR", "1")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    for name in ("flows", "tasks", "models"):
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).addHandler(handler)
    try:
        return args.func(args)
    except PreflightError as e:
        print(f"lumosx-curate: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("lumosx-curate: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
