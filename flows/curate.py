"""The `curate` flow: raw videos -> WebDataset shards, manifest, index, failures table and run report.

Run it from the CLI (`lumosx-curate run`), from Python (`curate(input=..., output=...)`) or as the Prefect deployment
`curate/raw-videos` (prefect.yaml). Prefect orchestrates: the flow run, its parameters and schedule, one task run
per *partition* of the input (a few thousand videos; each retried on its own and resumable), the run report and
failure table as artifacts. The work itself runs on the executor (tasks/engine.py): by default a pool of Ray actors
per stage, on a local Ray or on the cluster at `ray_address`, with frames streaming between stages in memory.
Frames, records and samples never pass through Prefect.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner

from schemas.config import load_config
from tasks.base import EnvironmentFault, environment_fault
from tasks.engine import Curation, PartitionSummary

logger = logging.getLogger(__name__)

BUILTIN_SAMPLES = "builtin:samples"
"""`input` value that curates the built-in sample videos (written to <output>/sample_videos): the demo, and the
default of the `raw-videos` deployment so that it runs on a fresh machine before anyone points it at data."""

# Partition tasks reach their run's engine through this registry (threads of one flow run share it): Prefect
# passes a key, never the engine, the executor or a partition's file list.
_RUNS: dict[str, Curation] = {}


def _retry_partition(task, task_run, state) -> bool:
    """Retry a partition for anything but a machine that cannot go on (disk full): that stops the run."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, EnvironmentFault)


@task(
    name="partition",
    task_run_name="partition-{number}",
    cache_policy=NO_CACHE,  # resume is the ledger's job, keyed by configuration fingerprints
    persist_result=False,
    retry_condition_fn=_retry_partition,
    retry_delay_seconds=[10, 60],
)
def curate_partition(run_key: str, number: int) -> PartitionSummary:
    """One partition through every stage into its shards. A retry skips what the failed attempt committed."""
    engine = _RUNS[run_key]
    return engine.run_partition(engine.partition(number))


@flow(name="curate", task_runner=ThreadPoolTaskRunner(max_workers=64), validate_parameters=True)
def curate(
    input: str,
    output: str,
    profile: str = "paper",
    overrides: dict[str, Any] | None = None,
    limit: int | None = None,
    progress: bool = True,
    executor: Literal["ray", "local"] = "ray",
    ray_address: str | None = None,
    storage_block: str | None = None,
    gallery: bool = True,
):
    """Curate raw videos into LumosX training shards; returns the run report (also written to report.json).

    Args:
        input: a directory (searched recursively), a glob, or an fsspec URL of videos; or `builtin:samples`
            for the built-in sample videos (made from images shipped in pip packages).
        output: a directory or fsspec URL for shards/, index.json(l), manifest.parquet, failures.parquet,
            report.json and work/ (the resume ledger). Reusing an output resumes: finished work is skipped.
        profile: `paper` (the paper's models, GPUs), `offline` (real small weights shipped in pip packages,
            CPU, no model hub), `test` (tiny random builds), or a path to a YAML profile.
        overrides: nested config overrides, e.g. {"run": {"batch_size": 16}, "faces": {"min_size_px": 48}}.
        limit: curate at most this many of the videos found (in discovery order), for smoke runs.
        progress: show a progress bar on the terminal.
        executor: `ray` (stage actor pools on a Ray cluster; a local Ray is started when `ray_address` is empty)
            or `local` (every stage in this process: quick to start, one machine).
        ray_address: `auto` (the cluster this machine belongs to), `ray://head:10001`, or empty for a local Ray.
        storage_block: name of a Prefect Secret block holding fsspec storage options (JSON) for an s3:// or gs://
            output or input; without it the usual environment variables (AWS_*, ...) apply.
        gallery: write `<output>/gallery/index.html` (visual QA of the first GALLERY_MAX_SAMPLES samples and of
            the failures) at the end of a run on a local output; linked from the run report.
    """
    called_at = os.environ.pop("LUMOSX_FLOW_CALLED_AT", None)
    prefect_seconds = round(time.time() - float(called_at), 3) if called_at else None
    log = get_run_logger()
    config = load_config(profile, overrides)
    if input == BUILTIN_SAMPLES:
        input = str(_builtin_samples(output))
    engine = Curation(
        config,
        input,
        output,
        executor=executor,
        ray_address=ray_address or None,
        limit=limit,
        storage_options=_storage_options(storage_block),
    )
    engine.prefect_seconds = prefect_seconds
    random_stages = config.random_weight_stages()
    if random_stages:
        log.warning("stages %s use RANDOM-WEIGHT test builds: their samples are not data", random_stages)
    run_key = uuid.uuid4().hex
    _RUNS[run_key] = engine
    bar = _Progress(engine, progress)
    error: BaseException | None = None
    try:
        with engine:
            error = _run_partitions(engine, run_key, config.run, bar)
            report = _finalize(engine, error)
            bar.close()
            if report is not None and gallery:  # while the output's lock is still held
                report["gallery"] = _gallery(engine)
                engine.write_report(report)
    finally:
        _RUNS.pop(run_key, None)
        bar.close()
    if report is not None:
        _publish(report, engine)
    if error is not None:
        reason = engine.aborted or f"{type(error).__name__}: {error}"
        kept = f" ({report['samples']} samples)" if report is not None else ""
        message = f"stopped early: {reason}. Everything committed is kept{kept}; fix the cause and run again to finish"
        log.error(message)
        return Failed(message=message, data=error)  # the CLI maps the error to its exit code
    message = (
        f"{report['samples']} samples in {report['shards']} shards; {report['videos_failed']} of "
        f"{report['videos_found']} videos failed (see failures.parquet)"
    )
    log.info(message)
    # A failed video is data, not a crashed run: the state stays Completed and its message says how many.
    return Completed(message=message, data=report)


