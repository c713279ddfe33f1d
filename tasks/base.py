"""The shape of a curation stage, the per-video context it works on, and the errors it may raise.

A stage = its configuration + `setup()` once per worker (load models) + `process(batch)`. It gets a batch of
`VideoContext`s, reads upstream records and media from them, and returns one record or one `StageError` per
video; it may add media (images, masks, plates) to a context. The runner (tasks/runner.py) skips what a
resumed run already has, turns errors into failure rows and isolates one bad video from its batch-mates, so a
stage never has to think about resume, retries or executors.

Nothing here touches the disk: a context travels in memory from stage to stage (through Ray's object store on a
cluster), and only the shard writer and the resume ledger (tasks/shards.py, tasks/ledger.py) write files.
"""

from __future__ import annotations

import errno
import io
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.base import ModelSpec
from schemas.config import CurateConfig, fingerprint
from schemas.records import FailureRecord, Record, SourceFile, VideoRecord

R = TypeVar("R", bound=Record)

_UMASK = os.umask(0)
os.umask(_UMASK)


# ---------------------------------------------------------------------------------------------- errors
class StageError(Exception):
    """This video cannot go through this stage: recorded as a failure row, never retried, the run goes on.

    `reason` is a short machine-readable slug (``too_short``, ``no_person``, ``invalid_json``) used to count
    failures by reason in the run report; the message says what was wrong in words.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class TransientError(Exception):
    """Worth retrying the batch (I/O hiccup, CUDA OOM under contention); retried with backoff, then failed."""


class EnvironmentFault(Exception):
    """The machine, not the video: disk full, read-only output, out of memory, no file handles left.

    Never written as a video's failure (the video is fine and must be curated once the machine is): the run
    stops early, says why, and keeps everything it committed, so a plain rerun finishes the job.
    """


# errno values that describe the machine, not the file being read.
_ENVIRONMENT_ERRNOS = frozenset(
    e
    for e in (
        errno.ENOSPC,
        getattr(errno, "EDQUOT", None),
        errno.EROFS,
        errno.ENOMEM,
        errno.EMFILE,
        errno.ENFILE,
    )
    if e is not None
)


def environment_fault(exc: BaseException) -> EnvironmentFault | None:
    """`exc` as an `EnvironmentFault` when it is one (walking its causes), else None."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, EnvironmentFault):
            return cur
        if isinstance(cur, MemoryError):
            return EnvironmentFault(f"out of memory: {cur}")
        if isinstance(cur, OSError) and cur.errno in _ENVIRONMENT_ERRNOS:
            where = f" ({cur.filename})" if cur.filename else ""
            return EnvironmentFault(f"{os.strerror(cur.errno)}{where}: {cur}")
        cur = cur.__cause__ or cur.__context__
    return None


# ---------------------------------------------------------------------------------------------- atomic writes
@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a hidden temporary path next to `path`; rename it over `path` only if the block finishes.

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
    import json

    from pydantic import BaseModel

    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


