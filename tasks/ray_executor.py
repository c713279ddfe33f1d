"""The Ray executor: every stage a pool of actors on a cluster, batches streaming between them in memory.

Why Ray Core actor pools and not Ray Data's `map_batches`: the pools must outlive partitions. Prefect runs one task
per partition (a few thousand videos) so that each is retried and resumed on its own; with Ray Data each partition
would be its own dataset with its own actor pools, and every model would load again per partition. Here the
pools are made once per run and every partition in flight feeds them. A batch is also not a table: it is a list
of per-video contexts (records, frames of different sizes, PNG media), which Ray Data would convert to Arrow at
every stage. And the driver must know exactly which videos reached the shards to commit them once: with its own
small scheduler it does (cosmos-curate made the same choice for the same reasons).

How it runs:

- `placement.plan` decides the replicas of every stage from the cluster's nodes and `run.stages`; each replica
  is a `StageWorker` actor that loads its models once (`setup()` in its constructor) and then runs `run_stage`
  on batch after batch. GPU replicas get their GPUs from Ray (`CUDA_VISIBLE_DEVICES`), fractions included.
- A dispatcher thread moves each batch from stage to stage: the output of one call (an ObjectRef) is the input of
  the next, so frames go from worker to worker through the object store and never through the driver. Each
  replica holds at most `QUEUE_DEPTH` calls (one running, one waiting: its input transfer overlaps work), so the
  slowest stage sets the pace; the number of batches in flight per partition bounds memory.
- The partition's `WriterActor` takes finished batches (in any order) and commits shards (tasks/shards.py).
- Faults: a replica that dies (node lost, SIGKILL, a native crash) is replaced, and its batches restart from their
  source files (small, kept by the driver), so no sample is lost and none is written twice (the writer only sees a
  batch once). A batch that kills a replica twice in the same stage is split in halves until the one video that
  does it is found; that video becomes a failure row (`worker_crashed`) and the others go on.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from schemas.config import CurateConfig
from tasks.base import EnvironmentFault, VideoContext, environment_fault
from tasks.execution import Batch, BatchResult, ingested
from tasks.output import OutputDir
from tasks.pipeline import Pipeline
from tasks.placement import NodeCapacity, PlacementError, describe, plan
from tasks.runner import StageStats, end_journeys, run_stage
from tasks.shards import Commit, PartitionWriter

logger = logging.getLogger(__name__)

QUEUE_DEPTH = 2
MAX_RESTARTS = 8
"""Restarts of one batch (replica deaths, lost objects) before its partition fails (and Prefect retries it)."""
CRASHES_BEFORE_SPLIT = 2
STARTUP_TIMEOUT_S = float(os.environ.get("LUMOSX_RAY_STARTUP_TIMEOUT_S", "900"))


class StartupError(RuntimeError):
    """A stage's replicas could not start (a model that does not load, resources that do not exist)."""


# ---------------------------------------------------------------------------------------------- local Ray
def local_ray_options(config: CurateConfig | None = None) -> dict[str, Any]:
    """`ray.init` arguments of a local Ray: at least enough CPUs declared for one replica of every stage (on a
    2-core laptop the stages take turns on the cores, as threads would)."""
    need = 0.0
    if config is not None:
        subject_stages = {"entities", "masks", "binding", "background"}
        need = sum(
            res.num_cpus * res.replicas.min
            for name, res in config.run.stages.items()
            if config.subjects or name not in subject_stages
        )
    return {"num_cpus": max(os.cpu_count() or 1, int(need + 0.999)), "include_dashboard": False}


class _LocalRay:
    """A local Ray owned by one long-lived thread.

    Ray starts its head processes with PR_SET_PDEATHSIG, which Linux fires when the *thread* that forked them
    exits: a local Ray started from a short-lived thread (a Prefect task thread, a background starter) dies with
    it. So one daemon thread starts Ray, stays until `stop`, and shuts it down.
    """

    def __init__(self, options: dict[str, Any]):
        self.started: Future = Future()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._host, args=(options,), name="lumosx-local-ray", daemon=True
        )
        self._thread.start()

    def _host(self, options: dict[str, Any]) -> None:
        import ray

        try:
            t0 = time.perf_counter()
            ray.init(log_to_driver=False, **options)
            self.started.set_result(time.perf_counter() - t0)
        except BaseException as exc:  # noqa: BLE001 - raised again where the executor waits for it
            self.started.set_exception(exc)
            return
        self._stop.wait()
        ray.shutdown()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


