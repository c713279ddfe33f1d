"""Streaming output: when the first shard is readable, and what committing a shard costs as shards add up.

    .venv/bin/python benchmarks/bench_streaming.py [--videos 300] [--maxcount 10] [--shards 100 1000 5000]

1. A run over `--videos` stand-in videos (benchmarks/standin_stages.py; real engine, writer and ledger) with
   `shards.maxcount` samples per shard: the share of the input finished when the first shard could be read, and
   the share at each later shard. Target: the first shard before 20 % of the input.
2. The cost of one shard commit's index update (the line appended to index.jsonl) after 100, 1,000 and 5,000
   shards, against rewriting a whole index.json per shard (what the old design did): appending stays flat, the
   rewrite grows linearly (quadratic over a run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def first_shard(n: int, maxcount: int) -> dict:
    from benchmarks.standin_stages import STUB_STAGES, stub_config, write_stub_videos
    from tasks.engine import Curation
    from tasks.pipeline import Pipeline

    cfg = stub_config(sleep_s=0.01)
    cfg = cfg.model_copy(
        update={
            "run": cfg.run.model_copy(update={"partition_size": n, "batch_size": 4}),
            "shards": cfg.shards.model_copy(update={"maxcount": maxcount}),
        }
    )
    marks: list[tuple[float, int]] = []
    original = Curation._record

    def record(self, summary, commits, finished):
        original(self, summary, commits, finished)
        for c in commits:
            if c.shard is not None:
                with tarfile.open(
                    self.output.path(f"shards/{c.shard.url}")
                ) as t:  # readable while the run goes on
                    t.getnames()
                marks.append((time.perf_counter(), self.progress.finished))

    Curation._record = record
    try:
        with tempfile.TemporaryDirectory() as tmp:
            write_stub_videos(f"{tmp}/in", n)
            with Curation(
                cfg, f"{tmp}/in", f"{tmp}/out", executor="local", pipeline=Pipeline.of(cfg, STUB_STAGES)
            ) as c:
                for part in c.partitions():
                    c.run_partition(part)
                c.finalize()
    finally:
        Curation._record = original
    return {
        "videos": n,
        "maxcount": maxcount,
        "shards": len(marks),
        "done_at_first_shard": round(marks[0][1] / n, 3),
        "done_at_shards": [round(m[1] / n, 2) for m in marks[:: max(1, len(marks) // 6)]],
    }


def index_costs(sizes: list[int]) -> list[dict]:
    from schemas.sample import ShardEntry, ShardIndex
    from tasks.output import INDEX, INDEX_LINES, OutputDir

    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out = OutputDir(tmp)
            entries = [
                ShardEntry(
                    url=f"shard-000000-{i:06d}.tar",
                    count=1000,
                    num_bytes=2_000_000_000,
                    sha256="0" * 64,
                    keys=[f"v{i:06d}{k:014d}" for k in range(1000)],
                    sample_fingerprints={},
                )
                for i in range(n + 1)
            ]
            for e in entries[:n]:
                out.append_line(INDEX_LINES, e.model_dump_json())
            t0 = time.perf_counter()
            out.append_line(INDEX_LINES, entries[n].model_dump_json())
            append_ms = 1000 * (time.perf_counter() - t0)
            t0 = time.perf_counter()
            out.write_bytes(INDEX, ShardIndex(shards=entries).model_dump_json().encode())
            rewrite_ms = 1000 * (time.perf_counter() - t0)
            rows.append(
                {
                    "shards": n,
                    "append_ms": round(append_ms, 3),
                    "rewrite_whole_index_ms": round(rewrite_ms, 1),
                    "index_jsonl_mb": round(os.path.getsize(out.path(INDEX_LINES)) / 2**20, 1),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=300)
    parser.add_argument("--maxcount", type=int, default=10)
    parser.add_argument("--shards", type=int, nargs="+", default=[100, 1000, 5000])
    args = parser.parse_args()
    print(json.dumps(first_shard(args.videos, args.maxcount)))
    print(f"{'shards':>7} {'append ms':>10} {'rewrite ms':>11} {'index.jsonl MB':>15}")
    for r in index_costs(args.shards):
        print(
            f"{r['shards']:>7} {r['append_ms']:>10} {r['rewrite_whole_index_ms']:>11} {r['index_jsonl_mb']:>15}"
        )


if __name__ == "__main__":
    main()
