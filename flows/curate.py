"""The `curate` flow: raw videos -> per-stage records -> WebDataset shards, manifest and index.

Run it from the CLI (`lumosx-curate run`), from Python (`curate(input=..., output=...)`) or as the Prefect
deployment `curate/raw-videos` (prefect.yaml). Tasks map over *batches* of video ids: frames never travel
through Prefect, only ids and small records; every stage reads and writes its records in the work directory.
Batches are pipelined: batch 2 can be captioned while batch 1 is in face detection.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner

from models.base import resolve_device
from schemas.config import CurateConfig, fingerprint, load_config
from schemas.records import FailureRecord
from tasks.base import TransientError, WorkDir, atomic_write_json
from tasks.pipeline import ingest_fingerprint, stage_classes, stage_fingerprints
from tasks.runner import BatchOutcome, run_stage_batch

logger = logging.getLogger(__name__)

BUILTIN_SAMPLES = "builtin:samples"
"""`input` value that curates the built-in sample videos (written to <output>/sample_videos): the demo, and the
default of the `raw-videos` deployment so that it runs on a fresh machine before anyone points it at data."""


def _retry_transient(task, task_run, state) -> bool:
    """Retry a batch only for errors that may go away (I/O, CUDA OOM); a bad video is a failure row instead."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, (TransientError, OSError)) or type(exc).__name__ == "OutOfMemoryError"


_TASK_OPTIONS: dict[str, Any] = dict(
    cache_policy=NO_CACHE,  # resume is done by the record store, keyed by configuration fingerprints
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=_retry_transient,
    persist_result=False,
)


@task(name="ingest", task_run_name="ingest-{batch_no}", **_TASK_OPTIONS)
def ingest_task(uris: list[str], config: CurateConfig, work_root: str, batch_no: int) -> BatchOutcome:
    from tasks.ingest import ingest_batch

    work = WorkDir(work_root)
    t0 = time.perf_counter()
    records, failures = ingest_batch(uris, config, work)
    out = BatchOutcome(stage="ingest", ok=[r.video_id for r in records], processed=len(uris))
    out.failed.update(f.error_class for f in failures)
    out.seconds = time.perf_counter() - t0
    return out


@task(name="stage", task_run_name="{stage_name}-{batch_no}", **_TASK_OPTIONS)
def stage_task(
    stage_name: str,
    upstream: BatchOutcome | list[str],
    config: CurateConfig,
    work_root: str,
    fingerprints: dict[str, str],
    batch_no: int,
) -> BatchOutcome:
    """One stage over one batch. `upstream` is the previous stage's outcome for this batch (its ok ids go on)."""
    video_ids = upstream if isinstance(upstream, list) else upstream.ok
    work = WorkDir(work_root)
    cls = next(c for c in stage_classes(config) if c.name == stage_name)
    stage = cls(config, work)
    on_gpu = cls.uses_gpu and any(resolve_device(s.device).startswith("cuda") for s in stage.model_specs())
    if on_gpu and config.run.gpu_slot:
        # A global concurrency limit caps how many batches use the GPUs at once across all workers.
        from prefect.concurrency.sync import concurrency

        with concurrency(config.run.gpu_slot, occupy=1, strict=False):
            return run_stage_batch(stage, video_ids, fingerprints, retry_failed=config.run.retry_failed)
    return run_stage_batch(stage, video_ids, fingerprints, retry_failed=config.run.retry_failed)


@task(name="write-shards", **_TASK_OPTIONS)
def write_shards_task(
    output: str, work_root: str, sample_ids: list[str], config: CurateConfig, sample_fp: str
):
    from tasks.shards import PendingSample, write_manifest, write_shards

    work = WorkDir(work_root)
    t0 = time.perf_counter()
    pending = [
        PendingSample(key=k, directory=work.samples / k, fingerprint=sample_fp) for k in sorted(sample_ids)
    ]
    summary = write_shards(Path(output), pending, config.shards)
    rows, random_stages = write_manifest(Path(output), work)
    return summary, rows, random_stages, time.perf_counter() - t0


