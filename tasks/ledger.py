"""The resume ledger: what every video came to, and the stage records a later run can reuse.

One Parquet file per commit (`work/ledger/<partition>-<seq>.parquet`), written by the shard writer right after
the shard it describes: a row per video whose journey ended in that commit (a sample in that shard, a failure, a
duplicate, an alias), with the video's reusable stage records (JSON, with their fingerprints) and the PNG media
they refer to. So the work directory grows with shards, not with videos x stages, and a killed run loses at most
the commits in progress.

A run starts by reading the ledger's small columns (never the media): for every file it discovers it then knows,
without reading a byte of the file, whether the file is unchanged since (`SourceFile.state`), its content id,
and whether it is done under the current fingerprints. Files that are not done carry a pointer to their latest
row (`SourceFile.seed_part`), from which the first stage restores every record whose fingerprint still matches
(a changed faces threshold reruns faces and what follows, not captioning).

"Latest" is commit order: file names sort by (partition, seq), and partitions are numbered across runs.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.records import FailureRecord, SourceFile, VideoRecord
from schemas.sample import SampleRecord, ShardEntry
from tasks.base import VideoContext
from tasks.output import LEDGER, OutputDir
from tasks.pipeline import Pipeline

logger = logging.getLogger(__name__)

SHARD_META_KEY = b"lumosx.shard"

LEDGER_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("state", pa.string(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("outcome", pa.string(), nullable=False),  # sample | failed | duplicate | alias
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("shard", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("error_class", pa.string()),
        pa.field("message", pa.string()),
        pa.field("time", pa.timestamp("us", tz="UTC")),
        pa.field("sample", pa.string()),  # SampleRecord JSON: the manifest row
        pa.field("records", pa.string(), nullable=False),  # {stage: {"fp": ..., "record": {...}}}
        pa.field(
            "media",
            pa.list_(pa.struct([("stage", pa.string()), ("name", pa.string()), ("data", pa.binary())])),
        ),
    ]
)
_INDEX_COLUMNS = ["uri", "state", "video_id", "outcome", "fingerprint", "stage", "shard"]
_PART = re.compile(r"^(\d{6})-(\d{6})\.parquet$")


def part_name(partition: int, seq: int) -> str:
    return f"{partition:06d}-{seq:06d}.parquet"


def parse_part(name: str) -> tuple[int, int] | None:
    m = _PART.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


# ---------------------------------------------------------------------------------------------- writing
def outcome_row(ctx: VideoContext, pipeline: Pipeline, shard: str | None) -> dict[str, Any]:
    """The ledger row of a video whose journey ended (`ctx.output` written to `shard`, or a failure)."""
    fps = pipeline.fingerprints
    records = {
        stage: {"fp": fps[stage], "record": rec.model_dump(mode="json")}
        for stage, rec in ctx.records.items()
        if stage in fps and _reusable(pipeline, stage)
    }
    media = [
        {"stage": ctx.media_stage.get(name, ""), "name": name, "data": data}
        for name, data in sorted(ctx.media.items())
        if isinstance(data, bytes) and ctx.media_stage.get(name) in records
    ]
    row: dict[str, Any] = {
        "uri": ctx.uri,
        "state": ctx.source.state,
        "video_id": ctx.video_id,
        "records": json.dumps(records, sort_keys=True, separators=(",", ":")),
        "media": media,
        "shard": None,
        "stage": None,
        "error_class": None,
        "message": None,
        "time": None,
        "sample": None,
    }
    if ctx.failure is not None:
        f = ctx.failure
        duplicate = f.error_class == "duplicate"
        row.update(
            outcome="duplicate" if duplicate else "failed",
            fingerprint=fps.get(f.stage, ""),
            stage=f.stage,
            error_class=f.error_class,
            message=f.message,
            time=f.time,
        )
    elif ctx.alias_of is not None:
        row.update(outcome="alias", fingerprint=pipeline.final_fingerprint)
    else:
        sample = ctx.record(pipeline.specs[-1].name, SampleRecord)
        row.update(
            outcome="sample",
            fingerprint=pipeline.final_fingerprint,
            shard=shard,
            sample=sample.model_dump_json(),
        )
    return row


def _reusable(pipeline: Pipeline, stage: str) -> bool:
    spec = pipeline.spec(stage)
    return spec is not None and spec.reusable


def write_part(
    output: OutputDir, partition: int, seq: int, rows: list[dict[str, Any]], shard: ShardEntry | None
) -> str:
    """Write one commit's rows (and the shard it describes, in the file's metadata); returns the part name."""
    name = part_name(partition, seq)
    table = pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA)
    if shard is not None:
        table = table.replace_schema_metadata({SHARD_META_KEY: shard.model_dump_json().encode()})
    with output.atomic_writer(posixpath.join(LEDGER, name)) as f:
        pq.write_table(table, f, compression="zstd")
    return name


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class Latest:
    """What the ledger says about one uri: its latest row."""

    state: str
    video_id: str
    outcome: str
    fingerprint: str
    stage: str | None
    part: str


@dataclass
class LedgerIndex:
    """The ledger's small columns, read once at the start of a run."""

    latest: dict[str, Latest] = field(default_factory=dict)
    """uri -> its latest row."""
    parts: list[str] = field(default_factory=list)
    shards: dict[str, tuple[str, ShardEntry]] = field(default_factory=dict)
    """shard file name -> (ledger part, its entry)."""
    next_partition: int = 0

    def done(self, src: SourceFile, pipeline: Pipeline, retry_failed: bool) -> tuple[bool, SourceFile]:
        """Is `src` finished under `pipeline`'s fingerprints? Else `src` with what the ledger can seed."""
        row = self.latest.get(src.uri)
        if row is None or row.state != src.state:
            return False, src
        fps = pipeline.fingerprints
        if row.outcome in ("sample", "alias") and row.fingerprint == pipeline.final_fingerprint:
            return True, src
        if (
            row.outcome == "failed"
            and not retry_failed
            and row.stage in fps
            and row.fingerprint == fps[row.stage]
        ):
            return True, src
        return False, src.model_copy(update={"video_id": row.video_id, "seed_part": row.part})


def read_index(output: OutputDir) -> LedgerIndex:
    """The ledger's small columns (never its media), latest row per uri."""
    index = LedgerIndex()
    names = sorted(n for n in output.list_sizes(LEDGER) if parse_part(n) is not None)
    index.parts = names
    if not names:
        return index
    index.next_partition = max(parse_part(n)[0] for n in names) + 1  # type: ignore[index]
    for name in names:
        with output.open_read(posixpath.join(LEDGER, name)) as f:
            pf = pq.ParquetFile(f)
            meta = pf.schema_arrow.metadata or {}
            if SHARD_META_KEY in meta:
                entry = ShardEntry.model_validate_json(meta[SHARD_META_KEY])
                index.shards[entry.url] = (name, entry)
            cols = pf.read(columns=_INDEX_COLUMNS).to_pydict()
        for i, uri in enumerate(cols["uri"]):
            index.latest[uri] = Latest(
                state=cols["state"][i],
                video_id=cols["video_id"][i],
                outcome=cols["outcome"][i],
                fingerprint=cols["fingerprint"][i],
                stage=cols["stage"][i],
                part=name,
            )
    return index


def read_parts(output: OutputDir, names: Iterable[str], columns: list[str] | None = None) -> pa.Table:
    """Rows of the given ledger parts (in order), with a `part` column."""
    tables = []
    for name in names:
        with output.open_read(posixpath.join(LEDGER, name)) as f:
            t = pq.read_table(f, columns=columns)
        tables.append(t.append_column("part", pa.array([name] * t.num_rows, pa.string())))
    if not tables:
        schema = pa.schema([LEDGER_SCHEMA.field(c) for c in columns] if columns else list(LEDGER_SCHEMA))
        return schema.empty_table().append_column("part", pa.array([], pa.string()))
    return pa.concat_tables(tables, promote_options="default")