_LOCAL_RAY: _LocalRay | None = None
_LOCAL_RAY_GUARD = threading.Lock()


def start_local_ray(config: CurateConfig | None = None, **kwargs: Any) -> Future:
    """Start a local Ray now, in the background (the CLI overlaps it with Prefect's server start-up); its future
    gives the seconds the start took. Starting it twice returns the first one."""
    global _LOCAL_RAY
    with _LOCAL_RAY_GUARD:
        if _LOCAL_RAY is None:
            _LOCAL_RAY = _LocalRay({**local_ray_options(config), **kwargs})
        return _LOCAL_RAY.started


def stop_local_ray() -> None:
    global _LOCAL_RAY
    with _LOCAL_RAY_GUARD:
        if _LOCAL_RAY is not None:
            _LOCAL_RAY.stop()
            _LOCAL_RAY = None


# ---------------------------------------------------------------------------------------------- actors
class StageWorker:
    """One replica of one stage: models loaded once, then batch after batch."""

    def __init__(self, pipeline: Pipeline, index: int, output: OutputDir):
        import ray

        self.pipeline, self.output = pipeline, output
        self.stage = pipeline.build(index)
        self.first = index == 0
        t0 = time.perf_counter()
        self.stage.setup()
        ctx = ray.get_runtime_context()
        self.info = {
            "stage": self.stage.name,
            "actor": ctx.get_actor_id(),
            "node": ctx.get_node_id(),
            "gpus": [str(g) for g in ray.get_gpu_ids()],
            "pid": os.getpid(),
            "setup_seconds": round(time.perf_counter() - t0, 3),
        }

    def ready(self) -> dict:
        return self.info

    def run(
        self,
        payload: list,
        verdicts: dict[str, tuple[str, str]],
        poison: dict[str, str],
    ) -> tuple[list[VideoContext], dict]:
        from tasks.ledger import restore_seeds

        if self.first:
            items = [VideoContext(source=s, fingerprints=dict(self.pipeline.fingerprints)) for s in payload]
            restore_seeds(items, self.output, self.pipeline)
        else:
            items = payload
        end_journeys(items, verdicts)
        for ctx in items:
            if poison.get(ctx.uri) == self.stage.name and ctx.failure is None:
                ctx.fail(
                    self.stage.name,
                    "worker_crashed",
                    f"the {self.stage.name} worker process died (a native crash?) every time it was given this "
                    "video, with no Python error to report",
                )
        stats = run_stage(self.stage, items, retries=self.pipeline.config.run.retries)
        summary = {"stats": stats, "served": self.info}
        if self.first:
            summary["ingested"] = ingested(items)
        return items, summary


class WriterActor:
    """A shard writer next to the storage (on the driver's node by default), reused partition after partition."""

    def __init__(self, output: OutputDir, pipeline: Pipeline):
        self.output, self.pipeline = output, pipeline
        self.writer: PartitionWriter | None = None

    def ready(self) -> bool:
        return True

    def open(self, partition: int, start_seq: int) -> None:
        self.writer = PartitionWriter(
            self.output, self.pipeline, partition, start_seq, self.pipeline.config.shards
        )

    def add(self, batch_no: int, *parts: list[VideoContext]) -> list[Commit]:
        assert self.writer is not None, "open() first"
        return self.writer.add(batch_no, [ctx for part in parts for ctx in part])

    def close(self) -> list[Commit]:
        assert self.writer is not None, "open() first"
        commits, self.writer = self.writer.close(), None
        return commits

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


def _unwrap(exc: BaseException) -> BaseException:
    """The environment fault inside a Ray error, when there is one."""
    return environment_fault(exc) or exc


