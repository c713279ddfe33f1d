"""A curation run, without Prefect: discovery -> partitions -> an executor -> shards, ledger, tables, report.

`flows/curate.py` drives it as one Prefect task per partition; tests and benchmarks drive it directly. The steps:

1. `open`: take the output's lock, read the ledger's small columns, make the output agree with it (a killed run's
   leftovers go, damaged shards are redone).
2. `partitions()`: discovery streams files; a file the ledger says is done under the current fingerprints is
   skipped without opening it; the others are grouped into partitions of `run.partition_size`, numbered after
   the ledger's last partition.
3. `run_partition(p)`: batches of the partition stream through the executor, at most `run.batches_in_flight` at
   once, into the partition's writer, which commits shards as they fill. Safe to call again for the same
   partition (a Prefect retry): what was committed is not redone.
4. `finalize()`: index.json, manifest.parquet, failures.parquet, report.json.

The executor starts on the first partition that has work: a rerun with nothing to do never starts Ray or loads a
model.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any

from schemas.config import CurateConfig
from schemas.records import FailureRecord, SourceFile
from tasks.base import EnvironmentFault, environment_fault
from tasks.discovery import Skip, discover, is_local, local_path
from tasks.execution import Batch, Executor, LocalExecutor
from tasks.ledger import Claims, LedgerIndex, parse_part, read_index
from tasks.lock import OutputLock
from tasks.output import CONFIG, INDEX_LINES, LEDGER, REPORT, OutputDir
from tasks.pipeline import Pipeline
from tasks.runner import StageStats
from tasks.shards import Commit, DatasetSummary, finalize, reconcile

logger = logging.getLogger(__name__)

SKIP_EXAMPLES = 5


@dataclass
class Partition:
    number: int
    sources: list[SourceFile]


@dataclass
class PartitionSummary:
    number: int
    videos: int
    samples: int = 0
    failed: Counter = field(default_factory=Counter)
    aliases: int = 0
    shards: list[str] = field(default_factory=list)
    resumed: int = 0
    """Videos of this partition committed by an earlier attempt (a retried partition)."""


@dataclass
class Progress:
    """Counters the flow shows while the run goes on (thread-safe through the engine's lock)."""

    found: int = 0
    done_before: int = 0
    pending: int = 0
    finished: int = 0
    samples: int = 0
    failed: int = 0
    shards: int = 0


class Curation:
    """One curation run over `input` into `output` (see the module docstring)."""

    def __init__(
        self,
        config: CurateConfig,
        input: str,
        output: str,
        *,
        executor: str = "ray",
        ray_address: str | None = None,
        limit: int | None = None,
        storage_options: dict[str, Any] | None = None,
        pipeline: Pipeline | None = None,
    ):
        self.config = config
        self.input = input
        self.output = OutputDir(output, storage_options)
        self.executor_kind = executor
        self.ray_address = ray_address
        self.limit = limit
        self.pipeline = pipeline or Pipeline.for_config(config)
        self.run_id = uuid.uuid4().hex[:12]
        self.lock = OutputLock(self.output, self.run_id)
        self.index = LedgerIndex()
        self.claims: Claims | None = None
        self.executor: Executor | None = None
        self.startup: dict[str, Any] = {}
        self.progress = Progress()
        self.stage_stats: dict[str, StageStats] = {n: StageStats(stage=n) for n in self.pipeline.names}
        self.partition_summaries: list[PartitionSummary] = []
        self.discovery_failures: list[FailureRecord] = []
        self.skips: dict[str, list[str]] = {}
        self.seen: set[str] = set()
        self.aborted: str | None = None
        self.reconciled: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._exec_lock = threading.Lock()
        self._abort = threading.Event()
        self._t0 = time.perf_counter()
        self._t_work: float | None = None
        self._served: list[dict] = []
        self.keep_served = False
        self._partitions: dict[int, Partition] = {}
        self._starter: threading.Thread | None = None
        self._start_error: BaseException | None = None
        self.failures: list[FailureRecord] = []
        self.prefect_seconds: float | None = None
        """Seconds Prefect took to reach the flow's body (its temporary server's start), when the CLI measured it."""

    # -- 1. open
    def open(self) -> Curation:
        self.output.makedirs("")
        self.lock.acquire()
        try:
            self.output.write_bytes(CONFIG, self.config.model_dump_json(indent=1).encode())
            index = read_index(self.output)
            rec = reconcile(self.output, index)
            self.reconciled = {
                "removed_temporary": rec.removed_temporary,
                "removed_orphan_shards": rec.removed_orphans,
                "damaged_shards_redone": rec.damaged,
            }
            self.index = read_index(self.output) if (rec.damaged or rec.removed_orphans) else index
            self.claims = Claims(self.index, self._exists)
        except BaseException:
            self.lock.release()
            raise
        return self

    def close(self) -> None:
        try:
            if self.executor is not None:
                self.executor.stop()
                self.executor = None
        finally:
            self.lock.release()

    def __enter__(self) -> Curation:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _exists(uri: str) -> bool:
        if is_local(uri):
            return os.path.exists(local_path(uri))
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return fs.exists(path)

    # -- 2. partitions
    def partitions(self) -> Iterator[Partition]:
        """Partitions of the files that are not done, as discovery finds them."""
        size = self.config.run.partition_size
        number = self.index.next_partition
        pending: list[SourceFile] = []
        candidates = 0
        exclude = [self.output.root] if self.output.local else []
        for found in discover(self.input, self.config.ingest.extensions, exclude=exclude):
            if isinstance(found, Skip):
                examples = self.skips.setdefault(found.reason, [])
                examples.append(found.uri)
                continue
            if self.limit is not None and candidates >= self.limit:
                break
            candidates += 1
            with self._lock:
                self.progress.found += 1
            if isinstance(found, FailureRecord):
                self.discovery_failures.append(found)
                continue
            self.seen.add(found.uri)
            done, src = self.index.done(found, self.pipeline, self.config.run.retry_failed)
            if not done and self.claims is not None:
                done = self.claims.still_duplicate(found.uri, self.index, found.state)
            if done:
                with self._lock:
                    self.progress.done_before += 1
                continue
            pending.append(src)
            with self._lock:
                self.progress.pending += 1
            if len(pending) >= size:
                yield Partition(number, pending)
                number, pending = number + 1, []
        if pending:
            yield Partition(number, pending)

    def keep_partition(self, part: Partition) -> None:
        """Hold a partition for `partition(number)`: what a Prefect task run (given only its number) works on."""
        with self._lock:
            self._partitions[part.number] = part

    def partition(self, number: int) -> Partition:
        return self._partitions[number]

    def release_partition(self, number: int) -> None:
        """Forget a finished partition's file list (a million-video run keeps only the partitions in flight)."""
        with self._lock:
            self._partitions.pop(number, None)

    # -- 3. one partition
    def start_executor_soon(self) -> None:
        """Start the executor in the background (it overlaps discovery); `run_partition` waits for it."""
        with self._exec_lock:
            if self.executor is not None or self._starter is not None:
                return

            def start() -> None:
                try:
                    self.ensure_executor()
                except BaseException as exc:  # noqa: BLE001 - raised again by ensure_executor's callers
                    self._start_error = exc

            self._starter = threading.Thread(target=start, name="lumosx-executor-start", daemon=True)
            self._starter.start()

    def ensure_executor(self) -> Executor:
        starter = self._starter
        if starter is not None and starter is not threading.current_thread():
            starter.join()
            if self._start_error is not None:
                raise self._start_error
        with self._exec_lock:
            if self.executor is None:
                t0 = time.perf_counter()
                if self.executor_kind == "local":
                    executor: Executor = LocalExecutor(self.pipeline, self.output)
                elif self.executor_kind == "ray":
                    from tasks.ray_executor import RayExecutor

                    executor = RayExecutor(self.pipeline, self.output, self.ray_address)
                else:
                    raise ValueError(f"unknown executor {self.executor_kind!r} (ray or local)")
                try:
                    self.startup = executor.start()
                except BaseException:
                    executor.stop()
                    raise
                self.startup["seconds"] = round(time.perf_counter() - t0, 3)
                self.executor = executor
                self._t_work = time.perf_counter()
            return self.executor

    def _verdicts(self, pairs: list[tuple[str, str]]) -> dict[str, tuple[str, str]]:
        assert self.claims is not None
        return self.claims.verdicts(pairs, self.index, self.pipeline)

    def _committed(self, number: int) -> tuple[set[str], int]:
        """Uris of `number` committed by an earlier attempt, and the next free commit sequence number."""
        import pyarrow.parquet as pq

        done: set[str] = set()
        next_seq = 0
        for name in self.output.list_sizes(LEDGER):
            parsed = parse_part(name)
            if parsed is None or parsed[0] != number:
                continue
            next_seq = max(next_seq, parsed[1] + 1)
            with self.output.open_read(f"{LEDGER}/{name}") as f:
                done.update(pq.read_table(f, columns=["uri"])["uri"].to_pylist())
        return done, next_seq

    def run_partition(self, part: Partition) -> PartitionSummary:
        """Stream one partition through the executor into its shards. Safe to repeat after a failure."""
        if self._abort.is_set():
            raise EnvironmentFault(self.aborted or "the run was stopped")
        executor = self.ensure_executor()
        done, start_seq = self._committed(part.number)
        sources = [s for s in part.sources if s.uri not in done]
        summary = PartitionSummary(
            number=part.number, videos=len(part.sources), resumed=len(part.sources) - len(sources)
        )
        batch_size = self.config.run.batch_size
        batches = [sources[i : i + batch_size] for i in range(0, len(sources), batch_size)]
        writer = executor.open_writer(part.number, start_seq)
        # Futures of batches in the stages ("stage") and of their writes ("write"): both count against the
        # window, so a slow writer holds back new batches instead of piling their frames up in memory.
        inflight: dict[Future, tuple[str, int]] = {}
        todo = list(enumerate(batches))[::-1]
        try:
            while todo or inflight:
                while todo and len(inflight) < self.config.run.batches_in_flight and not self._abort.is_set():
                    number, srcs = todo.pop()
                    inflight[executor.submit(Batch(part.number, number, srcs, self._verdicts))] = (
                        "stage",
                        number,
                    )
                if self._abort.is_set():
                    raise EnvironmentFault(self.aborted or "the run was stopped")
                finished, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                for fut in finished:
                    kind, number = inflight.pop(fut)
                    if kind == "stage":
                        result = fut.result()
                        self._merge_stats(result.stats, result.served_by)
                        inflight[writer.add(number, result.payload)] = ("write", number)
                    else:
                        self._record(summary, fut.result(), len(batches[number]))
            self._record(summary, writer.close(), 0)
        except BaseException as exc:
            writer.abort()
            fault = environment_fault(exc)
            if fault is not None:
                self.abort(str(fault))
                raise fault from exc
            raise
        with self._lock:
            self.partition_summaries.append(summary)
        return summary

    def abort(self, reason: str) -> None:
        """Stop every partition: the machine cannot go on (disk full, out of memory)."""
        with self._lock:
            if self.aborted is None:
                self.aborted = reason
                logger.error("stopping the run: %s", reason)
        self._abort.set()

    def _merge_stats(self, stats: dict[str, StageStats], served: list[dict]) -> None:
        with self._lock:
            for name, s in stats.items():
                self.stage_stats.setdefault(name, StageStats(stage=name)).merge(s)
            if self.keep_served:
                self._served += served

    def _record(self, summary: PartitionSummary, commits: list[Commit], finished: int) -> None:
        with self._lock:
            self.progress.finished += finished
            for c in commits:
                summary.samples += c.samples
                summary.failed.update(c.failed)
                summary.aliases += c.aliases
                self.progress.samples += c.samples
                self.progress.failed += sum(c.failed.values())
                if c.shard is not None:
                    summary.shards.append(c.shard.url)
                    self.progress.shards += 1
                    # One writer of index.jsonl (this process), so lines never interleave.
                    self.output.append_line(INDEX_LINES, c.shard.model_dump_json())

    @property
    def served(self) -> list[dict]:
        """Which replica served each batch at each stage (when `keep_served`; placement tests use it)."""
        return list(self._served)

    # -- 4. the end
    def finalize(self) -> dict[str, Any]:
        dataset = finalize(self.output, self.seen, self.discovery_failures)
        self.failures = dataset.failures
        report = self.report(dataset)
        self.write_report(report)
        return report

    def write_report(self, report: dict[str, Any]) -> None:
        """report.json (the flow writes it again once the gallery exists, to link it)."""
        self.output.write_bytes(REPORT, _json(report))

    def report(self, dataset: DatasetSummary) -> dict[str, Any]:
        wall = time.perf_counter() - self._t0
        startup = float(self.startup.get("seconds", 0.0))
        work = time.perf_counter() - self._t_work if self._t_work is not None else 0.0
        replicas = self.executor.replicas() if self.executor is not None else {}
        started = getattr(self.executor, "loads", lambda: {})() if self.executor is not None else {}
        stages = {}
        for name, s in self.stage_stats.items():
            n = replicas.get(name, 1) or 1
            stages[name] = {
                "processed": s.processed,
                "reused": s.reused,
                "ok": s.ok,
                "failed": dict(sorted(s.failed.items())),
                "busy_seconds": round(s.seconds, 3),
                "seconds_per_video": round(s.seconds / s.processed, 4) if s.processed else None,
                "replicas": replicas.get(name),
                "replicas_started": started.get(name, replicas.get(name)),
                "utilisation": round(s.seconds / (work * n), 3) if work > 0 and replicas else None,
            }
        # The ideal time of this run's work: stages one after another in one process (local), or the busiest
        # stage's busy time spread over its replicas (a pipeline can be no faster). >= 1; 1 = no overhead at all.
        busy = {name: s.seconds for name, s in self.stage_stats.items()}
        if self.executor is not None and self.executor.name == "ray":
            ideal = max((busy[n] / max(replicas.get(n, 1), 1) for n in busy), default=0.0)
        else:
            ideal = sum(busy.values())
        failures = Counter(f.error_class for f in dataset.failures)
        return {
            "profile": self.config.profile,
            "config_fingerprint": self.config.data_fingerprint(),
            "stage_fingerprints": self.pipeline.fingerprints,
            "output": self.output.url,
            "executor": self.executor.name if self.executor is not None else None,
            "videos_found": self.progress.found,
            "videos_done_before": self.progress.done_before,
            "videos_processed": self.progress.pending,
            "videos_failed": len({f.uri for f in dataset.failures}),
            "failures_by_reason": dict(sorted(failures.items())),
            "skipped": {
                reason: {"count": len(uris), "examples": uris[:SKIP_EXAMPLES]}
                for reason, uris in sorted(self.skips.items())
            },
            "samples": dataset.samples,
            "shards": dataset.shards,
            "samples_written_this_run": sum(p.samples for p in self.partition_summaries),
            "shards_written_this_run": sum(len(p.shards) for p in self.partition_summaries),
            "retired_samples": dataset.retired_samples,
            "random_weight_samples": dataset.random_weight_samples,
            "configured_random_weight_stages": self.config.random_weight_stages(),
            "partitions": len(self.partition_summaries),
            "stages": stages,
            "startup": {**self.startup, "prefect_seconds": self.prefect_seconds},
            "reconciled": self.reconciled,
            "wall_seconds": round(wall, 3),
            "startup_seconds": round(startup, 3),
            "work_seconds": round(work, 3),
            "ideal_seconds": round(ideal, 3),
            "overhead": round(work / ideal, 3) if ideal > 0 else None,
            "aborted": self.aborted,
            "run_id": self.run_id,
        }


def _json(obj: Any) -> bytes:
    import json

    return json.dumps(obj, indent=1, sort_keys=True, default=str).encode()
