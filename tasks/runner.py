"""Run one stage over one batch of videos: reuse, isolation, failure rows, statistics.

This is the one piece of code between a stage and whatever executes it (the in-process executor of the demo and
tests, or a Ray actor on a cluster): both call `run_stage`, so both make the same records and the same failures.

- A video whose journey ended (a failure, a duplicate) is passed through untouched.
- A video whose record for this stage was restored from the resume ledger (same fingerprint) is not recomputed.
- A `StageError` is that video's failure row. Any other exception from `process` is retried one video at a time,
  so one bad video cannot fail its batch-mates; what still fails is recorded with its exception class.
- A `TransientError` (CUDA OOM under contention, an I/O hiccup) retries the batch with backoff first.
- An `EnvironmentFault` (disk full, out of memory) is never a video's failure: it propagates and stops the run.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

from schemas.records import VideoRecord
from tasks.base import EnvironmentFault, Stage, StageError, TransientError, VideoContext, environment_fault

logger = logging.getLogger(__name__)


@dataclass
class StageStats:
    """What one stage did to the videos it saw (summed over batches, replicas and partitions)."""

    stage: str
    processed: int = 0
    """Videos this stage computed in this run."""
    reused: int = 0
    """Videos whose record this stage took from the ledger of an earlier run (same fingerprint)."""
    ok: int = 0
    failed: Counter = field(default_factory=Counter)
    """Failure reason -> count, for videos that failed in this stage in this run."""
    seconds: float = 0.0
    """Time inside the stage's `process` (its busy time; waiting for work is not counted)."""
    batches: int = 0

    def merge(self, other: StageStats) -> None:
        self.processed += other.processed
        self.reused += other.reused
        self.ok += other.ok
        self.failed.update(other.failed)
        self.seconds += other.seconds
        self.batches += other.batches


def is_transient(exc: BaseException) -> bool:
    # CUDA OOM under contention from another stage: worth a retry with backoff, not yet a failure row.
    return isinstance(exc, TransientError) or type(exc).__name__ == "OutOfMemoryError"


def run_stage(
    stage: Stage, items: list[VideoContext], *, retries: int = 2, backoff_s: float = 2.0
) -> StageStats:
    """Run `stage` over the live videos of `items`, in place; returns what it did."""
    stats = StageStats(stage=stage.name, batches=1)
    todo: list[VideoContext] = []
    for ctx in items:
        if ctx.failure is not None or ctx.alias_of is not None:
            continue
        if stage.reusable and stage.name in ctx.records:
            stats.reused += 1
            stats.ok += 1
            continue
        todo.append(ctx)
    if not todo:
        return stats

    before = {id(ctx): set(ctx.media) for ctx in todo}
    keys = {id(ctx): stage.result_key(ctx) for ctx in todo}
    t0 = time.perf_counter()
    results = _with_retries(stage, todo, retries, backoff_s)
    stats.seconds = time.perf_counter() - t0
    for ctx in todo:
        for name in set(ctx.media) - before[id(ctx)]:
            ctx.media_stage[name] = stage.name
    stats.processed = len(todo)

    for ctx in todo:
        res = results.get(keys[id(ctx)])
        if res is None:
            res = StageError("no_result", f"stage {stage.name} returned nothing for this video")
        if isinstance(res, Exception):
            reason = res.reason if isinstance(res, StageError) else type(res).__name__
            ctx.fail(stage.name, reason, str(res) or reason)
            stats.failed[reason] += 1
            logger.info("%s failed %s (%s): %s", stage.name, ctx.uri, reason, res)
        else:
            ctx.records[stage.name] = res
            if isinstance(res, VideoRecord):  # ingest: the file is now a video
                ctx.video = res
            stats.ok += 1
    return stats


def _with_retries(
    stage: Stage, batch: list[VideoContext], retries: int, backoff_s: float
) -> dict[str, object]:
    for attempt in range(retries + 1):
        try:
            return _process_isolated(stage, batch, transient_raises=attempt < retries)
        except EnvironmentFault:
            raise
        except Exception as exc:  # noqa: BLE001 - only transient errors reach here
            delay = backoff_s * 2**attempt
            logger.warning("%s: transient error (%s); retrying the batch in %.0f s", stage.name, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _process_isolated(
    stage: Stage, batch: list[VideoContext], *, transient_raises: bool
) -> dict[str, object]:
    try:
        return dict(stage.process(batch))
    except Exception as exc:  # noqa: BLE001 - classified below
        fault = environment_fault(exc)
        if fault is not None:
            raise fault from exc
        if is_transient(exc) and transient_raises:
            raise
        if len(batch) == 1:
            logger.debug("stage %s crashed on %s:\n%s", stage.name, batch[0].uri, traceback.format_exc())
            return {stage.result_key(batch[0]): exc}
        logger.info(
            "stage %s batch failed (%s); retrying its %d videos one by one", stage.name, exc, len(batch)
        )
        results: dict[str, object] = {}
        for ctx in batch:
            results.update(_process_isolated(stage, [ctx], transient_raises=False))
        return results


def end_journeys(items: list[VideoContext], verdicts: dict[str, tuple[str, str]]) -> None:
    """Apply the driver's verdicts after ingest: uri -> ("duplicate", message) or ("alias", video id).

    A duplicate (the same bytes as a file another partition already claimed) becomes a failure row; an alias
    (a renamed file whose sample is already in the shards) stops without one.
    """
    for ctx in items:
        verdict = verdicts.get(ctx.uri)
        if verdict is None or ctx.failure is not None:
            continue
        kind, detail = verdict
        if kind == "duplicate":
            ctx.fail("ingest", "duplicate", detail)
        elif kind == "alias":
            ctx.alias_of = detail
        else:
            raise ValueError(f"unknown verdict {kind!r}")