class _RayWriter:
    """One partition's use of a pooled `WriterActor`; calls run in order on the actor."""

    def __init__(self, executor: RayExecutor, actor):
        self.executor, self.actor = executor, actor

    def _get(self, ref):
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayError as e:
            raise _unwrap(e) from e

    def add(self, batch_no: int, payload: list) -> Future[list[Commit]]:
        return self.actor.add.remote(batch_no, *payload).future()

    def close(self) -> list[Commit]:
        commits = self._get(self.actor.close.remote())
        self.executor._writer_idle(self.actor)
        return commits

    def abort(self) -> None:
        import ray

        try:
            ray.get(self.actor.abort.remote(), timeout=30)
            self.executor._writer_idle(self.actor)
        except Exception:  # noqa: BLE001 - a dead writer is dropped; the retry removes what it left
            ray.kill(self.actor)


# ---------------------------------------------------------------------------------------------- pools
@dataclass
class _Replica:
    handle: Any
    ready_ref: Any
    ready: bool = False
    calls: list = field(default_factory=list)
    """Summary refs of the calls given to this replica, oldest first: an actor runs them in that order, so when
    it dies, the oldest was running and the others were only waiting."""
    info: dict = field(default_factory=dict)
    dead: bool = False
    running_at_death: Any = None

    @property
    def inflight(self) -> int:
        return len(self.calls)


class _Pool:
    def __init__(self, executor: RayExecutor, index: int):
        self.executor, self.index = executor, index
        self.name = executor.pipeline.specs[index].name
        self.res = executor.pipeline.config.run.stages[self.name]
        self.replicas: list[_Replica] = []
        self.started = 0
        self.lost = 0
        self.starved_since: float | None = None

    def spawn(self, node_id: str | None = None) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options: dict[str, Any] = {
            "num_cpus": self.res.num_cpus,
            "num_gpus": self.res.num_gpus,
            "max_restarts": 0,
        }
        if self.res.memory_gb:
            options["memory"] = int(self.res.memory_gb * 2**30)
        if node_id is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=True)
        actor_cls = ray.remote(StageWorker).options(**options)
        handle = actor_cls.remote(self.executor.pipeline, self.index, self.executor.output)
        self.replicas.append(_Replica(handle=handle, ready_ref=handle.ready.remote()))
        self.started += 1

    def pick(self) -> _Replica | None:
        ready = [r for r in self.replicas if r.ready and r.inflight < QUEUE_DEPTH]
        return min(ready, key=lambda r: r.inflight) if ready else None

    def remove(self, replica: _Replica) -> None:
        if replica in self.replicas:
            self.replicas.remove(replica)
            self.lost += 1


@dataclass
class _Job:
    batch: Batch
    future: Future
    source_ref: Any
    stage: int = 0
    input_ref: Any = None
    verdicts: dict = field(default_factory=dict)
    poison: dict[str, str] = field(default_factory=dict)
    stats: dict[str, StageStats] = field(default_factory=dict)
    served: list[dict] = field(default_factory=list)
    restarts: int = 0
    crashes: collections.Counter = field(default_factory=collections.Counter)
    parent: _Job | None = None
    children: list[_Job] = field(default_factory=list)
    results: dict[int, BatchResult] = field(default_factory=dict)

    def restart(self) -> None:
        self.stage, self.input_ref, self.verdicts = 0, None, {}
        self.stats, self.served = {}, []
        self.restarts += 1


