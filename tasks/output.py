"""Where a run writes: a local (or shared POSIX: NFS, Lustre) directory, or an fsspec URL (s3://, gs://).

Everything the run writes goes through `OutputDir`, so the same code writes shards, the ledger and the tables to
either. Writes are atomic: a local file is written under a hidden temporary name, fsync'ed and renamed into place
(a killed run leaves at most a `.tmp-*` file that no reader looks at, and the next run removes it); an object
store makes an object visible only once its upload completes. Credentials for object stores come from the usual
environment variables (AWS_*, GOOGLE_APPLICATION_CREDENTIALS) or from `storage_options` (the flow reads them
from a Prefect Secret block): never from the curation config, which is written next to the data.

Layout of an output directory:
    shards/<prefix>-<partition>-<seq>.tar   the data (WebDataset); a file here is always complete
    index.jsonl                              one line per committed shard, appended as shards are committed
    index.json                               the canonical index (sorted), written at the end of each run
    manifest.parquet, failures.parquet, failures.jsonl, report.json, config.json
    work/ledger/<partition>-<seq>.parquet    resume state: per video, its outcome and reusable stage records
    .lock                                    who is running on this output (tasks/lock.py)
"""

from __future__ import annotations

import io
import os
import posixpath
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tasks.base import _UMASK

SHARDS = "shards"
LEDGER = "work/ledger"
INDEX_LINES = "index.jsonl"
INDEX = "index.json"
MANIFEST = "manifest.parquet"
FAILURES = "failures.parquet"
FAILURES_JSONL = "failures.jsonl"
REPORT = "report.json"
CONFIG = "config.json"
LOCK = ".lock"
TMP_PREFIX = ".tmp-"


class OutputDir:
    """A run's output directory, local or remote. Picklable: Ray writer actors get one."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url
        self.storage_options = storage_options or {}
        self._fs: fsspec.AbstractFileSystem | None = None
        fs, root = fsspec.core.url_to_fs(url, **self.storage_options)
        self.local = isinstance(fs, LocalFileSystem)
        self.root = os.path.abspath(root) if self.local else root.rstrip("/")

    def __getstate__(self) -> dict:
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["url"], state["storage_options"])  # type: ignore[misc]

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            self._fs = fsspec.core.url_to_fs(self.url, **self.storage_options)[0]
        return self._fs

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def uri(self, rel: str) -> str:
        """A reader's address for `rel` (a plain path locally)."""
        return self.path(rel) if self.local else self.fs.unstrip_protocol(self.path(rel))

    # -- reading
    def exists(self, rel: str) -> bool:
        return os.path.exists(self.path(rel)) if self.local else self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        if self.local:
            with open(self.path(rel), "rb") as f:
                return f.read()
        return self.fs.cat_file(self.path(rel))

    def open_read(self, rel: str) -> BinaryIO:
        return open(self.path(rel), "rb") if self.local else self.fs.open(self.path(rel), "rb")

    def list_sizes(self, rel: str) -> dict[str, int]:
        """name -> size of the files directly in `rel` (hidden temporary files included); {} if it is absent."""
        if self.local:
            try:
                with os.scandir(self.path(rel)) as it:
                    return {e.name: e.stat().st_size for e in it if e.is_file()}
            except FileNotFoundError:
                return {}
        try:
            infos = self.fs.ls(self.path(rel), detail=True)
        except FileNotFoundError:
            return {}
        return {
            posixpath.basename(i["name"]): int(i.get("size") or 0) for i in infos if i.get("type") == "file"
        }

    # -- writing
    def makedirs(self, rel: str) -> None:
        if self.local:
            os.makedirs(self.path(rel), exist_ok=True)
        # object stores have no directories

    @contextmanager
    def atomic_writer(self, rel: str) -> Iterator[BinaryIO]:
        """A binary file that appears at `rel` whole, only if the block completes."""
        if not self.local:
            buf = io.BytesIO()
            yield buf
            self.fs.pipe_file(self.path(rel), buf.getvalue())
            return
        final = self.path(rel)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f"{TMP_PREFIX}{os.path.basename(final)}-", dir=os.path.dirname(final)
        )
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; shared outputs follow the umask
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.atomic_writer(rel) as f:
            f.write(data)

    def publish(self, local_file: str, rel: str) -> None:
        """Move a finished local file to `rel` (a rename locally, an upload to an object store)."""
        if self.local:
            final = self.path(rel)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.chmod(local_file, 0o666 & ~_UMASK)
            os.replace(local_file, final)
        else:
            self.fs.put_file(local_file, self.path(rel))
            os.unlink(local_file)

    def scratch_file(self, rel: str) -> str:
        """A temporary local file to build `rel` in: beside it locally (so `publish` is a rename), else in /tmp."""
        directory = os.path.dirname(self.path(rel)) if self.local else None
        if directory:
            os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{posixpath.basename(rel)}-", dir=directory)
        os.close(fd)
        return tmp

    def append_line(self, rel: str, line: str) -> None:
        """Append one line (one writer per file: the run's driver). Remote: read-modify-write of a small file."""
        data = (line.rstrip("\n") + "\n").encode()
        if self.local:
            os.makedirs(os.path.dirname(self.path(rel)) or ".", exist_ok=True)
            with open(self.path(rel), "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return
        old = self.read_bytes(rel) if self.exists(rel) else b""
        self.fs.pipe_file(self.path(rel), old + data)

    def remove(self, rel: str) -> None:
        try:
            if self.local:
                os.unlink(self.path(rel))
            else:
                self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass
