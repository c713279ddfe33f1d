"""Find the videos under an input: a local directory, a glob, a single file, or an fsspec URL (s3://, gs://).

Discovery streams: it yields files in a deterministic order (directories walked depth first, entries sorted by
name) as it finds them, so partitions start while a million-file crawl goes on. It reads no file content, only
directory entries and `stat`, and it is where junk in a crawled folder is recognised before anything opens it:

| what | result |
|---|---|
| a regular file with a video extension | a `SourceFile` |
| a FIFO, socket or device named like a video | failure row `not_a_file` (opening a FIFO blocks forever) |
| a symlink loop, a dangling symlink | failure row `symlink_loop`, `broken_symlink` (the row names the link) |
| a symlink to a file outside the input tree | failure row `outside_input` (nothing outside the input enters the data) |
| a file that cannot be stat'ed | failure row `unreadable` |
| a hidden file or folder (`.name`, macOS `._name`) | skipped, noted as `hidden` |
| a folder that cannot be listed | skipped, noted as `unreadable_dir` |
| a folder reached twice (symlink loop, second link to it) | skipped, noted as `symlink_loop` |
| the run's own output folder inside the input | skipped, noted as `output_dir` |

Sidecar captions (`<stem>.txt` beside a video) are located here too, with the same rules: a sidecar must be a
regular file inside the input tree, else the video carries `sidecar_problem` and ingest fails it (bad_sidecar).
"""

from __future__ import annotations

import errno
import glob as globlib
import os
import posixpath
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from schemas.records import FailureRecord, SourceFile

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Skip:
    """Something discovery passed over on purpose; counted by reason in the run report, with examples."""

    uri: str
    reason: str


Found = SourceFile | FailureRecord | Skip


class InputError(ValueError):
    """The input itself cannot be read (missing, not a directory/file/glob, unknown protocol)."""


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> str:
    return uri.removeprefix("file://")


def _failure(uri: str, reason: str, message: str) -> FailureRecord:
    key = SourceFile(uri=uri, size=0, version="").uri_key
    return FailureRecord(video_id=key, uri=uri, stage="discover", error_class=reason, message=message)


def normalize_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    return tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)


def discover(source: str, extensions: Iterable[str], *, exclude: Iterable[str] = ()) -> Iterator[Found]:
    """Everything found under `source`, in a stable order. Raises `InputError` when `source` is unusable."""
    exts = normalize_extensions(extensions)
    if is_local(source):
        yield from _discover_local(
            local_path(source), exts, [os.path.abspath(local_path(e)) for e in exclude]
        )
    else:
        yield from _discover_remote(source, exts)


# ---------------------------------------------------------------------------------------------- local files
def _discover_local(source: str, exts: tuple[str, ...], exclude: list[str]) -> Iterator[Found]:
    source = os.path.abspath(source)
    if _GLOB_CHARS & set(source):
        prefix = source[: min(source.index(c) for c in _GLOB_CHARS if c in source)]
        root = os.path.dirname(prefix) or "/"
        real_root = os.path.realpath(root)
        for path in sorted(globlib.glob(source, recursive=True)):
            if os.path.isdir(path):
                continue
            yield from _local_file(path, os.path.basename(path), set(), real_root, exts, video_check=True)
        return
    try:
        st = os.stat(source)
    except OSError as e:
        raise InputError(f"input {source} cannot be read: {e.strerror or e}") from e
    real_root = os.path.realpath(source)
    if stat.S_ISDIR(st.st_mode):
        yield from _walk(source, real_root, exts, exclude, {(st.st_dev, st.st_ino)})
    elif stat.S_ISREG(st.st_mode):
        parent = os.path.dirname(source)
        names = set(_listdir_quiet(parent))
        yield from _local_file(
            source, os.path.basename(source), names, os.path.dirname(real_root), exts, False
        )
    else:
        raise InputError(f"input {source} is neither a directory, a regular file nor a glob")


