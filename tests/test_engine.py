"""The run engine with stand-in stages: streaming shards, exactly-once, resume, retirement, lock, determinism.

The stand-ins (benchmarks/standin_stages.py) read no media and load no model, so these tests run hundreds of
"videos" through the real engine, ledger and shard writer in seconds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from benchmarks.standin_stages import STUB_STAGES, StubModel, stub_config, write_stub_videos
from schemas.sample import ShardIndex
from tasks.base import EnvironmentFault
from tasks.engine import Curation
from tasks.lock import OutputLocked
from tasks.output import OutputDir
from tasks.pipeline import Pipeline
from tasks.shards import PartitionWriter, verify


def run(inp, out, config, executor="local", **kw):
    pipeline = Pipeline.of(config, STUB_STAGES)
    with Curation(config, str(inp), str(out), executor=executor, pipeline=pipeline, **kw) as c:
        for part in c.partitions():
            c.run_partition(part)
        return c.finalize(), c


def tar_keys(out: Path) -> list[str]:
    keys = []
    for tar in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar) as t:
            keys += sorted({m.name.split(".", 1)[0] for m in t.getmembers()})
    return keys


def config(**kw):
    cfg = stub_config()
    run_overrides = {
        k: v for k, v in kw.items() if k in ("partition_size", "batch_size", "batches_in_flight")
    }
    shard_overrides = {k: v for k, v in kw.items() if k in ("maxcount", "maxsize")}
    return cfg.model_copy(
        update={
            "run": cfg.run.model_copy(update=run_overrides),
            "shards": cfg.shards.model_copy(update=shard_overrides),
            "extra": {"standin": {k: v for k, v in kw.items() if k in ("tag", "sleep_s", "crash_on")}},
        }
    )


@pytest.fixture()
def videos(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    write_stub_videos(str(d), 37)
    (d / "bad.mp4").write_bytes(b"bad file\n")
    shutil.copy(d / "video_00003.mp4", d / "zz_copy_of_3.mp4")
    return d


def test_every_video_once_and_the_tables_agree(videos: Path, tmp_path: Path):
    out = tmp_path / "out"
    report, _ = run(videos, out, config(maxcount=5, partition_size=16))
    keys = tar_keys(out)
    assert len(keys) == len(set(keys)) == 37 == report["samples"]
    assert report["videos_found"] == 39 and report["videos_failed"] == 2
    assert report["samples"] + report["videos_failed"] == report["videos_found"]
    assert report["failures_by_reason"] == {"duplicate": 1, "not_a_video": 1}
    index = ShardIndex.model_validate_json((out / "index.json").read_text())
    assert [e.url for e in index.shards] == sorted(p.name for p in (out / "shards").iterdir())
    for e in index.shards:
        data = (out / "shards" / e.url).read_bytes()
        assert len(data) == e.num_bytes and hashlib.sha256(data).hexdigest() == e.sha256
    assert all(e.url.startswith("shard-") and len(e.url.split("-")) == 3 for e in index.shards)
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sorted(r["key"] for r in manifest) == sorted(keys)
    assert {r["shard"] for r in manifest} == {e.url for e in index.shards}
    lines = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    assert sorted(x["url"] for x in lines) == [e.url for e in index.shards]
    assert verify(OutputDir(str(out))) == []


def test_first_shard_is_readable_before_a_fifth_of_the_input_is_done(tmp_path: Path, monkeypatch):
    write_stub_videos(str(tmp_path / "in"), 300)
    seen = []
    original = Curation._record

    def spy(self, summary, commits, finished):
        original(self, summary, commits, finished)
        for c in commits:
            if c.shard is not None and not seen:
                with tarfile.open(
                    tmp_path / "out" / "shards" / c.shard.url
                ) as t:  # complete and readable now
                    seen.append((self.progress.finished, len(t.getnames())))

    monkeypatch.setattr(Curation, "_record", spy)
    report, _ = run(tmp_path / "in", tmp_path / "out", config(maxcount=10, partition_size=300))
    assert report["samples"] == 300 and report["shards"] == 30
    finished, members = seen[0]
    assert finished <= 0.2 * 300 and members == 20  # 10 samples x 2 members


def test_noop_rerun_starts_no_executor_and_writes_no_ledger(videos: Path, tmp_path: Path):
    out = tmp_path / "out"
    cfg = config(maxcount=5, partition_size=16)
    first, _ = run(videos, out, cfg)
    parts = sorted(os.listdir(out / "work" / "ledger"))
    again, engine = run(videos, out, cfg)
    assert engine.executor is None and again["executor"] is None
    assert again["videos_done_before"] == 39 and again["videos_processed"] == 0
    assert again["samples"] == first["samples"] and again["samples_written_this_run"] == 0
    assert again["videos_failed"] == first["videos_failed"] == 2
    assert sorted(os.listdir(out / "work" / "ledger")) == parts
    # The work directory grows with commits (shards, partitions), not with videos x stages.
    assert len(os.listdir(out / "work" / "ledger")) <= first["shards"] + first["partitions"] + 1


def test_two_clean_runs_are_byte_identical(videos: Path, tmp_path: Path):
    cfg = config(maxcount=5, partition_size=16)
    run(videos, tmp_path / "a", cfg)
    run(videos, tmp_path / "b", cfg)
    names = sorted(p.name for p in (tmp_path / "a" / "shards").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b" / "shards").iterdir())
    for name in names:
        assert (tmp_path / "a" / "shards" / name).read_bytes() == (
            tmp_path / "b" / "shards" / name
        ).read_bytes()
    assert (tmp_path / "a" / "index.json").read_bytes() == (tmp_path / "b" / "index.json").read_bytes()
    assert (tmp_path / "a" / "manifest.parquet").read_bytes() == (
        tmp_path / "b" / "manifest.parquet"
    ).read_bytes()


def test_a_partition_killed_midway_resumes_without_duplicates(videos: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "out"
    cfg = config(maxcount=3, partition_size=40)
    calls = {"n": 0}
    original = PartitionWriter._commit_shard

    def dies_on_third(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return original(self)

    monkeypatch.setattr(PartitionWriter, "_commit_shard", dies_on_third)
    pipeline = Pipeline.of(cfg, STUB_STAGES)
    with Curation(cfg, str(videos), str(out), executor="local", pipeline=pipeline) as c:
        (part,) = list(c.partitions())
        with pytest.raises(RuntimeError, match="killed"):
            c.run_partition(part)
        kept = sorted(p.name for p in (out / "shards").iterdir())
        assert len(kept) == 2
        # A Prefect retry of the same partition: what the failed attempt committed is not redone.
        summary = c.run_partition(part)
        assert summary.resumed == 7  # two shards of 3, and the failure row committed with them
        report = c.finalize()
    keys = tar_keys(out)
    assert len(keys) == len(set(keys)) == 37 == report["samples"]
    assert set(kept) <= {p.name for p in (out / "shards").iterdir()}


def test_a_killed_run_resumes_in_a_new_run(videos: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "out"
    cfg = config(maxcount=3, partition_size=40)
    original = PartitionWriter._commit_shard
    calls = {"n": 0}

    def dies(self):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(PartitionWriter, "_commit_shard", dies)
    with pytest.raises(KeyboardInterrupt):
        run(videos, out, cfg)
    monkeypatch.setattr(PartitionWriter, "_commit_shard", original)
    report, _ = run(videos, out, cfg)
    assert report["videos_done_before"] == 10 and report["samples"] == 37  # 3 shards of 3 + a failure
    keys = tar_keys(out)
    assert len(keys) == len(set(keys)) == 37


def test_a_config_change_reruns_and_retires_the_old_versions(videos: Path, tmp_path: Path):
    out = tmp_path / "out"
    first, _ = run(videos, out, config(maxcount=5, partition_size=16, tag="a"))
    half, _ = run(videos, out, config(maxcount=5, partition_size=16, tag="b"), limit=20)
    assert half["retired_samples"] > 0
    keys = tar_keys(out)
    assert len(keys) == len(set(keys)) == 37  # every key exactly once: old versions were retired
    final, _ = run(videos, out, config(maxcount=5, partition_size=16, tag="b"))
    keys = tar_keys(out)
    assert len(keys) == len(set(keys)) == 37 == final["samples"]
    captions = set()
    for tar in (out / "shards").glob("*.tar"):
        with tarfile.open(tar) as t:
            captions |= {
                t.extractfile(m).read().decode() for m in t.getmembers() if m.name.endswith(".caption.txt")
            }
    assert captions == {"a video b"}
    assert verify(OutputDir(str(out))) == []
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sorted(r["key"] for r in manifest) == sorted(keys)


def test_damaged_and_orphan_shards_are_repaired(videos: Path, tmp_path: Path):
    out = tmp_path / "out"
    cfg = config(maxcount=5, partition_size=16)
    first, _ = run(videos, out, cfg)
    shards = sorted((out / "shards").iterdir())
    shards[1].write_bytes(shards[1].read_bytes()[:1000])  # cut by a full disk, or a bad copy
    (out / "shards" / "shard-000777-000000.tar").write_bytes(b"orphan")
    (out / "shards" / ".tmp-shard-000001-000003.tar-abc").write_bytes(b"half")
    report, _ = run(videos, out, cfg)
    assert report["reconciled"]["damaged_shards_redone"] == [shards[1].name]
    assert (
        report["reconciled"]["removed_orphan_shards"] == 1 and report["reconciled"]["removed_temporary"] == 1
    )
    keys = tar_keys(out)
    assert len(keys) == len(set(keys)) == 37
    assert verify(OutputDir(str(out))) == []


def test_one_run_per_output(videos: Path, tmp_path: Path):
    cfg = config()
    pipeline = Pipeline.of(cfg, STUB_STAGES)
    first = Curation(cfg, str(videos), str(tmp_path / "out"), executor="local", pipeline=pipeline).open()
    try:
        with pytest.raises(OutputLocked, match=f"pid {os.getpid()}"):
            Curation(cfg, str(videos), str(tmp_path / "out"), executor="local", pipeline=pipeline).open()
    finally:
        first.close()
    Curation(cfg, str(videos), str(tmp_path / "out"), executor="local", pipeline=pipeline).open().close()


def test_a_renamed_file_is_not_curated_twice(videos: Path, tmp_path: Path):
    out = tmp_path / "out"
    cfg = config(maxcount=5, partition_size=16)
    first, _ = run(videos, out, cfg)
    (videos / "video_00007.mp4").rename(videos / "renamed.mp4")
    again, _ = run(videos, out, cfg)
    assert again["samples"] == first["samples"] and again["samples_written_this_run"] == 0
    assert again["videos_failed"] == first["videos_failed"]
    assert again["samples"] + again["videos_failed"] == again["videos_found"]


def test_a_full_disk_stops_the_run_and_blames_no_video(videos: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "out"
    cfg = config(maxcount=5, partition_size=16)
    original = StubModel.process
    calls = {"n": 0}

    def full(self, batch):
        calls["n"] += 1
        if calls["n"] >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, batch)

    monkeypatch.setattr(StubModel, "process", full)
    pipeline = Pipeline.of(cfg, STUB_STAGES)
    with Curation(cfg, str(videos), str(out), executor="local", pipeline=pipeline) as c:
        with pytest.raises(EnvironmentFault, match="No space left"):
            for part in c.partitions():
                c.run_partition(part)
        assert c.aborted
        report = c.finalize()
    assert (
        "ENOSPC" not in json.dumps(report["failures_by_reason"])
        and "OSError" not in report["failures_by_reason"]
    )
    assert report["failures_by_reason"] == {"not_a_video": 1} or report["failures_by_reason"] == {}
    monkeypatch.setattr(StubModel, "process", original)
    again, _ = run(videos, out, cfg)
    assert again["samples"] == 37


def test_the_writer_puts_batches_in_order_whatever_order_they_finish(videos: Path, tmp_path: Path):
    from tasks.discovery import discover
    from tasks.execution import Batch, LocalExecutor

    cfg = config(maxcount=4)
    pipeline = Pipeline.of(cfg, STUB_STAGES)
    sources = [f for f in discover(str(videos), cfg.ingest.extensions) if hasattr(f, "version")][:12]
    results = []
    for root in ("x", "y"):
        output = OutputDir(str(tmp_path / root))
        executor = LocalExecutor(pipeline, output)
        batches = [executor.run(Batch(0, i, sources[i * 4 : i * 4 + 4])).payload for i in range(3)]
        writer = PartitionWriter(output, pipeline, 0, 0, cfg.shards)
        order = [2, 0, 1] if root == "y" else [0, 1, 2]
        for i in order:
            writer.add(i, batches[i])
        writer.close()
        results.append({p.name: p.read_bytes() for p in (tmp_path / root / "shards").iterdir()})
    assert results[0] == results[1] and len(results[0]) == 3


def test_an_fsspec_output(videos: Path):
    import fsspec

    out = "memory://lumosx-test-out"
    report, _ = run(videos, out, config(maxcount=10, partition_size=16))
    fs = fsspec.filesystem("memory")
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls("/lumosx-test-out/shards", detail=False))
    index = ShardIndex.model_validate_json(fs.cat_file("/lumosx-test-out/index.json"))
    assert names == [e.url for e in index.shards] and report["samples"] == 37
    again, engine = run(videos, out, config(maxcount=10, partition_size=16))
    assert engine.executor is None and again["samples"] == 37
