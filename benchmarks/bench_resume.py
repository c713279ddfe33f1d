"""What a rerun with nothing to do costs, and what the work directory holds, as the input grows.

    .venv/bin/python benchmarks/bench_resume.py [--videos 1000 10000]

For each size: a first run with the stand-in stages (benchmarks/standin_stages.py: real discovery, ledger, shard
writer and tables, no media) over N small files, then a no-op rerun, timed twice:

- engine: `tasks.engine.Curation` (discovery + ledger check + tables), what every rerun pays;
- flow: the `curate` Prefect flow around the same (its temporary server's start-up is not counted).

Prints milliseconds per video, and the number of files in work/ (it grows with partitions and shards, not with
videos x stages). Target: <= 3 ms per video at 1,000 videos.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def run_engine(inp: Path, out: Path, config) -> dict:
    from benchmarks.standin_stages import STUB_STAGES
    from tasks.engine import Curation
    from tasks.pipeline import Pipeline

    with Curation(
        config, str(inp), str(out), executor="local", pipeline=Pipeline.of(config, STUB_STAGES)
    ) as c:
        for part in c.partitions():
            c.run_partition(part)
        return c.finalize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, nargs="+", default=[1000, 10000])
    args = parser.parse_args()

    from benchmarks.standin_stages import stub_config, write_stub_videos

    config = stub_config()
    config = config.model_copy(
        update={"run": config.run.model_copy(update={"partition_size": 2000, "batch_size": 16})}
    )
    rows = []
    for n in args.videos:
        with tempfile.TemporaryDirectory() as tmp:
            inp, out = Path(tmp) / "in", Path(tmp) / "out"
            write_stub_videos(str(inp), n)
            t0 = time.perf_counter()
            first = run_engine(inp, out, config)
            first_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            again = run_engine(inp, out, config)
            engine_s = time.perf_counter() - t0
            assert again["samples_written_this_run"] == 0 and again["executor"] is None

            import flows.curate as flow_module
            from tasks.pipeline import Pipeline

            # The flow with the stand-in pipeline: the same engine, with Prefect's flow and task runs around it.
            original = flow_module.Curation

            class StubCuration(original):  # type: ignore[misc, valid-type]
                def __init__(self, cfg, *a, **kw):
                    from benchmarks.standin_stages import STUB_STAGES

                    super().__init__(config, *a, pipeline=Pipeline.of(config, STUB_STAGES), **kw)

            flow_module.Curation = StubCuration
            try:
                flow_module.curate(
                    input=str(inp), output=str(out), profile="offline", progress=False, executor="local"
                )  # the first call starts Prefect's server: not timed
                t0 = time.perf_counter()
                flow_report = flow_module.curate(
                    input=str(inp), output=str(out), profile="offline", progress=False, executor="local"
                )
                flow_s = time.perf_counter() - t0
            finally:
                flow_module.Curation = original
            assert flow_report["samples_written_this_run"] == 0
            work_files = sum(len(files) for _, _, files in os.walk(out / "work"))
            rows.append(
                {
                    "videos": n,
                    "first_run_s": round(first_s, 2),
                    "noop_engine_ms_per_video": round(1000 * engine_s / n, 3),
                    "noop_flow_ms_per_video": round(1000 * flow_s / n, 3),
                    "partitions": first["partitions"],
                    "shards": first["shards"],
                    "work_files": work_files,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print(
        f"{'videos':>7} {'engine ms/video':>16} {'flow ms/video':>14} {'partitions':>11} {'shards':>7} {'work files':>11}"
    )
    for r in rows:
        print(
            f"{r['videos']:>7} {r['noop_engine_ms_per_video']:>16} {r['noop_flow_ms_per_video']:>14} "
            f"{r['partitions']:>11} {r['shards']:>7} {r['work_files']:>11}"
        )


if __name__ == "__main__":
    main()
