"""Packaging installs what the code imports, and only that: checked on the metadata pip reads (built from
pyproject.toml by setuptools) against every import in the shipped packages."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("flows", "tasks", "models", "schemas", "lumosx_model")
# Installed by scripts/setup.sh with --no-deps (its own metadata pins an old torch): used for its MTCNN weights
# by the optional `mtcnn` face backend only, which says how to install it when it is missing.
NOT_DECLARED = {"facenet_pytorch"}
# import name -> distribution, where they differ and the distribution is not installed here to ask.
KNOWN = {"cv2": "opencv-python-headless", "skimage": "scikit-image", "yaml": "pyyaml", "PIL": "pillow",
         "dlib": "dlib-bin", "segment_anything": "segment-anything", "qwen_vl_utils": "qwen-vl-utils",
         "s3fs": "s3fs", "gcsfs": "gcsfs", "wandb": "wandb"}  # fmt: skip
# Dependencies of declared distributions that the code also imports by name: declared through their parent.
TRANSITIVE = {"huggingface_hub": "transformers", "tokenizers": "transformers", "packaging": "transformers"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@cache
def metadata() -> tuple[list[Requirement], dict[str, list[Requirement]], str]:
    """(base requirements, extra -> requirements, Requires-Python) from freshly built wheel metadata."""
    import tempfile

    out = Path(tempfile.mkdtemp())
    code = (
        "import sys; from setuptools import build_meta; "
        "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code, str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    dist = md.PathDistribution(out / proc.stdout.strip().splitlines()[-1])
    base: list[Requirement] = []
    extras: dict[str, list[Requirement]] = {e: [] for e in dist.metadata.get_all("Provides-Extra") or []}
    for line in dist.requires or []:
        req = Requirement(line)
        extra = re.search(r'extra == "([^"]+)"', str(req.marker)) if req.marker else None
        (extras[extra.group(1)] if extra else base).append(req)
    return base, extras, dist.metadata["Requires-Python"]


def _names(reqs: list[Requirement]) -> set[str]:
    return {_norm(r.name) for r in reqs}


def _req(reqs: list[Requirement], name: str) -> Requirement:
    return next(r for r in reqs if _norm(r.name) == _norm(name))


def _imports() -> dict[str, set[str]]:
    """Top-level module -> files importing it (every import statement, also inside functions)."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for n in names:
                    found.setdefault(n.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


@cache
def _installed() -> dict[str, list[str]]:
    return md.packages_distributions()


def _distribution(module: str) -> str | None:
    if module in KNOWN:
        return KNOWN[module]
    dists = _installed().get(module)
    return _norm(dists[0]) if dists else None


def test_every_imported_package_is_declared():
    base, extras, _ = metadata()
    declared = _names(base) | {n for reqs in extras.values() for n in _names(reqs)}
    first_party = set(PACKAGES)
    missing = {}
    for module, files in sorted(_imports().items()):
        if module in sys.stdlib_module_names or module in first_party or module in NOT_DECLARED:
            continue
        if module in TRANSITIVE:
            assert _norm(TRANSITIVE[module]) in declared, module
            continue
        dist = _distribution(module)
        if dist is None or _norm(dist) not in declared:
            missing[module] = (dist, sorted(files)[:3])
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_extras_hold_what_their_profiles_and_the_trainer_use():
    base, extras, requires_python = metadata()
    assert set(extras) >= {"offline", "paper", "train", "cloud", "dev"}
    # The paper's curation models.
    assert _names(extras["paper"]) >= {"ultralytics", "insightface", "segment-anything", "qwen-vl-utils",
                                       "onnxruntime-gpu", "transformers", "diffusers"}  # fmt: skip
    assert _names(extras["train"]) >= {"diffusers", "transformers", "accelerate"}
    assert _names(extras["cloud"]) >= {"s3fs", "gcsfs"}
    # The offline profile's packaged weights, and the demo's photos.
    assert _names(extras["offline"]) >= {"dlib-bin", "face-recognition-models", "insightface"}
    # Heavy or licence-bearing packages stay out of the base install.
    assert not _names(base) & {"ultralytics", "insightface", "segment-anything", "diffusers", "onnxruntime-gpu",
                               "pytest", "s3fs", "gcsfs"}  # fmt: skip
    # The demo needs scikit-image (the astronaut) and the trainer imports braceexpand: both in the base install.
    assert {"scikit-image", "braceexpand"} <= _names(base)
    assert "scikit-image" not in _names(extras["dev"])
    # Floors the code really needs; upper bounds where it subclasses another project's internals.
    assert SpecifierSet(requires_python).contains("3.11") and not SpecifierSet(requires_python).contains(
        "3.10"
    )
    torch = _req(base, "torch").specifier
    assert not torch.contains(Version("2.4.1")) and torch.contains(Version("2.5.0"))
    for extra in ("train", "paper"):
        diffusers = _req(extras[extra], "diffusers").specifier
        assert any(s.operator in ("<", "<=", "~=", "==") for s in diffusers), (extra, diffusers)
    # opencv-python, pulled in by insightface and ultralytics, must stay 4.x (OpenCV 5 has no HOG detector).
    for extra in ("offline", "paper"):
        assert not _req(extras[extra], "opencv-python").specifier.contains(Version("5.0.0"))


def test_dev_extra_installs_what_the_tests_import():
    _, extras, _ = metadata()
    dev = extras["dev"]
    pulled = set()
    for r in dev:
        pulled.add(_norm(r.name))
        for e in r.extras:  # the self-reference lumosx-curate[offline,train]
            pulled |= _names(extras[e])
    assert {"pytest", "pytest-timeout", "hypothesis", "websockets", "ultralytics", "segment-anything",
            "diffusers", "transformers", "dlib-bin"} <= pulled  # fmt: skip


@pytest.mark.parametrize("cmd", [["flows.cli"], ["lumosx_model.cli"]])
def test_version_flags(cmd):
    proc = subprocess.run([sys.executable, "-m", *cmd, "--version"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert re.match(r"^lumosx-(curate|train) \S+", proc.stdout)


def test_train_help_answers_in_under_a_second():
    """`lumosx-train --help` imports no torch: the heavy modules load when a command runs."""
    code = "import sys, lumosx_model.cli as c; c.build_parser(); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]
    best = float("inf")
    for _ in range(2):  # best of two: a shared CI core may be busy for a moment
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "lumosx_model.cli", "--help"], cwd=REPO, capture_output=True
        )
        best = min(best, time.perf_counter() - t0)
        assert proc.returncode == 0
    assert best < 1.0, f"lumosx-train --help took {best:.2f} s"


def test_a_backend_without_its_library_names_the_extra(monkeypatch):
    """The preflight says which extra installs a paper backend's library (random test builds need it too)."""
    import importlib.util

    from models.base import ModelSpec
    from models.weights import missing

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "ultralytics" else real(n, *a)
    )
    why = missing(ModelSpec(backend="yolo", random_init=True))
    assert why == "yolo needs the package ultralytics (pip install 'lumosx-curate[paper]')"
    assert missing(ModelSpec(backend="opencv-hog")) is None
