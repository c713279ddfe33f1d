"""Provenance: every model records the exact weights it loaded (hub commit, file hash, package version)."""

from __future__ import annotations

import hashlib

import pytest

from models.base import ModelSpec, model_info
from models.provenance import directory_sha256, resolve_revision

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_random_test_builds_say_so():
    assert resolve_revision(ModelSpec(backend="yolo", random_init=True), "yolo11x.pt") == "random-init"


def test_packaged_weights_record_the_package_versions():
    rev = model_info(ModelSpec(backend="opencv-hog"), "opencv-hog-default-people").revision
    assert rev.startswith("pkg:opencv-python") and "==" in rev


def test_a_local_file_is_hashed(tmp_path):
    ckpt = tmp_path / "sam_vit_b.pth"
    ckpt.write_bytes(b"weights" * 1000)
    rev = resolve_revision(ModelSpec(backend="sam", weights=str(ckpt)), str(ckpt))
    assert rev == "sha256:" + hashlib.sha256(ckpt.read_bytes()).hexdigest()


def test_a_local_directory_is_hashed_by_names_and_contents(tmp_path):
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "sub" / "model.safetensors").write_bytes(b"abc")
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref")  # not weights: ignored
    first = directory_sha256(d)
    assert resolve_revision(ModelSpec(backend="grounding-dino", weights=str(d)), str(d)) == f"sha256:{first}"
    (d / ".git" / "HEAD").write_text("other")
    assert directory_sha256(d) == first
    (d / "sub" / "model.safetensors").write_bytes(b"abd")
    assert directory_sha256(d) != first


def test_hub_ids_resolve_to_the_cached_commit(tmp_path, monkeypatch):
    """A branch name becomes the commit the local Hugging Face cache holds for it (offline)."""
    pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny-model"
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "snapshots" / COMMIT / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    spec = ModelSpec(backend="grounding-dino", weights="org/tiny-model", revision="main")
    assert resolve_revision(spec, spec.weights) == f"git:{COMMIT}"
    # A local snapshot directory names its commit too; an explicit commit is taken as is.
    snap = str(repo / "snapshots" / COMMIT)
    assert resolve_revision(ModelSpec(backend="sam-hf", weights=snap), snap) == f"git:{COMMIT}"
    other = "f" * 40
    assert (
        resolve_revision(ModelSpec(backend="qwen2.5-vl", weights="org/x", revision=other), "org/x")
        == f"git:{other}"
    )
    # Not cached and no hub: said plainly, never None.
    missing = resolve_revision(ModelSpec(backend="qwen2.5-vl", weights="org/absent"), "org/absent")
    assert missing == "unresolved:org/absent@default"


def test_big_files_are_hashed_once_per_machine(tmp_path, monkeypatch):
    import json

    import models.provenance as prov

    monkeypatch.setenv("LUMOSX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(prov, "_DISK_CACHE_MIN_BYTES", 10)
    monkeypatch.setattr(prov, "_file_hashes", {})
    ckpt = tmp_path / "big.safetensors"
    ckpt.write_bytes(b"x" * 100)
    digest = prov.file_sha256(ckpt)
    assert digest == hashlib.sha256(b"x" * 100).hexdigest()
    (entry,) = json.loads((tmp_path / "cache" / "sha256.json").read_text()).items()
    assert entry[1] == digest and entry[0].startswith(str(ckpt))
    monkeypatch.setattr(prov, "_file_hashes", {})  # a new process: answered from the machine's cache
    monkeypatch.setattr(prov.hashlib, "sha256", lambda: pytest.fail("hashed again"))
    assert prov.file_sha256(ckpt) == digest
