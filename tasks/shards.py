"""WebDataset shards, written as samples finish, and the tables beside them.

`PartitionWriter` packs one partition's samples into `shards/<prefix>-<partition>-<seq>.tar` in a fixed order (the
partition's batch order, whatever order the batches finish in), so the same input and configuration give the
same shard bytes: tar headers carry a fixed time and owner. A shard is built under a hidden temporary name and
renamed (or uploaded) only when complete, so any `*.tar` in `shards/` is whole and a reader can take it while
the run goes on; right after it, the writer commits the shard's ledger part (tasks/ledger.py), and the driver
appends the shard to `index.jsonl`. A killed run loses at most the shards it had open.

At the end of a run `finalize` writes the canonical `index.json` (sorted), `manifest.parquet` (one row per
sample) and `failures.parquet` from the ledger, and retires sample versions that a newer configuration
superseded, so that every key is in the shards exactly once. `reconcile`, at the start of a run, removes what a
killed run left half done and re-checks every committed shard's size.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.config import ShardConfig
from schemas.records import FailureRecord
from schemas.sample import FAILURES_SCHEMA, MANIFEST_SCHEMA, SampleRecord, ShardEntry, ShardIndex
from tasks.base import VideoContext
from tasks.ledger import (
    LEDGER_SCHEMA,
    SHARD_META_KEY,
    LedgerIndex,
    failure_from_row,
    outcome_row,
    read_index,
    read_parts,
    write_part,
)
from tasks.output import (
    FAILURES,
    FAILURES_JSONL,
    INDEX,
    INDEX_LINES,
    LEDGER,
    MANIFEST,
    SHARDS,
    TMP_PREFIX,
    OutputDir,
)
from tasks.pipeline import Pipeline

logger = logging.getLogger(__name__)

TAR_MTIME = 0
"""Every tar header's time: shards of the same input and configuration are byte-identical."""
_TAR_OWNER = "lumosx"
_TAR_OVERHEAD = 1024  # a tar header block per member plus padding, roughly


class _SampleTar:
    """A WebDataset tar: each sample's members as `<key>.<member>`, in order, with fixed headers."""

    def __init__(self, fileobj):
        self.tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 - closed in close()

    def write(self, key: str, members: dict[str, bytes]) -> None:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
            info.uname = info.gname = _TAR_OWNER
            self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()

    def discard(self) -> None:
        """Forget the archive without writing its end blocks (its file is being deleted)."""
        self.tar.closed = True


def shard_name(cfg: ShardConfig, partition: int, seq: int) -> str:
    return f"{cfg.prefix}-{partition:06d}-{seq:06d}.tar"