def _chunks(items: list[str], n: int) -> list[list[str]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


class _Progress:
    """A bar per stage in the terminal and one progress artifact in the Prefect UI."""

    def __init__(self, stages: list[str], total_batches: int, show: bool):
        self.total = max(1, total_batches * len(stages))
        self.done = 0
        self.last_update = time.monotonic()
        self.bars = {}
        if show:
            from tqdm.auto import tqdm

            self.bars = {
                s: tqdm(total=total_batches, desc=f"{s:>10}", unit="batch", position=i, leave=True)
                for i, s in enumerate(stages)
            }
        try:
            self.artifact = create_progress_artifact(
                0.0, key="curate-progress", description="batches x stages"
            )
        except Exception:  # noqa: BLE001 - progress is best effort (e.g. no API in a bare test)
            self.artifact = None

    def step(self, stage: str) -> None:
        self.done += 1
        if stage in self.bars:
            self.bars[stage].update(1)
        # Each update is an API round trip: at most one every few seconds, and the last one.
        now = time.monotonic()
        if self.artifact is not None and (now - self.last_update > 5.0 or self.done == self.total):
            self.last_update = now
            with contextlib.suppress(Exception):  # progress is best effort
                update_progress_artifact(self.artifact, 100.0 * self.done / self.total)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


# Threads overlap the stages of different batches (one model instance is never called by two at once, see
# tasks/runner.py). LUMOSX_CURATE_THREADS sizes the pool; on a cluster, swap the runner itself with
# curate.with_options(task_runner=DaskTaskRunner(...)) from prefect-dask, or RayTaskRunner from prefect-ray.
DEFAULT_THREADS = int(os.environ.get("LUMOSX_CURATE_THREADS", "4"))


@flow(name="curate", task_runner=ThreadPoolTaskRunner(max_workers=DEFAULT_THREADS), validate_parameters=True)
def curate(
    input: str,
    output: str,
    profile: str = "paper",
    overrides: dict[str, Any] | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Curate raw videos into LumosX training shards; returns the run report (also written to report.json).

    Args:
        input: a directory (searched recursively), a glob, or an fsspec URL of videos; or `builtin:samples`
            for the built-in sample videos (made from images shipped in pip packages).
        output: where shards/, manifest.parquet, index.json, failures.parquet, report.json and work/ go.
            Reusing an output directory resumes: finished work with the same configuration is skipped.
        profile: `paper` (the paper's models, GPUs), `offline` (real small weights shipped in pip packages,
            CPU, no model hub), `test` (tiny random builds), or a path to a YAML profile.
        overrides: nested config overrides, e.g. {"run": {"batch_size": 16}, "faces": {"min_size_px": 48}}.
        limit: process at most this many videos (after sorting), for smoke runs.
        progress: show per-stage progress bars on the terminal.
    """
    log = get_run_logger()
    t_start = time.perf_counter()
    config = load_config(profile, overrides)
    out_dir = Path(output)
    work = WorkDir(out_dir / "work")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "config.json", config)
    random_stages = config.random_weight_stages()
    if random_stages:
        log.warning(
            "stages %s are configured with RANDOM-WEIGHT test builds: whatever they produce is flagged as not data",
            random_stages,
        )

    from tasks.ingest import discover

    if input == BUILTIN_SAMPLES:
        input = str(_builtin_samples(out_dir / "sample_videos"))
    uris = discover(input, config.ingest.extensions)
    if limit is not None:
        uris = uris[:limit]
    log.info("found %d videos under %s", len(uris), input)

    stages = [c.name for c in stage_classes(config)]
    fps = stage_fingerprints(config, work)
    outcomes: dict[str, BatchOutcome] = {s: BatchOutcome(stage=s) for s in ["ingest", *stages]}

    # Ingest first, as a barrier: identical files at two paths collapse to one content id before batching.
    # Retries are configuration (the decorator's value is only the default).
    ingest = ingest_task.with_options(retries=config.run.retries)
    run_stage = stage_task.with_options(retries=config.run.retries)
    ingest_futures = [
        ingest.submit(batch, config, str(work.root), i)
        for i, batch in enumerate(_chunks(uris, config.run.batch_size))
    ]
    for fut in ingest_futures:
        outcomes["ingest"].merge(fut.result())
    video_ids = sorted(set(outcomes["ingest"].ok))

    batches = _chunks(video_ids, config.run.batch_size)
    bar = _Progress(stages, len(batches), progress)
    # A sliding window of batches: each batch's chain of stage tasks is submitted when an earlier batch has
    # left the pipeline, so a million-video run never holds (or registers with the server) every task at once.
    todo = list(enumerate(batches))[::-1]
    in_flight: dict[PrefectFuture, str] = {}
    open_chains = 0
    while todo or in_flight:
        while todo and open_chains < config.run.max_batches_in_flight:
            i, batch = todo.pop()
            upstream: Any = batch
            for name in stages:
                upstream = run_stage.submit(name, upstream, config, str(work.root), fps, i)
                in_flight[upstream] = name
            open_chains += 1
        fut = next(as_completed(list(in_flight)))
        name = in_flight.pop(fut)
        outcomes[name].merge(fut.result())
        bar.step(name)
        if name == stages[-1]:
            open_chains -= 1
    bar.close()

    sample_ids = outcomes["sample"].ok
    summary, rows, random_in_samples, shard_seconds = write_shards_task(
        str(out_dir), str(work.root), sample_ids, config, fps["sample"]
    )

    failures = _current_failures(work, uris, video_ids, fps, config)
    from tasks.shards import write_failures

    write_failures(out_dir, failures)
    failed_videos = len({f.uri for f in failures})
    wall = time.perf_counter() - t_start
    compute = sum(o.seconds for o in outcomes.values()) + shard_seconds
    report = {
        "profile": config.profile,
        "config_fingerprint": fingerprint(config),
        "random_weight_stages": random_in_samples,
        "configured_random_weight_stages": random_stages,
        "videos_found": len(uris),
        "videos_failed": failed_videos,
        "samples": summary.total_samples,
        "shards": summary.total_shards,
        "samples_written_this_run": summary.written_samples,
        "manifest_rows": rows,
        "stages": {
            name: {
                "ok": len(o.ok),
                "processed": o.processed,
                "skipped_resumed": o.skipped,
                "failed": dict(sorted(o.failed.items())),
                "seconds": round(o.seconds, 3),
                "seconds_per_video": round(o.seconds / o.processed, 4) if o.processed else None,
            }
            for name, o in outcomes.items()
        },
        "shard_seconds": round(shard_seconds, 3),
        "wall_seconds": round(wall, 3),
        "compute_seconds": round(compute, 3),
        "orchestration_overhead": round(wall / compute, 3) if compute > 0 else None,
    }
    atomic_write_json(out_dir / "report.json", report)
    try:
        create_markdown_artifact(
            _report_markdown(report), key="curate-report", description="curate run report"
        )
    except Exception as exc:  # noqa: BLE001 - the report is also on disk
        log.info("could not create the report artifact: %s", exc)
    message = (
        f"{summary.total_samples} samples in {summary.total_shards} shards; "
        f"{failed_videos} of {len(uris)} videos failed (see failures.parquet)"
    )
    log.info(message)
    # A failed video is data, not a crashed run: the state stays Completed and its message says how many.
    return Completed(message=message, data=report)


def _builtin_samples(directory: Path) -> Path:
    """Write the sample videos once; a rerun reuses them, so their content ids (and the resume) stay put."""
    from flows.sample_data import make_sample_videos

    done = directory / ".complete"
    if not done.exists():
        make_sample_videos(directory)
        done.touch()
    return directory


def _current_failures(
    work: WorkDir, uris: list[str], video_ids: list[str], fps: dict[str, str], config: CurateConfig
) -> list[FailureRecord]:
    """Failure rows of this run's inputs under the current configuration (old configurations are history)."""
    out: list[FailureRecord] = []
    ingest_dir = work.records / "ingest"
    if ingest_dir.is_dir():
        wanted = set(uris)
        for path in sorted(ingest_dir.glob("*.json")):
            data = json.loads(path.read_text())
            if data["status"] == "failed" and data["fingerprint"] == ingest_fingerprint(config):
                failure = FailureRecord.model_validate(data["failure"])
                if failure.uri in wanted:
                    out.append(failure)
    for vid in video_ids:
        for stage in fps:
            if stage == "ingest":
                continue
            data = work.load(stage, vid)
            if data and data["status"] == "failed" and data["fingerprint"] == fps[stage]:
                out.append(FailureRecord.model_validate(data["failure"]))
    return out


def _report_markdown(report: dict[str, Any]) -> str:
    lines = [f"# curate run: {report['samples']} samples, {report['videos_failed']} failed videos", ""]
    if report["random_weight_stages"]:
        lines += [
            f"**RANDOM WEIGHTS** in {', '.join(report['random_weight_stages'])}: not training data.",
            "",
        ]
    lines += ["| stage | ok | processed | resumed | seconds | failures |", "|---|---|---|---|---|---|"]
    for name, s in report["stages"].items():
        fails = ", ".join(f"{k}: {v}" for k, v in s["failed"].items()) or "-"
        lines.append(
            f"| {name} | {s['ok']} | {s['processed']} | {s['skipped_resumed']} | {s['seconds']} | {fails} |"
        )
    lines += [
        "",
        f"wall {report['wall_seconds']} s, compute {report['compute_seconds']} s, "
        f"overhead {report['orchestration_overhead']}",
    ]
    return "\n".join(lines)