def _listdir_quiet(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _walk(
    directory: str, real_root: str, exts: tuple[str, ...], exclude: list[str], seen: set[tuple[int, int]]
) -> Iterator[Found]:
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        yield Skip(directory, "unreadable_dir" if e.errno != errno.ELOOP else "symlink_loop")
        return
    names = {e.name for e in entries}
    for entry in entries:
        path = entry.path
        if entry.name.startswith("."):
            if entry.name.lower().endswith(exts) or _is_dir(entry):
                yield Skip(path, "hidden")
            continue
        if _is_dir(entry):
            if any(os.path.abspath(path) == e for e in exclude):
                yield Skip(path, "output_dir")
                continue
            try:
                st = os.stat(path)
            except OSError:
                yield Skip(path, "unreadable_dir")
                continue
            ident = (st.st_dev, st.st_ino)
            if ident in seen:
                yield Skip(path, "symlink_loop")  # a loop, or a second link to a folder already walked
                continue
            seen.add(ident)
            yield from _walk(path, real_root, exts, exclude, seen)
            continue
        yield from _local_file(path, entry.name, names, real_root, exts, video_check=True)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _inside(real_path: str, real_root: str) -> bool:
    return real_path == real_root or real_path.startswith(real_root.rstrip("/") + "/")


def _local_file(
    path: str, name: str, siblings: set[str], real_root: str, exts: tuple[str, ...], video_check: bool
) -> Iterator[Found]:
    if video_check and not name.lower().endswith(exts):
        return
    try:
        st = os.stat(path)  # follows symlinks: the file a reader would open
    except OSError as e:
        if e.errno == errno.ELOOP:
            yield _failure(path, "symlink_loop", f"{path} is a symlink loop")
        elif e.errno == errno.ENOENT and os.path.islink(path):
            yield _failure(path, "broken_symlink", f"{path} is a symlink to a missing file")
        else:
            yield _failure(path, "unreadable", f"cannot stat {path}: {e.strerror or e}")
        return
    if not stat.S_ISREG(st.st_mode):
        if stat.S_ISDIR(st.st_mode):
            return  # a folder named like a video (dir.mp4/) is walked as a folder, not read as a file
        kind = "FIFO" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "device"
        yield _failure(path, "not_a_file", f"{path} is a {kind}, not a regular file")
        return
    real = os.path.realpath(path)
    if not _inside(real, real_root):
        yield _failure(path, "outside_input", f"{path} links to {real}, outside the input folder {real_root}")
        return
    yield _source(path, st, _local_sidecar(path, name, siblings, real_root))


def _local_sidecar(
    path: str, name: str, siblings: set[str], real_root: str
) -> tuple[str | None, str | None, str | None]:
    """(real path, version, problem) of `<stem>.txt` beside `path`; (None, None, None) when there is none."""
    txt = posixpath.splitext(name)[0] + ".txt"
    if siblings and txt not in siblings:
        return None, None, None
    sidecar = os.path.join(os.path.dirname(path), txt)
    try:
        st = os.stat(sidecar)
    except FileNotFoundError:
        return (
            (None, None, "its caption file is a broken symlink")
            if os.path.islink(sidecar)
            else (None, None, None)
        )
    except OSError as e:
        return None, None, f"its caption file {txt} cannot be read: {e.strerror or e}"
    if not stat.S_ISREG(st.st_mode):
        return None, None, f"its caption file {txt} is not a regular file"
    real = os.path.realpath(sidecar)
    if not _inside(real, real_root):
        return None, None, f"its caption file {txt} links outside the input folder"
    return real, f"{st.st_size}:{st.st_mtime_ns}", None


def _source(path: str, st: os.stat_result, sidecar: tuple[str | None, str | None, str | None]) -> SourceFile:
    real, version, problem = sidecar
    return SourceFile(
        uri=path,
        size=st.st_size,
        version=f"{st.st_size}:{st.st_mtime_ns}",
        sidecar=real,
        sidecar_version=version,
        sidecar_problem=problem,
    )


# ---------------------------------------------------------------------------------------------- fsspec URLs
def _discover_remote(source: str, exts: tuple[str, ...]) -> Iterator[Found]:
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(source)
    except (ImportError, ValueError) as e:
        raise InputError(f"cannot open {source}: {e}") from e
    try:
        if _GLOB_CHARS & set(root):
            infos = fs.glob(root, detail=True)
            base = ""
        elif fs.isdir(root):
            infos = fs.find(root, detail=True)
            base = root.rstrip("/") + "/"
        elif fs.isfile(root):
            infos = {root: fs.info(root)}
            base = posixpath.dirname(root) + "/"
        else:
            raise InputError(f"no such file, directory or glob match: {source}")
    except OSError as e:
        raise InputError(f"cannot list {source}: {e}") from e
    files = {p: i for p, i in infos.items() if i.get("type", "file") == "file"}
    for path in sorted(files):
        rel = path[len(base) :] if base and path.startswith(base) else posixpath.basename(path)
        if not path.lower().endswith(exts):
            continue
        if any(part.startswith(".") for part in rel.split("/")):
            yield Skip(fs.unstrip_protocol(path), "hidden")
            continue
        info = files[path]
        txt = posixpath.splitext(path)[0] + ".txt"
        sidecar = files.get(txt)
        yield SourceFile(
            uri=fs.unstrip_protocol(path),
            size=int(info.get("size") or 0),
            version=_remote_version(info),
            sidecar=fs.unstrip_protocol(txt) if sidecar is not None else None,
            sidecar_version=_remote_version(sidecar) if sidecar is not None else None,
        )


def _remote_version(info: dict) -> str:
    for key in ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified", "last_modified", "updated"):
        if info.get(key):
            return f"{info.get('size')}:{info[key]}"
    return str(info.get("size"))
