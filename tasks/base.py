"""The shape of a curation stage, and the store that makes stages resumable.

A stage = its configuration + `setup()` once per worker process (load models, cached) + `process(batch)`.
It gets a batch of videos, reads its inputs from upstream records, and returns one record or one `StageError`
per video. The runner (tasks/runner.py) skips videos whose record already exists for the same fingerprint,
writes results atomically and turns errors into failure rows, so a stage never has to think about resume.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel

from models.base import ModelSpec
from schemas.config import CurateConfig, fingerprint
from schemas.records import FailureRecord, Record, VideoRecord

R = TypeVar("R", bound=Record)

_SAFE_ID = re.compile(r"^[a-z0-9_]+$")
_UMASK = os.umask(0)
os.umask(_UMASK)


class StageError(Exception):
    """This video cannot go through this stage: recorded as a failure row, never retried, the run goes on.

    `reason` is a short machine-readable slug (``too_short``, ``no_person``, ``invalid_json``) used to count
    failures by reason in the run report; the message says what was wrong in words.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class TransientError(Exception):
    """Worth retrying the batch (I/O hiccup, CUDA OOM under contention). Prefect retries it with backoff."""


# ---------------------------------------------------------------------------------------------- atomic writes
@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it over `path` only if the block finishes.

    A killed process leaves at most a `.tmp-*` file that no reader looks at, never half a record or shard.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; outputs on a shared cluster must follow the umask like any other file.
    os.chmod(tmp_path, 0o666 & ~_UMASK)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


# ---------------------------------------------------------------------------------------------- work directory
class WorkDir:
    """Everything a run keeps between stages and between runs, under `<output>/work/`.

    records/<stage>/<video_id>.json   {"fingerprint", "status": "ok"|"failed", "record"|"failure"}
    media/<video_id>/...              keyframes, crops, masks (pixels referenced by records)
    samples/<key>/...                 assembled samples, packed into shards by the write step
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.records = self.root / "records"
        self.media_root = self.root / "media"
        self.samples = self.root / "samples"

    @staticmethod
    def check_id(video_id: str) -> str:
        # Ids become file names and tar keys: refuse anything that could escape the output directory.
        if not _SAFE_ID.match(video_id):
            raise ValueError(f"unsafe id {video_id!r}: only [a-z0-9_] allowed")
        return video_id

    def media(self, video_id: str) -> Path:
        return self.media_root / self.check_id(video_id)

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def abs(self, rel: str) -> Path:
        p = (self.root / rel).resolve()
        if not p.is_relative_to(self.root.resolve()):
            raise ValueError(f"path {rel!r} escapes the work directory")
        return p

    def _record_path(self, stage: str, video_id: str) -> Path:
        return self.records / stage / f"{self.check_id(video_id)}.json"

    def load(self, stage: str, video_id: str) -> dict | None:
        path = self._record_path(stage, video_id)
        if not path.is_file():
            return None
        return json.loads(path.read_text())

    def save_ok(self, stage: str, video_id: str, fp: str, record: Record) -> None:
        atomic_write_json(
            self._record_path(stage, video_id),
            {"fingerprint": fp, "status": "ok", "record": record.model_dump(mode="json")},
        )

    def save_failure(self, stage: str, video_id: str, fp: str, failure: FailureRecord) -> None:
        atomic_write_json(
            self._record_path(stage, video_id),
            {"fingerprint": fp, "status": "failed", "failure": failure.model_dump(mode="json")},
        )

    def iter_failures(self) -> Iterator[FailureRecord]:
        for path in sorted(self.records.glob("*/*.json")):
            data = json.loads(path.read_text())
            if data.get("status") == "failed":
                yield FailureRecord.model_validate(data["failure"])


@dataclass
class VideoContext:
    """One video as a stage sees it: its probe record and lazy access to upstream records."""

    video: VideoRecord
    work: WorkDir
    fingerprints: dict[str, str]

    @property
    def video_id(self) -> str:
        return self.video.video_id

    def record(self, stage: type[Stage[R]] | str, record_type: type[R] | None = None) -> R:
        name = stage if isinstance(stage, str) else stage.name
        rtype = record_type or (stage.record_type if not isinstance(stage, str) else None)
        data = self.work.load(name, self.video_id)
        if data is None or data.get("status") != "ok":
            raise LookupError(f"{self.video_id}: no {name} record (run the {name} stage first)")
        if rtype is None:
            raise TypeError("record_type is required when the stage is given by name")
        return rtype.model_validate(data["record"])


class Stage(ABC, Generic[R]):
    """A curation stage. Subclasses set the class attributes and implement `process`."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    """Bump when a code change alters the output: finished records of older versions are then redone."""
    record_type: ClassVar[type[Record]]
    requires: ClassVar[tuple[str, ...]] = ()
    uses_gpu: ClassVar[bool] = False

    def __init__(self, config: CurateConfig, work: WorkDir):
        self.config = config
        self.work = work

    def settings(self) -> Any:
        """The configuration that determines this stage's output (hashed into its fingerprint)."""
        return None

    def fingerprint(self, upstream: dict[str, str]) -> str:
        return fingerprint(self.name, self.version, self.settings(), [upstream[r] for r in self.requires])

    def model_specs(self) -> list[ModelSpec]:
        """The models this stage runs (the flow uses them to decide whether a batch holds a GPU slot)."""
        section = getattr(self.config, self.name, None)
        spec = getattr(section, "model", None)
        return [spec] if isinstance(spec, ModelSpec) else []

    def setup(self) -> None:
        """Load models. Called once per worker process before the first batch (adapters are cached)."""

    @abstractmethod
    def process(self, videos: list[VideoContext]) -> dict[str, R | StageError]:
        """Return, for every video id in the batch, its record or the StageError that stopped it."""
