"""Pack assembled samples into WebDataset shards, with a parquet manifest and a shard index beside them.

Crash safety: a shard is written under a temporary name and renamed into `shards/` only when complete; the index
(`index.json`) is rewritten atomically after every shard and is the truth. On start, any shard file the index
does not list (a run killed between rename and index update) is deleted and its samples are written again, so
a killed run never leaves a truncated tar nor a duplicate key. Samples already in a listed shard with the same
fingerprint are kept as they are: a rerun only appends new samples, it does not rewrite the dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from schemas.config import ShardConfig
from schemas.records import FailureRecord
from schemas.sample import FAILURES_SCHEMA, MANIFEST_SCHEMA, ShardEntry, ShardIndex, load_sample_meta
from tasks.base import WorkDir, atomic_path, atomic_write_json

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
MANIFEST_NAME = "manifest.parquet"
FAILURES_NAME = "failures.parquet"


@dataclass
class PendingSample:
    key: str
    directory: Path
    fingerprint: str


@dataclass
class ShardSummary:
    written_shards: int
    written_samples: int
    total_shards: int
    total_samples: int
    removed_orphans: int


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_sample(directory: Path, key: str) -> dict:
    sample: dict = {"__key__": key}
    for member in sorted(directory.iterdir()):
        if member.name.startswith("."):
            continue
        sample[member.name] = member.read_bytes()
    return sample


def load_index(out_dir: Path) -> ShardIndex:
    path = out_dir / INDEX_NAME
    return ShardIndex.model_validate_json(path.read_text()) if path.is_file() else ShardIndex()


def write_shards(out_dir: Path, samples: list[PendingSample], cfg: ShardConfig) -> ShardSummary:
    """Bring `out_dir/shards` to exactly the given samples (by key and fingerprint), appending what is new."""
    shard_dir = out_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    index = load_index(out_dir)
    wanted = {s.key: s for s in samples}

    # Keep a shard only if every sample in it is still wanted with the same content; otherwise drop it and
    # requeue its still-wanted samples (rare: a stage's configuration changed for some videos).
    kept: list[ShardEntry] = []
    for entry in index.shards:
        intact = (shard_dir / entry.url).is_file() and all(
            k in wanted and wanted[k].fingerprint == fp for k, fp in entry.sample_fingerprints.items()
        )
        if intact:
            kept.append(entry)
        else:
            logger.info("dropping shard %s: its samples changed or the file is missing", entry.url)
    listed = {e.url for e in kept}
    removed = 0
    for path in shard_dir.iterdir():
        if path.name not in listed:
            path.unlink()
            removed += 1
    if removed:
        logger.warning("removed %d shard file(s) not in the index (left by an interrupted run)", removed)

    done_keys = {k for e in kept for k in e.keys}
    todo = sorted((s for s in samples if s.key not in done_keys), key=lambda s: s.key)
    index = ShardIndex(shards=kept)
    atomic_write_json(out_dir / INDEX_NAME, index)

    next_num = 1 + max((int(e.url.rsplit("-", 1)[1].split(".")[0]) for e in kept), default=-1)
    written = 0
    if todo:  # ShardWriter opens its first shard at construction: never build one for an empty run
        tmp_dir = out_dir / ".shards-tmp"
        tmp_dir.mkdir(exist_ok=True)
        for stale in tmp_dir.iterdir():
            stale.unlink()
        in_shard: list[PendingSample] = []

        def publish(tmp_name: str) -> None:
            nonlocal written
            tmp = Path(tmp_name)
            if not in_shard:
                tmp.unlink(missing_ok=True)
                return
            final = shard_dir / tmp.name
            entry = ShardEntry(
                url=final.name,
                count=len(in_shard),
                num_bytes=tmp.stat().st_size,
                sha256=_sha256(tmp),
                keys=[s.key for s in in_shard],
                sample_fingerprints={s.key: s.fingerprint for s in in_shard},
            )
            os.replace(tmp, final)
            index.shards.append(entry)
            atomic_write_json(out_dir / INDEX_NAME, index)
            written += 1
            in_shard.clear()

        pattern = str(tmp_dir / f"{cfg.prefix}-%06d.tar")
        with wds.ShardWriter(
            pattern, maxcount=cfg.maxcount, maxsize=cfg.maxsize, post=publish, start_shard=next_num, verbose=0
        ) as sink:
            for sample in todo:
                data = _read_sample(sample.directory, sample.key)
                # ShardWriter rolls over *before* writing a sample that would not fit, so the sample goes to
                # the shard opened after `publish` ran: track membership after the write.
                sink.write(data)
                in_shard.append(sample)
        tmp_dir.rmdir()

    return ShardSummary(
        written_shards=written,
        written_samples=len(todo),
        total_shards=len(index.shards),
        total_samples=index.num_samples,
        removed_orphans=removed,
    )


def write_manifest(out_dir: Path, work: WorkDir) -> tuple[int, list[str]]:
    """One parquet row per sample in the index (rebuilt from the samples' meta.json each run).

    Returns the row count and the stages whose random-weight test builds produced any of the samples.
    """
    index = load_index(out_dir)
    rows = []
    random_stages: set[str] = set()
    for entry in index.shards:
        for key in entry.keys:
            sample_dir = work.samples / key
            meta = load_sample_meta((sample_dir / "meta.json").read_bytes())
            random_stages.update(meta.random_weight_stages)
            unmatched = len(meta.persons_without_face) + len(meta.persons_unbound)
            rows.append(
                {
                    "key": key,
                    "shard": entry.url,
                    "schema_version": meta.schema_version,
                    "video_id": meta.video.content_id,
                    "uri": meta.video.uri,
                    "caption": meta.caption,
                    "caption_source": meta.caption_source or "unknown",
                    "num_persons": len(meta.persons) + unmatched,
                    "num_faces": len(meta.persons),
                    "duration_s": meta.video.duration_s,
                    "fps": meta.video.fps,
                    "width": meta.video.width,
                    "height": meta.video.height,
                    "num_bytes": sum(p.stat().st_size for p in sample_dir.iterdir()),
                    "random_weights": meta.random_weights,
                    "config_fingerprint": meta.config_fingerprint or "",
                }
            )
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    with atomic_path(out_dir / MANIFEST_NAME) as tmp:
        pq.write_table(table, tmp)
    return len(rows), sorted(random_stages)


def write_failures(out_dir: Path, failures: list[FailureRecord]) -> int:
    rows = [f.model_dump() for f in failures]
    table = pa.Table.from_pylist(rows, schema=FAILURES_SCHEMA)
    with atomic_path(out_dir / FAILURES_NAME) as tmp:
        pq.write_table(table, tmp)
    # A JSON-lines copy for people reading failures without pyarrow.
    with atomic_path(out_dir / "failures.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(f.model_dump(mode="json")) + "\n" for f in failures))
    return len(rows)
