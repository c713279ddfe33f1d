"""What every model adapter shares: how a model is named, placed and built, and the per-process cache.

An adapter is one small class per model family (diffusers-style): an explicit constructor from a `ModelSpec`
(hub id or local directory, revision, device, dtype, batch size), a `__call__` on a batch, and nothing hidden.
`spec.random_init=True` builds the same architecture with tiny random weights from a config: the real code path
runs in tests and on machines without a model hub, and every result it produces is flagged as not data.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from schemas.records import ModelInfo

logger = logging.getLogger(__name__)

DType = Literal["float32", "float16", "bfloat16"]


class ModelSpec(BaseModel):
    """Which model a stage uses and where it runs. Part of the stage's configuration fingerprint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: str = Field(
        description="adapter name inside the model family, e.g. 'yolo', 'opencv-hog', 'qwen2.5-vl'"
    )
    weights: str | None = Field(
        None, description="hub id, local directory or weights file; None = backend default"
    )
    revision: str | None = Field(
        None, description="hub revision (branch, tag or commit) for reproducible runs"
    )
    device: str = Field(
        "auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ..."
    )
    dtype: DType = "float32"
    batch_size: int = Field(8, ge=1)
    trust_remote_code: bool = Field(
        False, description="run code shipped with the checkpoint; off unless you opt in"
    )
    random_init: bool = Field(
        False, description="test build: same architecture, tiny random weights, no download"
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="backend-specific knobs (documented per adapter)"
    )


class ModelAdapter(Protocol):
    info: ModelInfo

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> ModelAdapter: ...


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: DType, device: str):
    """Half precision on CPU is slow and partly unsupported: fall back to float32 there, and say so."""
    import torch

    if device.startswith("cpu") and dtype != "float32":
        logger.info("dtype %s requested on CPU; using float32", dtype)
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


class ModelLoadError(RuntimeError):
    """The model could not be built: missing weights, no hub access, unknown backend. Not retried."""


A = TypeVar("A")


class Registry:
    """Backend name -> adapter class for one model family, with a per-process cache of built adapters.

    Models are loaded once per worker process and reused for every batch (the most common way curation pipelines
    waste GPUs is loading a model per video). The cache key is the whole spec, so two stages asking for the same
    model share one instance.
    """

    def __init__(self, family: str):
        self.family = family
        self._backends: dict[str, Callable[[ModelSpec], Any]] = {}
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()

    def register(self, name: str) -> Callable[[type[A]], type[A]]:
        def deco(cls: type[A]) -> type[A]:
            self._backends[name] = cls.from_spec  # type: ignore[attr-defined]
            return cls

        return deco

    @property
    def backends(self) -> list[str]:
        return sorted(self._backends)

    def build(self, spec: ModelSpec) -> Any:
        """Build an adapter without caching (tests, benchmarks)."""
        try:
            factory = self._backends[spec.backend]
        except KeyError:
            raise ModelLoadError(
                f"unknown {self.family} backend {spec.backend!r}; available: {', '.join(self.backends)}"
            ) from None
        adapter = factory(spec)
        if adapter.info.random_weights:
            logger.warning(
                "%s %s runs with RANDOM WEIGHTS (test build): its outputs are not data",
                self.family,
                spec.backend,
            )
        return adapter

    def get(self, spec: ModelSpec) -> Any:
        """The process-wide adapter for this spec, built on first use."""
        key = spec.model_dump_json()  # options is a dict, so the spec itself is not hashable
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self.build(spec)
            return self._cache[key]

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()


def model_info(spec: ModelSpec, default_id: str | None = None) -> ModelInfo:
    """What a built adapter records in every result: call it once the weights are loaded, so that `revision` is
    the exact commit or file hash that was loaded (models/provenance.py), not the branch that was asked for."""
    from models.provenance import resolve_revision

    model_id = spec.weights or default_id
    return ModelInfo(
        backend=spec.backend,
        model_id=model_id,
        revision=resolve_revision(spec, model_id),
        random_weights=spec.random_init,
    )


def hf_load_error(family: str, weights: str, revision: str | None, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"cannot load {family} weights {weights!r} (revision {revision or 'default'}): {exc}. Set `weights` to a "
        f"local directory holding the checkpoint (e.g. `hf download {weights} --local-dir DIR`) or make the "
        "Hugging Face hub reachable (HF_HUB_OFFLINE unset, network, or a pre-filled HF_HOME cache)."
    )


def load_hf_model(
    spec: ModelSpec,
    *,
    family: str,
    default_weights: str,
    model_class: str,
    processor_class: str,
    test_build: Callable[[], tuple[Any, Any]],
    options: frozenset[str] = frozenset(),
) -> tuple[Any, Any, str, Any]:
    """``(model, processor, device, dtype)`` of a transformers model with its processor, in eval mode on its
    device: the real checkpoint (hub id or local directory, at ``spec.revision``) or, with ``spec.random_init``,
    ``test_build()``'s tiny random model of the same architecture. Unknown ``spec.options`` are refused, so a typo
    in a profile fails at load time instead of being ignored."""
    unknown = set(spec.options) - options
    if unknown:
        raise ModelLoadError(f"{spec.backend}: unknown options {sorted(unknown)}")
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    if spec.random_init:
        model, processor = test_build()
    else:
        import transformers

        weights = spec.weights or default_weights
        try:
            processor = getattr(transformers, processor_class).from_pretrained(
                weights, revision=spec.revision
            )
            model = getattr(transformers, model_class).from_pretrained(
                weights, revision=spec.revision, dtype=dtype
            )
        except (OSError, ValueError) as e:
            raise hf_load_error(family, weights, spec.revision, e) from e
    return model.to(device=device, dtype=dtype).eval(), processor, device, dtype
