"""What an executor does, and the in-process executor (the demo, tests, one machine without Ray).

An executor takes a batch of discovered files through every stage of a `Pipeline` and hands the finished videos
to the partition's shard writer. Two implementations, one contract:

- `LocalExecutor` (here): every stage in this process, one batch at a time. Starts instantly; what the demo and
  most tests use.
- `RayExecutor` (tasks/ray_executor.py): every stage a pool of Ray actors spread over a cluster's GPUs and CPUs,
  batches streaming between them through Ray's object store.

Both run a batch with the same functions (`restore_seeds`, `run_stage`, `end_journeys`), so both make the same
samples, byte for byte (tested).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from schemas.records import SourceFile
from tasks.base import Stage, VideoContext
from tasks.output import OutputDir
from tasks.pipeline import Pipeline
from tasks.runner import StageStats, end_journeys, run_stage
from tasks.shards import Commit, PartitionWriter

Verdicts = Callable[[list[tuple[str, str]]], dict[str, tuple[str, str]]]
"""Called on the driver after ingest with (uri, content id) pairs: uri -> ("duplicate", why) | ("alias", id)."""


@dataclass
class Batch:
    partition: int
    number: int
    sources: list[SourceFile]
    after_ingest: Verdicts | None = None

    def contexts(self, pipeline: Pipeline) -> list[VideoContext]:
        return [VideoContext(source=s, fingerprints=dict(pipeline.fingerprints)) for s in self.sources]


@dataclass
class BatchResult:
    """A batch that went through every stage. `payload` is what the partition's writer takes."""

    payload: Any
    stats: dict[str, StageStats]
    served_by: list[dict] = field(default_factory=list)
    """Per stage call: stage, actor, node, GPUs (the Ray executor fills it; tests check placement with it)."""


class Writer(Protocol):
    """A partition's shard writer. `add` returns at once: the writing overlaps the stages' work."""

    def add(self, batch_no: int, payload: Any) -> Future[list[Commit]]: ...
    def close(self) -> list[Commit]: ...
    def abort(self) -> None: ...


class Executor(Protocol):
    name: str

    def start(self) -> dict[str, Any]: ...
    def submit(self, batch: Batch) -> Future[BatchResult]: ...
    def open_writer(self, partition: int, start_seq: int) -> Writer: ...
    def replicas(self) -> dict[str, int]: ...
    def stop(self) -> None: ...


def ingested(items: list[VideoContext]) -> list[tuple[str, str]]:
    """(uri, content id) of the batch's videos that ingest turned into videos."""
    return [(c.uri, c.video.video_id) for c in items if c.video is not None and c.failure is None]


# ---------------------------------------------------------------------------------------------- in process
class _LocalWriter:
    def __init__(self, writer: PartitionWriter):
        self.writer = writer

    def add(self, batch_no: int, payload: list[VideoContext]) -> Future[list[Commit]]:
        fut: Future[list[Commit]] = Future()
        try:
            fut.set_result(self.writer.add(batch_no, payload))
        except BaseException as exc:  # noqa: BLE001 - handed over through the future
            fut.set_exception(exc)
        return fut

    def close(self) -> list[Commit]:
        return self.writer.close()

    def abort(self) -> None:
        self.writer.abort()


class LocalExecutor:
    """Every stage in this process; models load once (at `start`) and serve every batch of every partition."""

    name = "local"

    def __init__(self, pipeline: Pipeline, output: OutputDir, *, stages: list[Stage] | None = None):
        self.pipeline, self.output = pipeline, output
        self.stages = stages if stages is not None else [cls(pipeline.config) for cls in pipeline.classes]
        # Stage instances hold models that are not safe to call from two threads (dlib and HOG crash): partitions
        # that run in parallel threads take turns here.
        self._lock = threading.Lock()

    def start(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        for stage in self.stages:
            stage.setup()
        return {"executor": self.name, "model_load_seconds": round(time.perf_counter() - t0, 3)}

    def replicas(self) -> dict[str, int]:
        return {s.name: 1 for s in self.stages}

    def submit(self, batch: Batch) -> Future[BatchResult]:
        fut: Future[BatchResult] = Future()
        try:
            with self._lock:
                fut.set_result(self.run(batch))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
            fut.set_exception(exc)
        return fut

    def run(self, batch: Batch) -> BatchResult:
        from tasks.ledger import restore_seeds

        items = batch.contexts(self.pipeline)
        restore_seeds(items, self.output, self.pipeline)
        stats: dict[str, StageStats] = {}
        retries = self.pipeline.config.run.retries
        for i, stage in enumerate(self.stages):
            stats[stage.name] = run_stage(stage, items, retries=retries)
            if i == 0 and batch.after_ingest is not None:
                end_journeys(items, batch.after_ingest(ingested(items)))
        return BatchResult(payload=items, stats=stats)

    def open_writer(self, partition: int, start_seq: int) -> Writer:
        cfg = self.pipeline.config.shards
        return _LocalWriter(PartitionWriter(self.output, self.pipeline, partition, start_seq, cfg))

    def stop(self) -> None:
        pass