# ---------------------------------------------------------------------------------------------- media
def encode_png(image: Image.Image | np.ndarray) -> bytes:
    """Lossless PNG bytes (compression level 1: 3-4x faster than the default, ~10 % larger). Deterministic."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


Media = np.ndarray | bytes
"""A raw image (HxWx3 uint8 RGB, or HxW bool mask) or the bytes of an encoded image file (PNG)."""


@dataclass
class VideoContext:
    """One video on its way through the stages: where it came from, what it is, and what stages made of it.

    `records` holds each finished stage's record (a resumed run seeds the ones it can reuse); `media` holds
    pixels by name (records refer to them by that name): keyframes as raw arrays, which are cheap to decode
    again and never stored, and everything else (face crops, masks, plates) as PNG bytes, which the resume
    ledger keeps. `output` is what the video contributes to the shards (member name -> bytes); `failure`
    ends its journey.
    """

    source: SourceFile
    fingerprints: dict[str, str] = field(default_factory=dict)
    video: VideoRecord | None = None
    records: dict[str, Record] = field(default_factory=dict)
    media: dict[str, Media] = field(default_factory=dict)
    output: dict[str, bytes] | None = None
    media_stage: dict[str, str] = field(default_factory=dict)
    """media name -> the stage that made it (the ledger keeps media with their stage's record)."""
    failure: FailureRecord | None = None
    alias_of: str | None = None
    """Set when this file's bytes are already in the shards under another uri that is gone (a renamed file):
    its journey ends without a failure and without a second sample."""

    @property
    def video_id(self) -> str:
        if self.video is not None:
            return self.video.video_id
        return self.source.video_id or self.source.uri_key

    @property
    def uri(self) -> str:
        return self.source.uri

    def record(self, stage: type[Stage[R]] | str, record_type: type[R] | None = None) -> R:
        name = stage if isinstance(stage, str) else stage.name
        rtype = record_type or (stage.record_type if not isinstance(stage, str) else None)
        rec = self.records.get(name)
        if rec is None:
            raise LookupError(f"{self.video_id}: no {name} record (run the {name} stage first)")
        if rtype is not None and not isinstance(rec, rtype):
            raise TypeError(
                f"{self.video_id}: the {name} record is a {type(rec).__name__}, not {rtype.__name__}"
            )
        return rec  # type: ignore[return-value]

    # -- media
    def put(self, name: str, data: Media | Image.Image) -> str:
        """Store an image under `name` (PIL images are PNG-encoded) and return the name for a record."""
        self.media[name] = encode_png(data) if isinstance(data, Image.Image) else data
        return name

    def _raw(self, name: str | None) -> Media:
        if name is None or name not in self.media:
            raise StageError(
                "missing_media", f"{self.video_id}: no image {name!r} (its stage did not make one)"
            )
        return self.media[name]

    def pil(self, name: str | None) -> Image.Image:
        """The image `name` as an RGB PIL image."""
        data = self._raw(name)
        if isinstance(data, np.ndarray):
            return Image.fromarray(data).convert("RGB")
        try:
            with Image.open(io.BytesIO(data)) as im:
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise StageError(
                "unreadable_media", f"{self.video_id}: image {name!r} cannot be decoded: {e}"
            ) from e

    def rgb(self, name: str | None) -> np.ndarray:
        """The image `name` as an HxWx3 uint8 RGB array (no copy for raw keyframes)."""
        data = self._raw(name)
        if isinstance(data, np.ndarray) and data.ndim == 3:
            return data
        return np.asarray(self.pil(name))

    def mask(self, name: str | None) -> np.ndarray:
        """The mask `name` as an HxW bool array."""
        data = self._raw(name)
        if isinstance(data, np.ndarray):
            return data.astype(bool) if data.ndim == 2 else data[..., 0] > 0
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("L")) > 0

    def data(self, name: str | None) -> bytes:
        """The encoded bytes of image `name` (raw arrays are PNG-encoded)."""
        raw = self._raw(name)
        return raw if isinstance(raw, bytes) else encode_png(raw)

    def fail(self, stage: str, reason: str, message: str) -> None:
        self.failure = FailureRecord(
            video_id=self.video_id, uri=self.uri, stage=stage, error_class=reason, message=message[:2000]
        )
        self.output = None


class Stage(ABC, Generic[R]):
    """A curation stage. Subclasses set the class attributes and implement `process`."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    """Bump when a code change alters the output: finished records of older versions are then redone."""
    record_type: ClassVar[type[Record]]
    requires: ClassVar[tuple[str, ...]] = ()
    uses_gpu: ClassVar[bool] = False
    reusable: ClassVar[bool] = True
    """A resumed run may take this stage's record (and its PNG media) from the ledger instead of recomputing
    it. Off for stages whose output is cheaper to make again than to store (keyframes: raw frames)."""

    def __init__(self, config: CurateConfig):
        self.config = config

    def settings(self) -> Any:
        """The configuration that determines this stage's output (hashed into its fingerprint)."""
        return None

    def fingerprint(self, upstream: dict[str, str]) -> str:
        return fingerprint(self.name, self.version, self.settings(), [upstream[r] for r in self.requires])

    def model_specs(self) -> list[ModelSpec]:
        """The models this stage runs (preflight checks their weights; the report lists them)."""
        section = getattr(self.config, self.name, None)
        spec = getattr(section, "model", None)
        return [spec] if isinstance(spec, ModelSpec) else []

    def setup(self) -> None:
        """Load models. Called once per worker before the first batch (adapters are cached per process)."""

    def result_key(self, ctx: VideoContext) -> str:
        """The key of `ctx`'s result in what `process` returns (taken before `process` runs)."""
        return ctx.video_id

    @abstractmethod
    def process(self, videos: list[VideoContext]) -> dict[str, R | StageError]:
        """Return, for every video of the batch (by `result_key`), its record or the StageError that stopped it."""
