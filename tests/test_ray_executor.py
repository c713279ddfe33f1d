"""The Ray executor on a two-node cluster made on this machine (fake GPUs: scheduling only).

Every declared GPU serves batches, each replica loads its model once, throughput scales with replicas, and a
replica or a whole node lost mid-run (or a video that kills its worker) still gives every sample exactly once.
"""

from __future__ import annotations

import os
import signal
import tarfile
import threading
import time
from pathlib import Path

import pytest

from benchmarks.standin_stages import STUB_STAGES, stub_config, write_stub_videos
from tasks.engine import Curation
from tasks.pipeline import Pipeline

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.slow

GPUS_PER_NODE = 4


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": GPUS_PER_NODE})
    c.add_node(num_cpus=4, num_gpus=GPUS_PER_NODE)
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


def other_node(c):
    """A node that is not the driver's (on one machine, the driver may attach to any of them)."""
    mine = ray.get_runtime_context().get_node_id()
    return next(n for n in [c.head_node, *c.worker_nodes] if n.node_id != mine)


def stub(tmp: Path, *, gpus=1.0, max_replicas=None, sleep_s=0.0, batch=1, in_flight=32, **extra):
    cfg = stub_config(sleep_s=sleep_s, load_log=str(tmp / "loads.txt"), **extra)
    # The stand-in model is the slow stage: spare GPUs go to it (tasks/placement.py).
    stages = {
        "ingest": {"num_cpus": 1, "replicas": {"max": 1}, "seconds_per_video": 0.001},
        "caption": {
            "num_cpus": 0,
            "num_gpus": gpus,
            "replicas": {"max": max_replicas},
            "seconds_per_video": 0.2,
        },
        "sample": {"num_cpus": 1, "replicas": {"max": 1}, "seconds_per_video": 0.001},
    }
    run = cfg.run.model_copy(
        update={"batch_size": batch, "batches_in_flight": in_flight, "partition_size": 10_000}
    )
    run = run.model_validate({**run.model_dump(), "stages": stages})
    return cfg.model_copy(update={"run": run})


def curate(inp: Path, out: Path, cfg, *, during=None):
    engine = Curation(cfg, str(inp), str(out), executor="ray", pipeline=Pipeline.of(cfg, STUB_STAGES))
    engine.keep_served = True
    with engine:
        for part in engine.partitions():
            if during is not None:
                engine.ensure_executor()
                threading.Thread(target=during, args=(engine,), daemon=True).start()
            engine.run_partition(part)
        report = engine.finalize()
    return report, engine


def keys_in(out: Path) -> list[str]:
    keys = []
    for tar in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar) as t:
            keys += sorted({m.name.split(".", 1)[0] for m in t.getmembers()})
    return keys


def test_every_gpu_serves_each_replica_loads_once_and_throughput_scales(cluster, tmp_path: Path):
    write_stub_videos(str(tmp_path / "in"), 64)
    seconds = {}
    for replicas in (1, 2 * GPUS_PER_NODE):
        run_dir = tmp_path / f"r{replicas}"
        run_dir.mkdir()
        cfg = stub(run_dir, max_replicas=replicas, sleep_s=0.2)
        report, engine = curate(tmp_path / "in", run_dir / "out", cfg)
        assert report["samples"] == 64
        served = [s for s in engine.served if s["stage"] == "caption"]
        gpus = {(s["node"], tuple(s["gpus"])) for s in served}
        assert len(gpus) == replicas, gpus  # every declared GPU served batches
        loads = (run_dir / "loads.txt").read_text().split()
        assert len(loads) == replicas == report["stages"]["caption"]["replicas"]  # one model load per replica
        seconds[replicas] = report["work_seconds"]
    speedup = seconds[1] / seconds[2 * GPUS_PER_NODE]
    assert speedup >= 6, seconds


def test_a_killed_replica_loses_no_sample_and_writes_none_twice(cluster, tmp_path: Path):
    write_stub_videos(str(tmp_path / "in"), 160)
    cfg = stub(tmp_path, sleep_s=0.05, batch=2)

    def kill_one(engine):
        while engine.progress.finished < 20:
            time.sleep(0.05)
        pid = int((tmp_path / "loads.txt").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)

    report, engine = curate(tmp_path / "in", tmp_path / "out", cfg, during=kill_one)
    keys = keys_in(tmp_path / "out")
    assert report["samples"] == 160 == len(keys) == len(set(keys))
    assert report["videos_failed"] == 0
    assert (
        report["stages"]["caption"]["replicas_started"] == 2 * GPUS_PER_NODE + 1
    )  # the lost one was replaced


def test_a_lost_node_loses_no_sample_and_writes_none_twice(tmp_path: Path, cluster):
    c = cluster
    worker = other_node(c)
    if worker is c.head_node:
        pytest.skip("the driver attached to the worker node; removing the head would end the cluster")
    write_stub_videos(str(tmp_path / "in"), 160)
    cfg = stub(tmp_path, sleep_s=0.05, batch=2)

    def remove_worker(engine):
        while engine.progress.finished < 20:
            time.sleep(0.05)
        c.remove_node(worker)

    report, engine = curate(tmp_path / "in", tmp_path / "out", cfg, during=remove_worker)
    keys = keys_in(tmp_path / "out")
    assert report["samples"] == 160 == len(keys) == len(set(keys))
    assert report["videos_failed"] == 0
    # Replicas on the lost node died; the head node's replicas finished the run.
    assert {s["node"] for s in engine.served if s["stage"] == "caption"} >= {worker.node_id}
    c.add_node(num_cpus=4, num_gpus=GPUS_PER_NODE)  # for the tests after this one
    c.wait_for_nodes()


def test_a_video_that_kills_its_worker_is_one_failure_row(cluster, tmp_path: Path):
    write_stub_videos(str(tmp_path / "in"), 11)
    write_stub_videos(str(tmp_path / "in"), 1, prefix="poison")
    cfg = stub(tmp_path, batch=4, crash_on="poison")
    report, engine = curate(tmp_path / "in", tmp_path / "out", cfg)
    assert report["failures_by_reason"] == {"worker_crashed": 1}, [f.uri for f in engine.failures]
    assert report["samples"] == 11
    assert "poison" in engine.failures[0].uri and engine.failures[0].stage == "ingest"
    keys = keys_in(tmp_path / "out")
    assert len(keys) == len(set(keys)) == 11