class _Hashing(io.RawIOBase):
    """A write-only file that hashes and counts what goes through it."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.f.write(b)
        self.sha.update(b)
        self.size += len(b)
        return len(b)

    def tell(self) -> int:
        return self.size


@dataclass
class Commit:
    """What one commit made durable (reported to the driver: small, no pixels)."""

    part: str
    shard: ShardEntry | None
    samples: int = 0
    failed: Counter = field(default_factory=Counter)
    """failure reason -> count (duplicates included)."""
    aliases: int = 0


@dataclass
class _OpenShard:
    name: str
    seq: int
    path: str
    file: Any
    hashing: _Hashing
    tar: _SampleTar
    keys: list[str] = field(default_factory=list)
    fingerprints: dict[str, str] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    size: int = 0


class PartitionWriter:
    """Turns one partition's finished videos into shards and ledger commits, in batch order."""

    def __init__(
        self, output: OutputDir, pipeline: Pipeline, partition: int, start_seq: int, cfg: ShardConfig
    ):
        self.output, self.pipeline, self.partition, self.cfg = output, pipeline, partition, cfg
        self.seq = start_seq
        self.next_batch = 0
        self.buffer: dict[int, list[VideoContext]] = {}
        self.shard: _OpenShard | None = None
        self.rows: list[dict] = []  # failures, duplicates, aliases not committed yet
        self.keys_seen: set[str] = set()

    def add(self, batch_no: int, items: list[VideoContext]) -> list[Commit]:
        """Take a finished batch (any order); write every batch that is now next in line."""
        if batch_no < self.next_batch or batch_no in self.buffer:
            raise ValueError(f"batch {batch_no} of partition {self.partition} given twice")
        self.buffer[batch_no] = items
        commits: list[Commit] = []
        while self.next_batch in self.buffer:
            for ctx in self.buffer.pop(self.next_batch):
                commits += self._take(ctx)
            self.next_batch += 1
        return commits

    def close(self) -> list[Commit]:
        """Commit the open shard and the last rows. Every batch must have been given."""
        if self.buffer:
            raise RuntimeError(
                f"partition {self.partition}: batches {sorted(self.buffer)} arrived but batch {self.next_batch} "
                "never did"
            )
        commits = []
        if self.shard is not None:
            commits.append(self._commit_shard())
        if self.rows:
            commits.append(self._commit_rows())
        return commits

    def abort(self) -> None:
        """Drop the open shard (a failed partition): its videos are redone by the retry."""
        if self.shard is not None:
            self.shard.tar.discard()
            self.shard.file.close()
            _unlink(self.shard.path)  # a local scratch file in both cases
            self.shard = None

    # -- one video
    def _take(self, ctx: VideoContext) -> list[Commit]:
        commits: list[Commit] = []
        if ctx.output is None:
            self.rows.append(outcome_row(ctx, self.pipeline, None))
            if len(self.rows) >= self.cfg.maxcount:
                commits.append(self._commit_rows())
            return commits
        key = ctx.video_id
        if key in self.keys_seen:  # cannot happen (the driver's claims dedupe ids): refuse loudly
            raise RuntimeError(f"partition {self.partition}: sample {key} written twice")
        self.keys_seen.add(key)
        size = sum(len(b) + _TAR_OVERHEAD for b in ctx.output.values())
        if self.shard is not None and self.shard.keys and self.shard.size + size > self.cfg.maxsize:
            commits.append(self._commit_shard())
        if self.shard is None:
            self.shard = self._open()
        self.shard.tar.write(key, dict(sorted(ctx.output.items())))
        self.shard.keys.append(key)
        self.shard.fingerprints[key] = self.pipeline.final_fingerprint
        self.shard.size += size
        self.shard.rows.append(outcome_row(ctx, self.pipeline, self.shard.name))
        ctx.output = None  # the bytes are in the tar now: free them
        if len(self.shard.keys) >= self.cfg.maxcount:
            commits.append(self._commit_shard())
        return commits

    # -- commits
    def _open(self) -> _OpenShard:
        name = shard_name(self.cfg, self.partition, self.seq)
        seq = self.seq
        self.seq += 1
        path = self.output.scratch_file(posixpath.join(SHARDS, name))
        f = open(path, "wb")  # noqa: SIM115 - closed in _commit_shard / abort
        hashing = _Hashing(f)
        return _OpenShard(name=name, seq=seq, path=path, file=f, hashing=hashing, tar=_SampleTar(hashing))

    def _commit_shard(self) -> Commit:
        s = self.shard
        assert s is not None
        self.shard = None
        s.tar.close()  # writes the end-of-archive blocks through the hashing file
        s.file.flush()
        os.fsync(s.file.fileno())
        s.file.close()
        entry = ShardEntry(
            url=s.name,
            count=len(s.keys),
            num_bytes=s.hashing.size,
            sha256=s.hashing.sha.hexdigest(),
            keys=s.keys,
            sample_fingerprints=s.fingerprints,
        )
        self.output.publish(s.path, posixpath.join(SHARDS, s.name))
        rows, self.rows = s.rows + self.rows, []
        return self._write(s.seq, rows, entry)

    def _commit_rows(self) -> Commit:
        seq = self.seq
        self.seq += 1
        rows, self.rows = self.rows, []
        return self._write(seq, rows, None)

    def _write(self, seq: int, rows: list[dict], entry: ShardEntry | None) -> Commit:
        part = write_part(self.output, self.partition, seq, rows, entry)
        commit = Commit(part=part, shard=entry)
        for row in rows:
            if row["outcome"] == "sample":
                commit.samples += 1
            elif row["outcome"] == "alias":
                commit.aliases += 1
            else:
                commit.failed[row["error_class"]] += 1
        return commit


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# ---------------------------------------------------------------------------------------------- start of a run
@dataclass
class Reconciled:
    removed_temporary: int = 0
    removed_orphans: int = 0
    damaged: list[str] = field(default_factory=list)


