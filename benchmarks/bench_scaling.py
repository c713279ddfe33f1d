"""Replicas on a two-node Ray cluster with fake GPUs: every GPU serves, one model load per replica, throughput.

    .venv/bin/python benchmarks/bench_scaling.py [--gpus-per-node 4] [--videos 64] [--sleep 0.2]

`ray.cluster_utils.Cluster` makes two nodes on this machine, each declaring `--gpus-per-node` GPUs (scheduling
only). The pipeline is the stand-in one (benchmarks/standin_stages.py): a real ingest-like stage, a stand-in GPU
model stage that waits `--sleep` seconds per batch (as a GPU kernel or I/O would) and counts its model loads, and a
sample stage, through the real engine, Ray executor and shard writer. For 1, 2, 4, ... replicas of the GPU stage
(capped by `replicas.max`), in one run: work seconds (start-up excluded), speed-up over one replica, distinct
(node, GPU) pairs that served batches, and model loads counted by the stage itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus-per-node", type=int, default=4)
    parser.add_argument("--videos", type=int, default=64)
    parser.add_argument("--sleep", type=float, default=0.2)
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from benchmarks.standin_stages import STUB_STAGES, stub_config, write_stub_videos
    from tasks.engine import Curation
    from tasks.pipeline import Pipeline

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": args.gpus_per_node})
    cluster.add_node(num_cpus=4, num_gpus=args.gpus_per_node)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    total = 2 * args.gpus_per_node
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            write_stub_videos(f"{tmp}/in", args.videos)
            replicas = 1
            while replicas <= total:
                log = Path(tmp) / f"loads_{replicas}.txt"
                cfg = stub_config(sleep_s=args.sleep, load_log=str(log))
                run = cfg.run.model_validate(
                    {
                        **cfg.run.model_dump(),
                        "batch_size": 1,
                        "batches_in_flight": 4 * total,
                        "partition_size": 10**6,
                        "stages": {
                            "ingest": {"num_cpus": 1, "replicas": {"max": 1}, "seconds_per_video": 0.001},
                            "caption": {
                                "num_cpus": 0,
                                "num_gpus": 1,
                                "replicas": {"max": replicas},
                                "seconds_per_video": args.sleep,
                            },
                            "sample": {"num_cpus": 1, "replicas": {"max": 1}, "seconds_per_video": 0.001},
                        },
                    }
                )
                cfg = cfg.model_copy(update={"run": run})
                engine = Curation(
                    cfg,
                    f"{tmp}/in",
                    f"{tmp}/out{replicas}",
                    executor="ray",
                    pipeline=Pipeline.of(cfg, STUB_STAGES),
                )
                engine.keep_served = True
                with engine:
                    for part in engine.partitions():
                        engine.run_partition(part)
                    report = engine.finalize()
                served = {(s["node"], tuple(s["gpus"])) for s in engine.served if s["stage"] == "caption"}
                rows.append(
                    {
                        "replicas": replicas,
                        "work_s": report["work_seconds"],
                        "gpus_serving": len(served),
                        "model_loads": len(log.read_text().split()),
                        "samples": report["samples"],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
                replicas *= 2
    finally:
        ray.shutdown()
        cluster.shutdown()
    base = rows[0]["work_s"]
    print(f"{'replicas':>9} {'work s':>7} {'speed-up':>9} {'GPUs serving':>13} {'model loads':>12}")
    for r in rows:
        print(
            f"{r['replicas']:>9} {r['work_s']:>7} {base / r['work_s']:>9.2f} {r['gpus_serving']:>13} "
            f"{r['model_loads']:>12}"
        )


if __name__ == "__main__":
    main()