# ---------------------------------------------------------------------------------------------- seeding
def restore_seeds(items: list[VideoContext], output: OutputDir, pipeline: Pipeline) -> int:
    """Give each resumed video the records (and media) of its latest ledger row whose fingerprints still match.

    Runs in the worker of the first stage, so the driver never holds a batch's media. Returns the number of
    records restored.
    """
    wanted: dict[str, list[VideoContext]] = {}
    for ctx in items:
        if ctx.source.seed_part:
            wanted.setdefault(ctx.source.seed_part, []).append(ctx)
    restored = 0
    specs = {s.name: s for s in pipeline.specs}
    for part, ctxs in wanted.items():
        by_uri = {c.uri: c for c in ctxs}
        try:
            with output.open_read(posixpath.join(LEDGER, part)) as f:
                table = pq.read_table(f, columns=["uri", "state", "records", "media"])
        except FileNotFoundError:
            continue  # retired since: the videos are simply computed again
        rows = table.filter(pa.compute.is_in(table["uri"], pa.array(list(by_uri)))).to_pylist()
        for row in rows:
            ctx = by_uri.get(row["uri"])
            if ctx is None or row["state"] != ctx.source.state:
                continue
            seeded: set[str] = set()
            for stage, entry in json.loads(row["records"]).items():
                spec = specs.get(stage)
                if spec is None or not spec.reusable or entry["fp"] != pipeline.fingerprints.get(stage):
                    continue
                record = spec.record_type().model_validate(entry["record"])
                ctx.records[stage] = record
                if isinstance(record, VideoRecord):
                    ctx.video = record
                seeded.add(stage)
                restored += 1
            for m in row["media"] or []:
                if m["stage"] in seeded:
                    ctx.media[m["name"]] = m["data"]
                    ctx.media_stage[m["name"]] = m["stage"]
    return restored


# ---------------------------------------------------------------------------------------------- claims
class Claims:
    """Content id -> the uri that owns it in this dataset: how copies of one file are curated once.

    Seeded from the ledger, then claimed as partitions ingest. Thread-safe (the driver checks batches of every
    partition in flight).
    """

    def __init__(self, index: LedgerIndex, exists):
        import threading

        self._lock = threading.Lock()
        self._exists = exists
        self._owner: dict[str, str] = {}
        self._done: dict[str, bool] = {}
        for uri, row in index.latest.items():
            if row.outcome in ("sample", "failed", "alias"):
                self._owner[row.video_id] = uri

    def owner(self, video_id: str) -> str | None:
        with self._lock:
            return self._owner.get(video_id)

    def still_duplicate(self, uri: str, index: LedgerIndex, state: str) -> bool:
        """The ledger says `uri` (unchanged) duplicates another file that still exists: nothing to redo."""
        row = index.latest.get(uri)
        if row is None or row.outcome != "duplicate" or row.state != state:
            return False
        owner = self.owner(row.video_id)
        return owner is not None and owner != uri and self._exists(owner)

    def verdicts(
        self, ingested: list[tuple[str, str]], index: LedgerIndex, pipeline: Pipeline
    ) -> dict[str, tuple[str, str]]:
        """For (uri, content id) pairs just ingested: uri -> ("duplicate", why) or ("alias", id)."""
        out: dict[str, tuple[str, str]] = {}
        with self._lock:
            for uri, vid in ingested:
                owner = self._owner.get(vid)
                if owner is None or owner == uri:
                    self._owner[vid] = uri
                    continue
                if self._exists(owner):
                    out[uri] = ("duplicate", f"{uri} has the same content as {owner}")
                    continue
                # The owner is gone: this is the same video, renamed or moved. Its sample stays where it is.
                self._owner[vid] = uri
                row = index.latest.get(owner)
                if (
                    row is not None
                    and row.outcome in ("sample", "alias")
                    and (row.fingerprint == pipeline.final_fingerprint)
                ):
                    out[uri] = ("alias", vid)
        return out


def failure_from_row(row: dict[str, Any]) -> FailureRecord:
    return FailureRecord(
        video_id=row["video_id"],
        uri=row["uri"],
        stage=row["stage"],
        error_class=row["error_class"],
        message=row["message"] or "",
        time=row["time"] or datetime.now(UTC),
    )