# ---------------------------------------------------------------------------------------------- the executor
class RayExecutor:
    """Stage pools on a Ray cluster (`address`: "auto", "ray://host:10001", or None for a local Ray)."""

    name = "ray"

    def __init__(
        self,
        pipeline: Pipeline,
        output: OutputDir,
        address: str | None = None,
        *,
        writer_on_driver: bool = True,
        init_kwargs: dict[str, Any] | None = None,
    ):
        self.pipeline, self.output, self.address = pipeline, output, address
        self.writer_on_driver = writer_on_driver
        self.init_kwargs = init_kwargs or {}
        self.pools: list[_Pool] = []
        self._started_ray = False
        self._jobs: collections.deque[_Job] = collections.deque()
        self._new: collections.deque[_Job] = collections.deque()
        self._inflight: dict[Any, tuple[_Job, _Pool, _Replica, Any]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fatal: BaseException | None = None
        self._idle_writers: list = []
        self._writers_guard = threading.Lock()
        self.plan_text = ""

    # -- lifecycle
    def _connect(self) -> float:
        """Start or join Ray; returns the seconds Ray took to start (a pre-started local Ray counts too)."""
        import ray

        if self.address is None:
            if ray.is_initialized() and _LOCAL_RAY is None:
                return 0.0  # a Ray this process started itself (tests, notebooks): use it, leave it running
            seconds = start_local_ray(self.pipeline.config, **self.init_kwargs).result()
            self._started_ray = True
            return seconds
        if ray.is_initialized():
            return 0.0
        t0 = time.perf_counter()
        ray.init(address=self.address, log_to_driver=False, **self.init_kwargs)
        self._started_ray = True
        return time.perf_counter() - t0

    def _nodes(self) -> list[NodeCapacity]:
        import ray

        nodes = []
        for n in ray.nodes():
            if not n.get("Alive"):
                continue
            res = n.get("Resources", {})
            nodes.append(
                NodeCapacity(
                    node_id=n["NodeID"],
                    cpus=float(res.get("CPU", 0)),
                    gpus=int(res.get("GPU", 0)),
                    memory_gb=float(res.get("memory", float("inf"))) / 2**30,
                )
            )
        return nodes

    def start(self) -> dict[str, Any]:
        import ray

        ray_seconds = self._connect()
        t0 = time.perf_counter()
        nodes = self._nodes()
        replicas = plan(nodes, self.pipeline.config.run.stages, self.pipeline.names)
        self.plan_text = describe(replicas)
        logger.info("placement:\n%s", self.plan_text)
        self.pools = [_Pool(self, i) for i in range(len(self.pipeline.specs))]
        by_name = {p.name: p for p in self.pools}
        for r in replicas:
            by_name[r.stage].spawn(r.node_id)
        # The partitions' shard writers start with the stages (one per partition in flight), not per partition.
        writers = [self._new_writer() for _ in range(self.pipeline.config.run.partitions_in_flight)]
        self._wait_ready(by_name)
        ray.get([w.ready.remote() for w in writers])
        self._idle_writers += writers
        self._thread = threading.Thread(target=self._loop, name="lumosx-ray-dispatcher", daemon=True)
        self._thread.start()
        return {
            "executor": self.name,
            "ray_start_seconds": round(ray_seconds, 3),
            "pools_ready_seconds": round(time.perf_counter() - t0, 3),
            "nodes": len(nodes),
            "placement": self.plan_text,
        }

    def _wait_ready(self, pools: dict[str, _Pool]) -> None:
        """Wait until every planned replica is up (the work then starts at full speed).

        A replica whose setup raised is fatal (a model that does not load). Replicas that do not come up within
        `STARTUP_TIMEOUT_S` are fatal only if their stage has fewer than its minimum; otherwise the run starts
        with what is up, and the rest join when they are ready.
        """
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            self._poll_ready(block=0.2)
            if all(r.ready for pool in pools.values() for r in pool.replicas):
                return
            if time.monotonic() > deadline:
                missing = sorted(
                    name
                    for name, pool in pools.items()
                    if sum(r.ready for r in pool.replicas) < pool.res.replicas.min
                )
                if missing:
                    raise StartupError(
                        f"replicas of {missing} did not start within {STARTUP_TIMEOUT_S:.0f} s "
                        "(resources the cluster does not have?)"
                    )
                logger.warning("starting with the replicas that are up; the others join when ready")
                return

    def _poll_ready(self, block: float = 0.0) -> None:
        import ray

        pending = {r.ready_ref: (pool, r) for pool in self.pools for r in pool.replicas if not r.ready}
        if not pending:
            return
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=block)
        for ref in done:
            pool, rep = pending[ref]
            try:
                rep.info = ray.get(ref)
                rep.ready = True
            except ray.exceptions.RayActorError as e:
                pool.remove(rep)
                if getattr(e, "actor_init_failed", False):
                    raise StartupError(f"stage {pool.name} could not start: {_first_line(e)}") from None
                logger.warning("a %s replica died while starting; starting another", pool.name)
                pool.spawn()

    def replicas(self) -> dict[str, int]:
        return {p.name: sum(r.ready for r in p.replicas) for p in self.pools}

    def loads(self) -> dict[str, int]:
        """Replicas started per stage (each loads its models once): replicas plus replacements."""
        return {p.name: p.started for p in self.pools}

    def stop(self) -> None:
        import ray

        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        handles = [r.handle for pool in self.pools for r in pool.replicas] + self._idle_writers
        for handle in handles:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(handle)
        self._idle_writers = []
        self.pools = []
        if self._started_ray:
            if self.address is None:
                stop_local_ray()
            else:
                ray.shutdown()
            self._started_ray = False

    # -- work
    def submit(self, batch: Batch) -> Future[BatchResult]:
        import ray

        fut: Future[BatchResult] = Future()
        if self._fatal is not None:
            fut.set_exception(self._fatal)
            return fut
        # The source list is small and owned by the driver: a batch can always restart from it.
        job = _Job(batch=batch, future=fut, source_ref=ray.put(batch.sources))
        self._new.append(job)
        self._wake.set()
        return fut

    def _new_writer(self):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options: dict[str, Any] = {"num_cpus": 0, "max_restarts": 0}
        if self.writer_on_driver:
            # Hard affinity: a soft one was seen to land on another node while this one had room, and a writer
            # on a node that dies fails its whole partition (which Prefect then retries).
            node = ray.get_runtime_context().get_node_id()
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
        return ray.remote(WriterActor).options(**options).remote(self.output, self.pipeline)

    def _writer_idle(self, actor) -> None:
        with self._writers_guard:
            self._idle_writers.append(actor)

    def open_writer(self, partition: int, start_seq: int) -> _RayWriter:
        import ray

        with self._writers_guard:
            actor = self._idle_writers.pop() if self._idle_writers else None
        if actor is None:
            actor = self._new_writer()
        try:
            ray.get(actor.open.remote(partition, start_seq))
        except ray.exceptions.RayActorError:  # died idle (its node was lost): take a new one
            actor = self._new_writer()
            ray.get(actor.open.remote(partition, start_seq))
        return _RayWriter(self, actor)

    # -- the dispatcher thread
    def _loop(self) -> None:
        import ray

        try:
            while not self._stop.is_set():
                while self._new:
                    self._jobs.append(self._new.popleft())
                self._poll_ready()
                self._dispatch()
                self._check_starved()
                if not self._inflight:
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                done, _ = ray.wait(list(self._inflight), num_returns=1, timeout=0.05)
                if done:
                    more, _ = ray.wait(list(self._inflight), num_returns=len(self._inflight), timeout=0)
                    for ref in {*done, *more}:
                        self._complete(ref)
        except BaseException as exc:  # noqa: BLE001 - every waiting partition must hear about it
            logger.exception("the Ray dispatcher stopped")
            self._fatal = exc
            for job in [*self._jobs, *self._new, *(j for j, *_ in self._inflight.values())]:
                if not job.future.done():
                    job.future.set_exception(exc)

    def _check_starved(self) -> None:
        """Fail the batches of a stage that has had no live replica for too long (its node gone for good)."""
        now = time.monotonic()
        for pool in self.pools:
            if any(r.ready for r in pool.replicas):
                pool.starved_since = None
                continue
            pool.starved_since = pool.starved_since or now
            if now - pool.starved_since > STARTUP_TIMEOUT_S:
                error = StartupError(
                    f"stage {pool.name} has had no replica for {STARTUP_TIMEOUT_S:.0f} s: the cluster lost the "
                    "resources it needs"
                )
                for job in [j for j in self._jobs if self.pools[j.stage] is pool]:
                    self._jobs.remove(job)
                    self._finish_error(job, error)

    def _dispatch(self) -> None:
        if not self._jobs:
            return
        waiting = sorted(self._jobs, key=lambda j: -j.stage)  # drain the pipeline before filling it
        self._jobs.clear()
        for job in waiting:
            pool = self.pools[job.stage]
            rep = pool.pick()
            if rep is None:
                self._jobs.append(job)
                continue
            payload = job.source_ref if job.stage == 0 else job.input_ref
            out_ref, summary_ref = rep.handle.run.options(num_returns=2).remote(
                payload, job.verdicts, job.poison
            )
            rep.calls.append(summary_ref)
            self._inflight[summary_ref] = (job, pool, rep, out_ref)

    def _complete(self, summary_ref) -> None:
        import ray

        job, pool, rep, out_ref = self._inflight.pop(summary_ref)
        try:
            summary = ray.get(summary_ref)
        except (
            ray.exceptions.RayActorError,
            ray.exceptions.WorkerCrashedError,
            ray.exceptions.OutOfMemoryError,
        ):
            if not rep.dead:  # the first news of this replica's death: which call was it running?
                rep.dead, rep.running_at_death = True, rep.calls[0] if rep.calls else None
                logger.warning("a %s replica died (node lost or process killed); replacing it", pool.name)
                pool.remove(rep)
                pool.spawn()
            # Only the batch the replica was running can have killed it; the ones queued behind it just restart.
            running = summary_ref == rep.running_at_death
            if running:
                job.crashes[pool.name] += 1
            self._recover(job, pool.name if running else None)
            return
        except (
            ray.exceptions.ObjectLostError,
            ray.exceptions.OwnerDiedError,
            ray.exceptions.ObjectFetchTimedOutError,
        ):
            logger.warning(
                "batch %d/%d lost its data with a node; restarting it", job.batch.partition, job.batch.number
            )
            self._recover(job, None)
            return
        except ray.exceptions.RayError as e:
            self._finish_error(job, _unwrap(e))
            return
        finally:
            if summary_ref in rep.calls:
                rep.calls.remove(summary_ref)
        stats: StageStats = summary["stats"]
        job.stats.setdefault(pool.name, StageStats(stage=pool.name)).merge(stats)
        job.served.append({"batch": job.batch.number, "partition": job.batch.partition, **summary["served"]})
        if job.stage == 0 and job.batch.after_ingest is not None:
            try:
                job.verdicts = job.batch.after_ingest(summary["ingested"])
            except Exception as e:  # noqa: BLE001
                self._finish_error(job, e)
                return
        job.stage += 1
        job.input_ref = out_ref
        if job.stage == len(self.pools):
            self._finish(job, BatchResult(payload=[out_ref], stats=job.stats, served_by=job.served))
        else:
            self._jobs.append(job)

    def _recover(self, job: _Job, crashed_stage: str | None) -> None:
        """Restart a job from its sources; split it, or fail the one video, when it keeps killing replicas."""
        if crashed_stage is not None and job.crashes[crashed_stage] >= CRASHES_BEFORE_SPLIT:
            sources = job.batch.sources
            if len(sources) > 1:
                half = len(sources) // 2
                for part in (sources[:half], sources[half:]):
                    self._spawn_child(job, part)
                return
            job.poison[sources[0].uri] = crashed_stage
            job.crashes[crashed_stage] = 0
        if job.restarts >= MAX_RESTARTS:
            self._finish_error(
                job,
                RuntimeError(
                    f"batch {job.batch.number} of partition {job.batch.partition} restarted too often"
                ),
            )
            return
        job.restart()
        self._jobs.append(job)

    def _spawn_child(self, parent: _Job, sources: list) -> None:
        import ray

        batch = Batch(parent.batch.partition, parent.batch.number, sources, parent.batch.after_ingest)
        child = _Job(
            batch=batch,
            future=Future(),
            source_ref=ray.put(sources),
            parent=parent,
            poison=dict(parent.poison),
        )
        parent.children.append(child)
        self._jobs.append(child)

    def _finish(self, job: _Job, result: BatchResult) -> None:
        parent = job.parent
        if parent is None:
            job.future.set_result(result)
            return
        parent.results[parent.children.index(job)] = result
        if len(parent.results) == len(parent.children):
            ordered = [parent.results[i] for i in range(len(parent.children))]
            stats: dict[str, StageStats] = {}
            for r in ordered:
                for name, s in r.stats.items():
                    stats.setdefault(name, StageStats(stage=name)).merge(s)
            merged = BatchResult(
                payload=[ref for r in ordered for ref in r.payload],
                stats=stats,
                served_by=[s for r in ordered for s in r.served_by],
            )
            self._finish(parent, merged)

    def _finish_error(self, job: _Job, exc: BaseException) -> None:
        while job.parent is not None:
            job = job.parent
        if not job.future.done():
            job.future.set_exception(exc)


def _first_line(exc: BaseException) -> str:
    """The last 'SomeError: message' line of a remote traceback (what went wrong, without the frames)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if not ln.startswith("File ") and ("Error:" in ln or "Exception:" in ln)]
    return (errors[-1] if errors else lines[0] if lines else type(exc).__name__)[:400]


__all__ = ["EnvironmentFault", "PlacementError", "RayExecutor", "StartupError"]