def reconcile(output: OutputDir, index: LedgerIndex) -> Reconciled:
    """Make the output agree with its ledger before a run: the run holds the lock, nobody else writes.

    - hidden temporary files (a killed run's half-written shard or ledger part) are removed;
    - a shard file no ledger part lists (killed between publishing it and committing its part) is removed;
    - a committed shard that is missing or whose size differs from its entry (damaged outside this tool) loses
      its ledger part too: its videos are curated again by this run. (`lumosx-curate verify` checks sha256.)
    """
    out = Reconciled()
    for directory in (SHARDS, LEDGER):
        for name in output.list_sizes(directory):
            if name.startswith(TMP_PREFIX):
                output.remove(posixpath.join(directory, name))
                out.removed_temporary += 1
    sizes = output.list_sizes(SHARDS)
    for name in sizes:
        if name.endswith(".tar") and not name.startswith(".") and name not in index.shards:
            output.remove(posixpath.join(SHARDS, name))
            out.removed_orphans += 1
            logger.warning("removed shard %s: a killed run published it but never committed it", name)
    for name, (part, entry) in list(index.shards.items()):
        if sizes.get(name) != entry.num_bytes:
            why = "missing" if name not in sizes else f"{sizes[name]} bytes, its index says {entry.num_bytes}"
            logger.warning(
                "shard %s is damaged (%s): its %d samples are curated again", name, why, entry.count
            )
            out.damaged.append(name)
            output.remove(posixpath.join(SHARDS, name))
            output.remove(posixpath.join(LEDGER, part))
    return out


# ---------------------------------------------------------------------------------------------- end of a run
@dataclass
class DatasetSummary:
    samples: int
    shards: int
    retired_samples: int
    failures: list[FailureRecord]
    random_weight_samples: int
    entries: list[ShardEntry]


def finalize(output: OutputDir, seen: set[str], discovery_failures: list[FailureRecord]) -> DatasetSummary:
    """Write index.json, manifest.parquet and failures.parquet from the ledger; retire superseded samples.

    Streams the ledger part by part: the first pass keeps only ids and outcomes (tens of bytes per video), the
    manifest is written one part at a time, so memory does not grow with captions and records.
    """
    index = read_index(output)  # everything committed, this run included

    # The latest sample-or-failure row of a video decides whether (and which) sample of it is current.
    small = read_parts(output, index.parts, columns=["uri", "video_id", "outcome", "shard"])
    uris, vids = small["uri"].to_pylist(), small["video_id"].to_pylist()
    outcomes, shards, parts = (
        small["outcome"].to_pylist(),
        small["shard"].to_pylist(),
        small["part"].to_pylist(),
    )
    del small
    deciding: dict[str, int] = {}
    latest: dict[str, int] = {}
    for i, outcome in enumerate(outcomes):
        if outcome in ("sample", "failed"):
            deciding[vids[i]] = i
        latest[uris[i]] = i
    current = {(vids[i], shards[i]) for i in deciding.values() if outcomes[i] == "sample" and shards[i]}
    stale: dict[str, set[str]] = {}
    for i, outcome in enumerate(outcomes):
        if outcome == "sample" and (vids[i], shards[i]) not in current:
            stale.setdefault(shards[i], set()).add(vids[i])
    retired = 0
    for shard, keys in sorted(stale.items()):
        if shard in index.shards:
            retired += _retire(output, index.shards[shard], keys)
    if stale:
        index = read_index(output)

    entries = sorted((e for _, e in index.shards.values()), key=lambda e: e.url)
    output.write_bytes(INDEX, ShardIndex(shards=entries).model_dump_json(indent=1).encode())
    _repair_index_lines(output, entries)

    samples = random_weight_samples = 0
    with output.atomic_writer(MANIFEST) as f, pq.ParquetWriter(f, MANIFEST_SCHEMA) as manifest:
        for part, _entry in sorted(index.shards.values(), key=lambda pe: pe[1].url):
            rows = read_parts(output, [part], columns=["video_id", "outcome", "shard", "sample"]).to_pylist()
            batch = []
            for row in rows:
                if row["outcome"] == "sample" and (row["video_id"], row["shard"]) in current:
                    sample = SampleRecord.model_validate_json(row["sample"])
                    batch.append(sample.manifest_row(row["shard"]))
                    random_weight_samples += int(sample.random_weights)
            batch.sort(key=lambda r: r["key"])
            samples += len(batch)
            if batch:
                manifest.write_table(pa.Table.from_pylist(batch, schema=MANIFEST_SCHEMA))

    wanted: dict[str, set[str]] = {}
    for uri in sorted(seen):
        i = latest.get(uri)
        if i is not None and outcomes[i] in ("failed", "duplicate"):
            wanted.setdefault(parts[i], set()).add(uri)
    found: dict[str, FailureRecord] = {}
    failure_columns = ["uri", "video_id", "outcome", "stage", "error_class", "message", "time"]
    for part, part_uris in wanted.items():
        for row in read_parts(output, [part], columns=failure_columns).to_pylist():
            if row["uri"] in part_uris and row["outcome"] in ("failed", "duplicate"):
                found[row["uri"]] = failure_from_row(row)
    failures = list(discovery_failures) + [found[u] for u in sorted(found)]
    write_failures(output, failures)
    return DatasetSummary(
        samples=samples,
        shards=len(entries),
        retired_samples=retired,
        failures=failures,
        random_weight_samples=random_weight_samples,
        entries=entries,
    )