def _finalize(engine: Curation, error: BaseException | None) -> dict[str, Any] | None:
    """The run's tables and report; after a full disk they may not fit: the run's own error says why."""
    try:
        return engine.finalize()
    except Exception as exc:
        if error is not None and environment_fault(exc) is not None:
            log = get_run_logger()
            log.warning("could not write the run's tables after it stopped: %s", exc)
            return None
        raise


def _run_partitions(engine: Curation, run_key: str, run, bar: _Progress) -> BaseException | None:
    """Submit partitions as discovery makes them, `partitions_in_flight` at a time; the first error stops it."""
    submit = curate_partition.with_options(retries=run.retries)
    inflight: dict = {}  # Prefect future -> partition number
    errors: list[BaseException] = []

    def wait_until(at_most: int) -> None:
        while len(inflight) > at_most:
            for fut in _wait_any(list(inflight)):
                error = _error_of(fut)
                if error is not None:
                    errors.append(error)
                engine.release_partition(inflight.pop(fut))
            bar.update()

    for part in engine.partitions():
        engine.start_executor_soon()
        engine.keep_partition(part)
        wait_until(run.partitions_in_flight - 1)
        if errors:
            break
        inflight[submit.submit(run_key, part.number)] = part.number
    wait_until(0)
    bar.update()
    return errors[0] if errors else None


def _wait_any(futures: list) -> list:
    """The Prefect futures that are done, waiting at most half a second for one (the progress bar ticks)."""
    wrapped = {f.wrapped_future: f for f in futures}
    done, _ = wait(list(wrapped), timeout=0.5, return_when=FIRST_COMPLETED)
    return [wrapped[w] for w in done]


def _error_of(fut) -> BaseException | None:
    state = fut.wrapped_future.result()  # the task run's final state (it is done: _wait_any said so)
    if state.is_completed():
        return None
    exc = state.result(raise_on_failure=False)
    return exc if isinstance(exc, BaseException) else RuntimeError(str(state.message))


class _Progress:
    """A bar in the terminal and one progress artifact in the Prefect UI, both polled from the engine."""

    def __init__(self, engine: Curation, show: bool):
        self.engine = engine
        self.bar = None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=0, unit="video", desc="curate", dynamic_ncols=True)
        self.last = 0.0
        self.artifact = None
        with contextlib.suppress(Exception):  # progress is best effort (e.g. no API in a bare test)
            self.artifact = create_progress_artifact(0.0, key=f"curate-progress-{_slug(engine.output.url)}")

    def update(self) -> None:
        p = self.engine.progress
        todo = max(p.pending, 1)
        if self.bar is not None:
            self.bar.total = p.pending
            self.bar.n = p.finished
            self.bar.set_postfix(samples=p.samples, failed=p.failed, shards=p.shards, resumed=p.done_before)
            self.bar.refresh()
        now = time.monotonic()
        if self.artifact is not None and now - self.last > 5.0:
            self.last = now
            with contextlib.suppress(Exception):
                update_progress_artifact(self.artifact, min(100.0, 100.0 * p.finished / todo))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _slug(text: str) -> str:
    """Artifact keys are lowercase letters, digits and dashes: one key per output keeps its history apart."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _builtin_samples(output: str) -> Path:
    """Write the sample videos once; a rerun reuses them, so their content ids (and the resume) stay put."""
    from flows.sample_data import make_sample_videos
    from tasks.discovery import is_local, local_path

    base = Path(local_path(output)) if is_local(output) else Path(os.environ.get("TMPDIR", "/tmp")) / "lumosx"
    directory = base / "sample_videos"
    done = directory / ".complete"
    if not done.exists():
        make_sample_videos(directory)
        done.touch()
    return directory


GALLERY_MAX_SAMPLES = 1000
"""The end-of-run gallery shows the first this many samples (`lumosx-curate gallery --max-samples` for more)."""


def _gallery(engine: Curation) -> str | None:
    """The gallery of the output (local outputs only); a gallery that cannot be made never fails the run."""
    if not engine.output.local:
        return None
    from tasks.gallery import build_gallery

    try:
        summary = build_gallery(engine.output, max_samples=GALLERY_MAX_SAMPLES)
    except Exception as exc:  # presentation only: the data is written and verified already
        get_run_logger().warning("could not write the gallery: %s: %s", type(exc).__name__, exc)
        return None
    return summary.path


def _storage_options(block: str | None) -> dict[str, Any] | None:
    if not block:
        return None
    import json

    from prefect.blocks.system import Secret

    value = Secret.load(block).get()
    return json.loads(value) if isinstance(value, str) else dict(value)


def _publish(report: dict[str, Any], engine: Curation) -> None:
    """The run report as a markdown artifact and the failed videos as a table artifact, keyed per output."""
    slug = _slug(engine.output.url)
    with contextlib.suppress(Exception):  # the report is on disk too
        create_markdown_artifact(
            _report_markdown(report, engine.failures),
            key=f"curate-report-{slug}",
            description=f"curate run of {engine.output.url}",
        )
    with contextlib.suppress(Exception):
        rows = [
            {"file": f.uri, "stage": f.stage, "reason": f.error_class, "message": f.message[:300]}
            for f in engine.failures[:1000]
        ]
        if rows:
            create_table_artifact(
                rows,
                key=f"curate-failures-{slug}",
                description=f"failed videos of {engine.output.url} (first 1000 of {len(engine.failures)})",
            )


FAILURE_EXAMPLES = 3


def _report_markdown(report: dict[str, Any], failures: list | None = None) -> str:
    lines = [
        f"# curate: {report['samples']} samples, {report['videos_failed']} failed of {report['videos_found']}",
        "",
        f"output `{report['output']}`, profile `{report['profile']}`, config `{report['config_fingerprint']}`, "
        f"executor `{report['executor']}`",
        "",
    ]
    if report.get("gallery"):
        uri = Path(report["gallery"]).resolve().as_uri()
        lines += [
            f"**gallery**: [{report['gallery']}]({uri}) (open it in a browser on the output's machine)",
            "",
        ]
    if report["aborted"]:
        lines += [f"**STOPPED EARLY**: {report['aborted']}", ""]
    if report["random_weight_samples"]:
        lines += [
            f"**RANDOM WEIGHTS** made {report['random_weight_samples']} samples: not training data.",
            "",
        ]
    lines += [
        "| stage | processed | reused | failed | busy s | s/video | replicas |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for name, s in report["stages"].items():
        fails = ", ".join(f"{k}: {v}" for k, v in s["failed"].items()) or "-"
        lines.append(
            f"| {name} | {s['processed']} | {s['reused']} | {fails} | {s['busy_seconds']} | "
            f"{s['seconds_per_video'] if s['seconds_per_video'] is not None else '-'} | {s['replicas'] or '-'} |"
        )
    if report["failures_by_reason"]:
        examples: dict[str, list[str]] = {}
        for f in failures or []:
            names = examples.setdefault(f.error_class, [])
            if len(names) < FAILURE_EXAMPLES:
                names.append(f"`{Path(f.uri).name}` ({f.stage})")
        lines += ["", "| failure reason | videos | examples |", "|---|---:|---|"]
        for k, v in sorted(report["failures_by_reason"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {k} | {v} | {', '.join(examples.get(k, [])) or '-'} |")
    if report["skipped"]:
        lines += ["", "skipped: " + ", ".join(f"{k} {v['count']}" for k, v in report["skipped"].items())]
    lines += [
        "",
        f"wall {report['wall_seconds']} s = start-up {report['startup_seconds']} s + work {report['work_seconds']} s; "
        f"overhead {report['overhead']} (work / the ideal time: the stages' busy time one after another in one "
        "process, or, on Ray, the busiest stage's busy time per replica; 1.0 = none)",
    ]
    prefect_s = (report.get("startup") or {}).get("prefect_seconds")
    if prefect_s is not None:
        lines.append(f"plus {prefect_s} s before the flow body ran (Prefect, its temporary server included)")
    return "\n".join(lines)
