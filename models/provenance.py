"""Which weights exactly made a result: the resolved revision recorded in every sample's meta and the manifest.

A spec says what was asked for (`Qwen/Qwen2.5-VL-7B-Instruct`, revision `main`, or nothing); a dataset needs what
was loaded. `resolve_revision` answers, once per model load, with one string:

    git:<40 hex>                 a Hugging Face hub commit (from the local cache the weights were loaded from, or
                                 the hub when it is reachable; a 40-hex revision in the spec is taken as is)
    sha256:<64 hex>              a local weights file (a SAM checkpoint, YOLO .pt), or a local directory (hash of
                                 its files' names and contents, in name order)
    pkg:<dist>==<version>[,...]  weights shipped inside pip packages (OpenCV's HOG, dlib's detectors)
    random-init                  a test build with random weights (its results are flagged as not data anyway)
    unresolved:<what was asked>  none of the above could be determined (e.g. offline, weights not in the cache)

Hashing reads the weights once more after they are loaded (they are usually still in the page cache). Digests are
kept by path, size and modification time, in the process and in `~/.cache/lumosx-curate/sha256.json`
(`LUMOSX_CACHE_DIR` moves it), so a machine hashes a 20 GB checkpoint once, not once per worker and run.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import logging
import os
import re
import threading
from pathlib import Path

from models.base import ModelSpec

logger = logging.getLogger(__name__)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{40})(/|$)")
_CHUNK = 8 << 20

# Backends whose default weights ship inside pip packages: the distributions that carry them.
PACKAGED: dict[str, tuple[str, ...]] = {
    "opencv-hog": ("opencv-python-headless", "opencv-python"),
    "dlib": ("dlib-bin", "dlib", "face-recognition-models"),
    "mtcnn": ("facenet-pytorch",),
}
_HUB_FILES = ("config.json", "model_index.json", "preprocessor_config.json")

_lock = threading.Lock()
_file_hashes: dict[str, str] = {}
_DISK_CACHE_MIN_BYTES = 64 << 20  # small files are quicker to hash than to look up


def _cache_file() -> Path:
    base = os.environ.get("LUMOSX_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "lumosx-curate"
    )
    return Path(base) / "sha256.json"


def _disk_cache(key: str, digest: str | None = None) -> str | None:
    """Read (digest None) or record a digest in the machine's cache; any problem just means no cache."""
    import json
    import tempfile

    path = _cache_file()
    try:
        entries = json.loads(path.read_text()) if path.exists() else {}
        if digest is None:
            return entries.get(key)
        entries[key] = digest
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f)
        os.replace(tmp, path)
    except (OSError, ValueError):
        return None
    return digest


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, cached by (path, size, mtime) in the process and, for big files, on disk."""
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
    big = st.st_size >= _DISK_CACHE_MIN_BYTES
    with _lock:
        if key in _file_hashes:
            return _file_hashes[key]
        cached = _disk_cache(key) if big else None
    if cached is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        cached = h.hexdigest()
        if big:
            with _lock:
                _disk_cache(key, cached)
    with _lock:
        _file_hashes[key] = cached
    return cached


def directory_sha256(path: str | os.PathLike) -> str:
    """One digest over a directory's regular files: each file's relative name and content hash, in name order."""
    root = Path(path)
    h = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        if rel.startswith(".") or "/." in rel:  # .git, .cache: not weights
            continue
        h.update(f"{rel}\0{file_sha256(file)}\n".encode())
    return h.hexdigest()


def _local(path: str) -> str | None:
    p = Path(path).expanduser()
    m = _SNAPSHOT.search(str(p.resolve()) if p.exists() else str(p))
    if m:
        return f"git:{m.group(1)}"
    if p.is_file():
        return f"sha256:{file_sha256(p)}"
    if p.is_dir():
        return f"sha256:{directory_sha256(p)}"
    return None


def _hub_commit(repo: str, revision: str | None) -> str | None:
    """The commit of `repo@revision` in the local Hugging Face cache, else from the hub when it is reachable."""
    if revision and _COMMIT.match(revision):
        return revision
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in _HUB_FILES:
        found = try_to_load_from_cache(repo, name, revision=revision)
        if isinstance(found, str):
            m = _SNAPSHOT.search(found)
            if m:
                return m.group(1)
    from models.weights import hub_reachable

    if not hub_reachable():
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(repo, revision=revision, timeout=10).sha
    except Exception as e:  # no access, gated, renamed: provenance is recorded as unresolved, the run goes on
        logger.info("cannot resolve the hub commit of %s@%s: %s", repo, revision, e)
        return None


def _packages(dists: tuple[str, ...]) -> str | None:
    found = []
    for d in dists:
        try:
            found.append(f"{d}=={md.version(d)}")
        except md.PackageNotFoundError:
            continue
    return f"pkg:{','.join(found)}" if found else None


def _ultralytics_file(name: str) -> str | None:
    from models.weights import _ultralytics_has

    if Path(name).is_file():
        return name
    if _ultralytics_has(name):
        import json

        config = (
            Path(os.environ.get("YOLO_CONFIG_DIR", "~/.config/Ultralytics")).expanduser() / "settings.json"
        )
        return str(Path(json.loads(config.read_text())["weights_dir"]) / name)
    return None


def resolve_revision(spec: ModelSpec, model_id: str | None) -> str:
    """What exactly `spec` loaded (see the module docstring); never raises, never None."""
    asked = f"{model_id or spec.backend}@{spec.revision or 'default'}"
    if spec.random_init:
        return "random-init"
    try:
        if spec.weights is None and spec.backend in PACKAGED:
            return _packages(PACKAGED[spec.backend]) or f"unresolved:{asked}"
        weights = spec.weights or model_id
        if weights is None:
            return f"unresolved:{asked}"
        local = _local(weights)
        if local is not None:
            return local
        if spec.backend == "yolo":
            file = _ultralytics_file(weights)
            if file is not None:
                return f"sha256:{file_sha256(file)}"
        elif spec.backend == "insightface":
            root = Path(spec.options.get("root", "~/.insightface")).expanduser() / "models" / weights
            if root.is_dir():
                return f"sha256:{directory_sha256(root)}"
        elif "/" in weights:  # a hub id
            commit = _hub_commit(weights, spec.revision)
            if commit is not None:
                return f"git:{commit}"
    except OSError as e:
        logger.warning("cannot hash the weights of %s: %s", asked, e)
    return f"unresolved:{asked}"
