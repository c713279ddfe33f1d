"""Run one stage over one batch of videos: skip finished work, isolate failures, write atomically.

This is the only place that knows about resume and failure rows; stages stay plain `process(batch)` functions.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field

from schemas.records import FailureRecord, VideoRecord
from tasks.base import Stage, StageError, TransientError, VideoContext, WorkDir

logger = logging.getLogger(__name__)


@dataclass
class BatchOutcome:
    """What one stage did to one batch; summed into the run report."""

    stage: str
    ok: list[str] = field(default_factory=list)
    skipped: int = 0
    """Videos whose record already existed for this fingerprint (resumed runs)."""
    failed: Counter = field(default_factory=Counter)
    """Failure reasons -> count, for videos that failed in this run or in an earlier one with this fingerprint."""
    seconds: float = 0.0
    """Compute seconds spent in setup() + process() (excludes skipped work)."""
    processed: int = 0

    def merge(self, other: BatchOutcome) -> None:
        self.ok += other.ok
        self.skipped += other.skipped
        self.failed.update(other.failed)
        self.seconds += other.seconds
        self.processed += other.processed


_MODEL_LOCKS: dict[str, threading.Lock] = {}
_MODEL_LOCKS_GUARD = threading.Lock()


def _model_locks(stage: Stage) -> list[threading.Lock]:
    """One lock per model instance in this process, taken in a fixed order.

    Batches are pipelined on a thread pool, so two batches can reach the same stage, or two stages the same
    cached model (the background plate check reuses the person detector), at once. dlib, OpenCV's HOG and
    most GPU models are not safe to call from two threads on one instance (seen: SIGSEGV in dlib), and a GPU
    model gains nothing from it: calls to one model are serialized, different models still run side by side.
    """
    keys = sorted({spec.model_dump_json() for spec in stage.model_specs()})
    with _MODEL_LOCKS_GUARD:
        return [_MODEL_LOCKS.setdefault(k, threading.Lock()) for k in keys]


def _load_video(work: WorkDir, video_id: str) -> VideoRecord:
    data = work.load("ingest", video_id)
    assert data is not None and data["status"] == "ok", f"{video_id} was not ingested"
    return VideoRecord.model_validate(data["record"])


def run_stage_batch(
    stage: Stage, video_ids: list[str], fingerprints: dict[str, str], *, retry_failed: bool = False
) -> BatchOutcome:
    """Process the videos of `video_ids` that have no record for this stage's fingerprint.

    Returns ids that have an ok record afterwards (new or resumed); those go to the next stage.
    A `StageError` for one video becomes its failure row. Any other exception from `process` is retried one
    video at a time, so one bad video cannot fail its batch-mates; what still fails is recorded with its
    exception class. `TransientError` (and CUDA OOM) propagate so Prefect can retry the batch.
    """
    work, fp = stage.work, fingerprints[stage.name]
    out = BatchOutcome(stage=stage.name)
    todo: list[VideoContext] = []
    for vid in video_ids:
        prev = work.load(stage.name, vid)
        if prev is not None and prev["fingerprint"] == fp:
            if prev["status"] == "ok":
                out.ok.append(vid)
                out.skipped += 1
                continue
            if not retry_failed:
                out.failed[prev["failure"]["error_class"]] += 1
                out.skipped += 1
                continue
        todo.append(VideoContext(video=_load_video(work, vid), work=work, fingerprints=fingerprints))
    if not todo:
        return out

    with ExitStack() as held:
        for lock in _model_locks(stage):
            held.enter_context(lock)
        # Compute time starts once the models are ours: waiting for another batch is not this stage's work.
        t0 = time.perf_counter()
        stage.setup()
        results = _process_isolated(stage, todo)
        out.seconds = time.perf_counter() - t0
    out.processed = len(todo)

    for ctx in todo:
        res = results.get(ctx.video_id)
        if res is None:
            res = StageError("no_result", f"stage {stage.name} returned nothing for this video")
        if isinstance(res, Exception):
            reason = res.reason if isinstance(res, StageError) else type(res).__name__
            failure = FailureRecord(
                video_id=ctx.video_id,
                uri=ctx.video.uri,
                stage=stage.name,
                error_class=reason,
                message=str(res)[:2000],
            )
            work.save_failure(stage.name, ctx.video_id, fp, failure)
            out.failed[reason] += 1
            logger.warning("%s failed %s: %s: %s", stage.name, ctx.video_id, reason, res)
        else:
            work.save_ok(stage.name, ctx.video_id, fp, res)
            out.ok.append(ctx.video_id)
    return out


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, TransientError):
        return True
    # CUDA OOM under contention from another stage: worth a retry with backoff, not a failure row.
    return type(exc).__name__ == "OutOfMemoryError"


def _process_isolated(stage: Stage, batch: list[VideoContext]) -> dict[str, object]:
    try:
        return dict(stage.process(batch))
    except Exception as exc:  # noqa: BLE001 - we re-raise transient errors, record the rest per video
        if _is_transient(exc):
            raise
        if len(batch) == 1:
            logger.debug("stage %s crashed on %s:\n%s", stage.name, batch[0].video_id, traceback.format_exc())
            return {batch[0].video_id: exc}
        logger.info(
            "stage %s batch failed (%s); retrying its %d videos one by one", stage.name, exc, len(batch)
        )
        results: dict[str, object] = {}
        for ctx in batch:
            results.update(_process_isolated(stage, [ctx]))
        return results