def _retire(output: OutputDir, shard: tuple[str, ShardEntry], keys: set[str]) -> int:
    """Rewrite a shard without the samples in `keys` (superseded versions), and its ledger part to match."""
    part, entry = shard
    keep = [k for k in entry.keys if k not in keys]
    logger.info("shard %s: retiring %d superseded sample(s), keeping %d", entry.url, len(keys), len(keep))
    rel = posixpath.join(SHARDS, entry.url)
    new_entry: ShardEntry | None = None
    if keep:
        members: dict[str, list[tarfile.TarInfo]] = {}
        with output.open_read(rel) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            data: dict[str, bytes] = {}
            for info in tar:
                key = info.name.split(".", 1)[0]
                if key in keep and info.isfile():
                    members.setdefault(key, []).append(info)
                    data[info.name] = tar.extractfile(info).read()  # type: ignore[union-attr]
        scratch = output.scratch_file(rel)
        with open(scratch, "wb") as raw:
            hashing = _Hashing(raw)
            tw = _SampleTar(hashing)
            for key in keep:
                tw.write(key, {info.name.split(".", 1)[1]: data[info.name] for info in members.get(key, [])})
            tw.close()
        new_entry = entry.model_copy(
            update={
                "count": len(keep),
                "num_bytes": hashing.size,
                "sha256": hashing.sha.hexdigest(),
                "keys": keep,
                "sample_fingerprints": {k: entry.sample_fingerprints[k] for k in keep},
            }
        )
        output.publish(scratch, rel)
    else:
        output.remove(rel)
    # The part loses the retired rows; without samples it keeps its other rows and no shard.
    with output.open_read(posixpath.join(LEDGER, part)) as f:
        table = pq.read_table(f)
    mask = [
        not (o == "sample" and v in keys)
        for o, v in zip(table["outcome"].to_pylist(), table["video_id"].to_pylist())
    ]
    table = table.filter(pa.array(mask)).cast(LEDGER_SCHEMA)
    meta = {SHARD_META_KEY: new_entry.model_dump_json().encode()} if new_entry is not None else None
    table = table.replace_schema_metadata(meta)
    with output.atomic_writer(posixpath.join(LEDGER, part)) as f:
        pq.write_table(table, f, compression="zstd")
    if new_entry is not None:
        output.append_line(INDEX_LINES, new_entry.model_dump_json())
    return len(keys)


def _repair_index_lines(output: OutputDir, entries: list[ShardEntry]) -> None:
    """Append to index.jsonl the committed shards it lacks (a run killed between a commit and its line)."""
    have: dict[str, str] = {}
    if output.exists(INDEX_LINES):
        for line in output.read_bytes(INDEX_LINES).decode().splitlines():
            try:
                e = json.loads(line)
                have[e["url"]] = e["sha256"]
            except (ValueError, KeyError):
                continue  # a line cut by a crash: the entry is appended again below
    for e in entries:
        if have.get(e.url) != e.sha256:
            output.append_line(INDEX_LINES, e.model_dump_json())


def write_failures(output: OutputDir, failures: list[FailureRecord]) -> int:
    rows = [f.model_dump() for f in failures]
    with output.atomic_writer(FAILURES) as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=FAILURES_SCHEMA), f)
    # A JSON-lines copy for people reading failures without pyarrow.
    output.write_bytes(
        FAILURES_JSONL, "".join(json.dumps(f.model_dump(mode="json")) + "\n" for f in failures).encode()
    )
    return len(rows)


def verify(output: OutputDir) -> list[str]:
    """Every shard of `index.json` checked against its size and sha256 (reads every byte): the problems found."""
    if not output.exists(INDEX):
        return [f"{output.url} has no {INDEX} (not a curate output, or no run has finished there)"]
    index = ShardIndex.model_validate_json(output.read_bytes(INDEX))
    sizes = output.list_sizes(SHARDS)
    problems = []
    for e in index.shards:
        if e.url not in sizes:
            problems.append(f"{e.url}: missing")
            continue
        sha = hashlib.sha256()
        with output.open_read(posixpath.join(SHARDS, e.url)) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
        if sizes[e.url] != e.num_bytes or sha.hexdigest() != e.sha256:
            problems.append(
                f"{e.url}: {sizes[e.url]} bytes, sha256 {sha.hexdigest()[:12]}; the index says "
                f"{e.num_bytes} bytes, sha256 {e.sha256[:12]}"
            )
    return problems
