"""Dense optical flow between frame pairs, for VBench-style dynamic degree.

Backends (registered in `OPTICAL_FLOW`): ``raft-large`` and ``raft-small``, torchvision's RAFT
(`torchvision.models.optical_flow`). ``spec.weights``:

- None: the backend's default in `models.weights.DEFAULTS`: ``C_T_V1`` for raft-large, the original RAFT
  "raft-things" checkpoint (FlyingChairs + FlyingThings, ported by torchvision) that VBench's dynamic degree
  uses; ``C_T_V2`` for raft-small. torchvision downloads them into its cache on first use (``TORCH_HOME``);
- a weights-enum member name, e.g. ``C_T_SKHT_V2`` (torchvision's default, fine-tuned on Sintel/KITTI/HD1K);
- a local ``.pth`` state dict, loaded with ``torch.load(weights_only=True)`` (no pickled code runs).

``random_init`` builds the same architecture with random weights: the real code path (padding, normalisation,
recurrent updates, batching) runs in tests, the flow it returns is noise.

Input: two stacks of RGB ``uint8`` frames (N x H x W x 3), frame ``i`` of the first to frame ``i`` of the
second; output (N, 2, H, W) float32, the (dx, dy) displacement in pixels of every pixel of the first frame.
RAFT needs sides that are multiples of 8 and a 1/8-resolution feature map that survives its 4-level correlation
pyramid: frames are padded (edge replication, centred, as RAFT's own ``InputPadder``) and the flow is cropped
back. options: ``num_flow_updates`` (recurrent refinement steps, default 20 as in VBench's dynamic degree;
torchvision's default is 12).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from models.base import ModelLoadError, ModelSpec, Registry, model_info, resolve_device, resolve_dtype
from models.weights import DEFAULTS

logger = logging.getLogger(__name__)

OPTICAL_FLOW = Registry("optical flow")

_BUILDERS = {
    "raft-large": ("raft_large", "Raft_Large_Weights"),
    "raft-small": ("raft_small", "Raft_Small_Weights"),
}
MIN_SIDE = 128
"""Frames are padded to at least this size: torchvision's RAFT refuses 1/8-resolution feature maps under 16 px
(its 4-level correlation pyramid halves them 3 times), i.e. frames under 128 px on a side."""


def pad_amounts(h: int, w: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding that makes (h, w) multiples of 8 and at least MIN_SIDE, centred."""
    th, tw = max(-(-h // 8) * 8, MIN_SIDE), max(-(-w // 8) * 8, MIN_SIDE)
    ph, pw = th - h, tw - w
    return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2


class RaftFlow:
    """torchvision RAFT on batches of frame pairs."""

    def __init__(self, model, spec: ModelSpec, device: str, dtype, default_id: str):
        self.model = model
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.batch_size = spec.batch_size
        self.num_flow_updates = int(spec.options.get("num_flow_updates", 20))
        self.info = model_info(spec, default_id)

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> RaftFlow:
        import torch
        import torchvision.models.optical_flow as tv_flow

        unknown = set(spec.options) - {"num_flow_updates"}
        if unknown:
            raise ModelLoadError(f"{spec.backend}: unknown options {sorted(unknown)}")
        builder_name, enum_name = _BUILDERS[spec.backend]
        builder, weights_enum = getattr(tv_flow, builder_name), getattr(tv_flow, enum_name)
        device = resolve_device(spec.device)
        dtype = resolve_dtype(spec.dtype, device)
        if dtype != torch.float32:
            # torchvision's RAFT builds its coordinate grids in float32 and cannot run on half-precision weights
            # (grid_sample dtype mismatch); the model is small, and flow magnitudes feed a threshold: keep float32.
            logger.info("%s runs in float32 (requested %s)", spec.backend, spec.dtype)
            dtype = torch.float32
        default_id = f"torchvision/{builder_name}.{DEFAULTS[spec.backend]}"
        if spec.random_init:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = builder(weights=None)
        elif spec.weights and (spec.weights.endswith((".pth", ".pt")) or Path(spec.weights).exists()):
            path = Path(spec.weights).expanduser()
            if not path.is_file():
                raise ModelLoadError(f"{spec.backend}: weights file {path} not found")
            model = builder(weights=None)
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                model.load_state_dict(state)
            except Exception as e:  # unpickling refusals, key mismatches: all mean "not RAFT weights"
                raise ModelLoadError(
                    f"{spec.backend}: cannot load {path} as {builder_name} weights: {e}"
                ) from e
            default_id = str(path)
        else:
            name = spec.weights or DEFAULTS[spec.backend]
            try:
                weights = weights_enum[name]
            except KeyError:
                names = ", ".join(m.name for m in weights_enum)
                raise ModelLoadError(
                    f"{spec.backend}: weights {name!r} are neither a .pth file nor one of {names}"
                ) from None
            try:
                model = builder(weights=weights, progress=False)
            except Exception as e:  # no network: URLError / OSError from the download
                raise ModelLoadError(
                    f"cannot load {builder_name} weights {name} ({type(e).__name__}: {e}); torchvision downloads "
                    f"them from {weights.url} into TORCH_HOME: copy that file here and pass its path as weights "
                    "on machines without internet access"
                ) from e
        model = model.to(device=device, dtype=dtype).eval()
        return cls(model, spec, device, dtype, default_id)

    def __call__(self, frames_a: np.ndarray, frames_b: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        frames_a, frames_b = np.asarray(frames_a), np.asarray(frames_b)
        for name, frames in (("frames_a", frames_a), ("frames_b", frames_b)):
            if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
                raise ValueError(
                    f"{name}: expected uint8 frames N x H x W x 3, got {frames.shape} {frames.dtype}"
                )
        if frames_a.shape != frames_b.shape:
            raise ValueError(f"frame stacks differ in shape: {frames_a.shape} vs {frames_b.shape}")
        n, h, w, _ = frames_a.shape
        out = np.zeros((n, 2, h, w), np.float32)
        if n == 0 or h == 0 or w == 0:
            return out
        left, right, top, bottom = pad_amounts(h, w)

        def prep(frames: np.ndarray):
            # A copy: views with negative strides (reversed stacks) are contiguous to numpy but not to torch.
            x = torch.from_numpy(frames.copy()).permute(0, 3, 1, 2).to(self.device)
            x = x.to(torch.float32) / 127.5 - 1.0  # [-1, 1], as torchvision's OpticalFlow preset
            # Replicated edges: a constant border would add an edge RAFT could match as motion.
            return F.pad(x, (left, right, top, bottom), mode="replicate").to(self.dtype)

        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            with torch.inference_mode():
                flows = self.model(
                    prep(frames_a[start:stop]),
                    prep(frames_b[start:stop]),
                    num_flow_updates=self.num_flow_updates,
                )
            flow = flows[-1].float()[:, :, top : top + h, left : left + w]  # the last refinement
            out[start:stop] = flow.cpu().numpy()
        return out


for _name in _BUILDERS:
    OPTICAL_FLOW.register(_name)(RaftFlow)
