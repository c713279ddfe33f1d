"""Weights in the original Wan2.1 layout (the one the released LumosX checkpoint uses): load and export.

The authors' hub repo ``Alibaba-DAMO-Academy/LumosX`` ships the trained transformer as a ``.pt`` state dict of
Wan's own ``WanModel``, the UMT5-XXL encoder as ``models_t5_umt5-xxl-enc-bf16.pth``, its tokenizer as
``umt5-xxl/`` and the VAE as ``vae.pth``: Wan2.1's original key names, not diffusers'. This module maps them
onto the diffusers classes this project runs (``RelationalWanTransformer``, ``UMT5EncoderModel``,
``AutoencoderKLWan``) and back:

* transformer and VAE: original -> diffusers by diffusers' own single-file converters
  (``convert_wan_transformer_to_diffusers``, ``convert_wan_vae_to_diffusers``); the reverse direction is a
  rename table checked against those converters on every call (the export raises unless converting its
  result forward gives back exactly the keys it started from);
* UMT5 encoder: a rename table between Wan's ``T5Encoder`` (``wan/modules/t5.py``) and transformers'
  ``UMT5EncoderModel`` key names (same maths: gated tanh-GELU FFN, per-layer relative position buckets,
  unscaled attention, RMS norms).

Files are read without pickle (``torch.load(weights_only=True, mmap=True)`` or safetensors) and memory-mapped,
so a 10 GB encoder is not copied into RAM before it is moved to the device. Every mapping is verified: missing
or unexpected keys raise :class:`~models.base.ModelLoadError` naming them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from models.base import ModelLoadError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
VAE_FILES = ("vae.pth", "Wan2.1_VAE.pth")
TOKENIZER_DIRS = ("umt5-xxl", "google/umt5-xxl")
# Prefixes that training wrappers put in front of the model's own keys (DDP / FSDP / torch.compile / ldm).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.diffusion_model.", "model.")
_WRAPPER_KEYS = ("state_dict", "model", "module", "ema", "generator")


# ------------------------------------------------------------------------------------------------ reading


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file or folder, memory-mapped, never unpickled.

    ``path`` is a ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` file, or a folder holding one, or a sharded
    set with an ``*.index.json`` (the hub layout of Wan's ``diffusion_pytorch_model-0000N-of-0000M``). Common
    wrappers (``{"state_dict": ...}``, ``module.`` / ``_orig_mod.`` prefixes) are removed.
    """
    path = Path(path)
    if path.is_dir():
        files = _weight_files(path)
    elif path.is_file():
        files = [path]
    else:
        raise ModelLoadError(f"{path}: no such checkpoint file or folder")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(_read_file(file))
    return _unwrap(state, path)


def _weight_files(folder: Path) -> list[Path]:
    indexes = sorted(folder.glob("*.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text()).get("weight_map", {})
        names = sorted(set(weight_map.values()))
        if not names:
            raise ModelLoadError(f"{indexes[0]}: no weight_map")
        return [folder / name for name in names]
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if len(files) != 1:
        found = ", ".join(p.name for p in files) or "none"
        raise ModelLoadError(
            f"{folder}: expected exactly one weights file ({'/'.join(WEIGHT_SUFFIXES)}) or an *.index.json, "
            f"found {found}; pass the file itself"
        )
    return files


def _read_file(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    try:
        # weights_only: tensors and plain containers only, no code execution; mmap: no copy into RAM.
        obj = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:  # a legacy (non-zip) file cannot be mmapped; still never unpickled freely
        if "mmap" not in str(err):
            raise ModelLoadError(f"{file}: cannot read as a weights-only checkpoint: {err}") from err
        obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelLoadError(f"{file}: cannot read as a weights-only checkpoint: {err}") from err
    if not isinstance(obj, Mapping):
        raise ModelLoadError(f"{file}: expected a mapping of tensors, got {type(obj).__name__}")
    return dict(obj)


def _unwrap(state: dict[str, Any], source: Path) -> dict[str, torch.Tensor]:
    for key in _WRAPPER_KEYS:
        if len(state) <= 3 and isinstance(state.get(key), Mapping):
            state = dict(state[key])
            break
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelLoadError(f"{source}: entries that are not tensors: {_names(bad)}")
    return state


def _names(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def check_keys(got: Iterable[str], expected: Iterable[str], what: str) -> None:
    """Raise :class:`ModelLoadError` naming the missing and unexpected keys, if any."""
    got, expected = set(got), set(expected)
    missing, unexpected = expected - got, got - expected
    if missing or unexpected:
        parts = [f"{what}: checkpoint does not match the model"]
        if missing:
            parts.append(f"missing {len(missing)} keys: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {_names(unexpected)}")
        raise ModelLoadError("; ".join(parts))


def _rename(state: Mapping[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _verified_inverse(
    state: Mapping[str, torch.Tensor],
    original: dict[str, torch.Tensor],
    forward: Callable[[dict], dict],
    what: str,
) -> dict[str, torch.Tensor]:
    """``original`` if converting it forward gives back exactly ``state`` (same keys, same tensors)."""
    back = forward(dict(original))
    check_keys(back, state, f"{what} export (original -> diffusers check)")
    if any(back[k] is not state[k] for k in state):
        raise ModelLoadError(f"{what} export: the forward conversion does not return the same tensors")
    return original


# ------------------------------------------------------------------------------------------------ transformer

# diffusers -> Wan names; the inverse of diffusers' TRANSFORMER_KEYS_RENAME_DICT for T2V models.
_TRANSFORMER_TO_ORIGINAL = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.to_([qkv])\.", r".\1."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    # diffusers' norm2 is Wan's norm3 (the cross-attention norm) and vice versa
    (r"\.norm2\.", ".norm__swap."),
    (r"\.norm3\.", ".norm2."),
    (r"\.norm__swap\.", ".norm3."),
]

WAN_HEAD_DIM = 128  # every Wan2.1 model (1.3B: 1536 / 12, 14B: 5120 / 40)


def transformer_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan ``WanModel`` keys -> diffusers ``WanTransformer3DModel`` keys (diffusers' own converter)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return convert_wan_transformer_to_diffusers(dict(state))


def transformer_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers keys -> Wan ``WanModel`` keys, verified against diffusers' forward converter."""
    original = _rename(state, _TRANSFORMER_TO_ORIGINAL)
    return _verified_inverse(state, original, transformer_to_diffusers, "transformer")


def transformer_config_from_original(
    state: Mapping[str, torch.Tensor], wan_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """diffusers config of the transformer in ``state`` (Wan keys), read from tensor shapes.

    The head count is not visible in the weights (the q/k norms span all heads): it comes from Wan's
    ``config.json`` (``num_heads``) when one sits next to the weights, else from Wan's head size of 128.
    """
    from lumosx_model.transformer import RelationalWanTransformer

    wan_config = dict(wan_config or {})
    try:
        patch = state["patch_embedding.weight"]
        dim = patch.shape[0]
        num_layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        ffn_dim = state["blocks.0.ffn.0.weight"].shape[0]
        freq_dim = state["time_embedding.0.weight"].shape[1]
        text_dim = state["text_embedding.0.weight"].shape[1]
        out_channels = state["head.head.weight"].shape[0] // (
            patch.shape[2] * patch.shape[3] * patch.shape[4]
        )
    except (KeyError, ValueError, IndexError) as err:
        raise ModelLoadError(
            f"not a Wan2.1 transformer state dict (no {err}); keys: {_names(state)}"
        ) from err
    if any(k.startswith("img_emb.") for k in state):
        raise ModelLoadError("an image-to-video Wan checkpoint (img_emb.*): LumosX builds on the T2V model")
    num_heads = int(wan_config.get("num_heads", dim // WAN_HEAD_DIM))
    return {
        **RelationalWanTransformer.full_config(),
        "patch_size": tuple(int(p) for p in patch.shape[2:]),
        "num_attention_heads": num_heads,
        "attention_head_dim": dim // num_heads,
        "in_channels": int(patch.shape[1]),
        "out_channels": int(out_channels),
        "text_dim": int(text_dim),
        "freq_dim": int(freq_dim),
        "ffn_dim": int(ffn_dim),
        "num_layers": num_layers,
        "cross_attn_norm": "blocks.0.norm3.weight" in state,
        "eps": float(wan_config.get("eps", 1e-6)),
    }


def _wan_config_near(path: Path) -> dict[str, Any]:
    """Wan's own ``config.json`` next to (or inside) a weights path, if it is one (has ``num_heads``)."""
    folder = path if path.is_dir() else path.parent
    for candidate in (folder / "config.json", path.with_suffix(".json")):
        if candidate.is_file():
            data = json.loads(candidate.read_text())
            if isinstance(data, dict) and "num_heads" in data:
                return data
    return {}


def load_original_transformer(
    path: str | os.PathLike[str],
    *,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """A :class:`~lumosx_model.transformer.RelationalWanTransformer` from Wan-layout weights (file or folder)."""
    from accelerate import init_empty_weights

    from lumosx_model.transformer import RelationalWanTransformer

    path = Path(path)
    original = read_state_dict(path)
    config = transformer_config_from_original(original, _wan_config_near(path))
    state = transformer_to_diffusers(original)
    with init_empty_weights():  # parameters on the meta device, buffers (rotary tables) real
        model = RelationalWanTransformer.from_config(config)
    check_keys(state, model.state_dict(), f"transformer {path}")
    model.load_state_dict(state, strict=True, assign=True)
    return materialize(model, torch_dtype, device)


def materialize(
    model: torch.nn.Module, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Copy the memory-mapped parameters to ``device`` in ``dtype``, one tensor at a time (a GPU load never
    holds a second full copy in RAM), keeping the modules diffusers keeps in float32 (``_keep_in_fp32_modules``:
    Wan's norms, time embedder, modulation) in float32 as ``from_pretrained`` does. Always a fresh copy:
    kernels on mmapped (possibly unaligned) storage may round differently from the same weights in RAM."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        target = param.dtype
        if param.is_floating_point():
            target = torch.float32 if keep & set(name.split(".")) else dtype
        param.data = param.data.to(device=device, dtype=target, copy=True)
    return model.to(device)


def wan_transformer_config(config: Mapping[str, Any], text_len: int = 512) -> dict[str, Any]:
    """Wan's own ``config.json`` for a diffusers transformer config (what Wan's ``WanModel`` takes)."""
    heads = int(config["num_attention_heads"])
    return {
        "_class_name": "WanModel",
        "model_type": "t2v",
        "patch_size": list(config["patch_size"]),
        "text_len": text_len,
        "in_dim": int(config["in_channels"]),
        "dim": heads * int(config["attention_head_dim"]),
        "ffn_dim": int(config["ffn_dim"]),
        "freq_dim": int(config["freq_dim"]),
        "text_dim": int(config["text_dim"]),
        "out_dim": int(config["out_channels"]),
        "num_heads": heads,
        "num_layers": int(config["num_layers"]),
        "window_size": [-1, -1],
        "qk_norm": config.get("qk_norm") is not None,
        "cross_attn_norm": bool(config["cross_attn_norm"]),
        "eps": float(config["eps"]),
    }


def export_original_transformer(
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    out: str | os.PathLike[str],
    *,
    config: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a transformer in Wan's layout so that the authors' scripts load it.

    ``out`` ending in ``.safetensors`` / ``.pt`` / ``.pth`` is the weights file (``.pt``: a plain dict of
    tensors, loadable with ``weights_only=True``); otherwise ``out`` is a folder receiving
    ``diffusion_pytorch_model.safetensors`` and Wan's ``config.json``. ``dtype`` casts floating tensors.
    """
    if isinstance(model, torch.nn.Module):
        config = dict(getattr(model, "config", {}) or {}) if config is None else config
        state = model.state_dict()
    else:
        state = dict(model)
    original = transformer_to_original(state)
    original = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
        for k, v in original.items()
    }
    out = Path(out)
    if out.suffix in WEIGHT_SUFFIXES:
        weights, folder = out, out.parent
    else:
        weights, folder = out / "diffusion_pytorch_model.safetensors", out
    folder.mkdir(parents=True, exist_ok=True)
    if weights.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(original, str(weights))
    else:
        torch.save(original, str(weights))
    if config:
        (folder / "config.json" if weights.parent == out else weights.with_suffix(".json")).write_text(
            json.dumps(wan_transformer_config(config), indent=2)
        )
    return weights


# ------------------------------------------------------------------------------------------------ VAE

_VAE_RESNET = [
    (r"\.norm1\.gamma$", ".residual.0.gamma"),
    (r"\.conv1\.(weight|bias)$", r".residual.2.\1"),
    (r"\.norm2\.gamma$", ".residual.3.gamma"),
    (r"\.conv2\.(weight|bias)$", r".residual.6.\1"),
    (r"\.conv_shortcut\.", ".shortcut."),
]


def vae_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan VAE keys -> diffusers ``AutoencoderKLWan`` keys (diffusers' own converter)."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    return convert_wan_vae_to_diffusers(dict(state))


def vae_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKLWan`` keys -> Wan VAE keys, verified against diffusers' forward converter."""
    # Decoder up-blocks are one flat list in Wan: each block's resnets, then its upsampler (if any).
    up: dict[int, tuple[int, bool]] = {}
    for key in state:
        m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers)\.", key)
        if m:
            b = int(m.group(1))
            n, has_up = up.get(b, (0, False))
            up[b] = (max(n, int(m.group(3)) + 1) if m.group(3) else n, has_up or m.group(3) is None)
    starts, pos = {}, 0
    for b in sorted(up):
        starts[b] = pos
        pos += up[b][0] + int(up[b][1])

    original = {}
    for key, value in state.items():
        new = key
        m = re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", key)
        if m:
            b, r, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            new = f"decoder.upsamples.{starts[b] + r}.{rest}"
        m = re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)$", key)
        if m:
            b = int(m.group(1))
            new = f"decoder.upsamples.{starts[b] + up[b][0]}.{m.group(2)}"
        new = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.middle.0.", new)
        new = re.sub(r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1.", new)
        new = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.middle.2.", new)
        new = re.sub(r"^encoder\.down_blocks\.", "encoder.downsamples.", new)
        if re.match(r"^(encoder\.downsamples|decoder\.upsamples|(encoder|decoder)\.middle\.[02])\.", new):
            for pattern, repl in _VAE_RESNET:
                new = re.sub(pattern, repl, new)
        new = re.sub(r"^(encoder|decoder)\.conv_in\.", r"\1.conv1.", new)
        new = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.head.0.", new)
        new = re.sub(r"^(encoder|decoder)\.conv_out\.", r"\1.head.2.", new)
        new = re.sub(r"^quant_conv\.", "conv1.", new)
        new = re.sub(r"^post_quant_conv\.", "conv2.", new)
        original[new] = value
    return _verified_inverse(state, original, vae_to_diffusers, "VAE")


def load_original_vae(
    path: str | os.PathLike[str],
    *,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """``AutoencoderKLWan`` from Wan's ``vae.pth`` (Wan2.1's VAE: dims from the weights, Wan's latent stats)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan

    path = Path(path)
    state = vae_to_diffusers(read_state_dict(path))
    try:
        base_dim = state["encoder.conv_in.weight"].shape[0]
        z_dim = state["post_quant_conv.weight"].shape[0]
    except KeyError as err:
        raise ModelLoadError(f"{path}: not a Wan2.1 VAE (no {err}); keys: {_names(state)}") from err
    with init_empty_weights():
        vae = AutoencoderKLWan(base_dim=base_dim, z_dim=z_dim)
    check_keys(state, vae.state_dict(), f"VAE {path}")
    vae.load_state_dict(state, strict=True, assign=True)
    return materialize(vae, torch_dtype, device)


# ------------------------------------------------------------------------------------------------ UMT5

# transformers UMT5EncoderModel -> Wan T5Encoder (wan/modules/t5.py: blocks[i].{norm1, attn, norm2, ffn,
# pos_embedding}; FFN: fc1(x) * gelu(gate(x)), then fc2).
_UMT5_TO_ORIGINAL = [
    (r"^shared\.weight$", "token_embedding.weight"),
    (r"^encoder\.final_layer_norm\.", "norm."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.", r"blocks.\1.norm1."),
    (
        r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.",
        r"blocks.\1.pos_embedding.embedding.",
    ),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.", r"blocks.\1.attn.\2."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"blocks.\1.norm2."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.", r"blocks.\1.ffn.gate.0."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.", r"blocks.\1.ffn.fc1."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.", r"blocks.\1.ffn.fc2."),
]
_UMT5_TO_DIFFUSERS = [
    (r"^token_embedding\.weight$", "shared.weight"),
    (r"^norm\.", "encoder.final_layer_norm."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.block.\1.layer.0.layer_norm."),
    (
        r"^blocks\.(\d+)\.pos_embedding\.embedding\.",
        r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.",
    ),
    (r"^blocks\.(\d+)\.attn\.([qkvo])\.", r"encoder.block.\1.layer.0.SelfAttention.\2."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.block.\1.layer.1.layer_norm."),
    (r"^blocks\.(\d+)\.ffn\.gate\.0\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_0."),
    (r"^blocks\.(\d+)\.ffn\.fc1\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_1."),
    (r"^blocks\.(\d+)\.ffn\.fc2\.", r"encoder.block.\1.layer.1.DenseReluDense.wo."),
]


def umt5_to_transformers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan ``T5Encoder`` keys -> transformers ``UMT5EncoderModel`` keys (the embedding is tied, so both
    ``shared.weight`` and ``encoder.embed_tokens.weight`` get it)."""
    out = _rename(state, _UMT5_TO_DIFFUSERS)
    if "shared.weight" in out:
        out["encoder.embed_tokens.weight"] = out["shared.weight"]
    return out


def umt5_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``UMT5EncoderModel`` keys -> Wan ``T5Encoder`` keys (round trip checked)."""
    state = {k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}
    original = _rename(state, _UMT5_TO_ORIGINAL)
    return _verified_inverse(
        state,
        original,
        lambda sd: {k: v for k, v in umt5_to_transformers(sd).items() if k != "encoder.embed_tokens.weight"},
        "UMT5",
    )


def umt5_config_from_original(state: Mapping[str, torch.Tensor]):
    """transformers ``UMT5Config`` of a Wan ``T5Encoder`` state dict, from tensor shapes (UMT5-XXL: 4096 wide,
    24 layers, 64 heads of 64, FFN 10240, 32 buckets)."""
    from transformers import UMT5Config

    try:
        vocab, d_model = state["token_embedding.weight"].shape
        d_attn = state["blocks.0.attn.q.weight"].shape[0]
        buckets, heads = state["blocks.0.pos_embedding.embedding.weight"].shape
        d_ff = state["blocks.0.ffn.fc1.weight"].shape[0]
        layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    except (KeyError, ValueError) as err:
        raise ModelLoadError(f"not a Wan UMT5 encoder state dict (no {err}); keys: {_names(state)}") from err
    return UMT5Config(
        vocab_size=int(vocab),
        d_model=int(d_model),
        d_kv=int(d_attn) // int(heads),
        d_ff=int(d_ff),
        num_layers=layers,
        num_heads=int(heads),
        relative_attention_num_buckets=int(buckets),
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",  # Wan: tanh-approximated GELU gate
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def load_original_umt5(
    path: str | os.PathLike[str],
    *,
    torch_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
):
    """transformers ``UMT5EncoderModel`` from Wan's ``models_t5_umt5-xxl-enc-bf16.pth``."""
    from accelerate import init_empty_weights
    from transformers import UMT5EncoderModel

    path = Path(path)
    original = read_state_dict(path)
    config = umt5_config_from_original(original)
    state = umt5_to_transformers(original)
    with init_empty_weights():
        model = UMT5EncoderModel(config)
    check_keys(state, model.state_dict(), f"UMT5 encoder {path}")
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # first, so the 1 B-parameter embedding is copied to the device once
    return materialize(model, torch_dtype, device)


def export_original_umt5(model: torch.nn.Module, out: str | os.PathLike[str]) -> Path:
    """Write a transformers ``UMT5EncoderModel`` as Wan's ``T5Encoder`` state dict (``.pth``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in umt5_to_original(model.state_dict()).items()}
    torch.save(state, str(out))
    return out


def export_original_vae(vae: torch.nn.Module, out: str | os.PathLike[str]) -> Path:
    """Write a diffusers ``AutoencoderKLWan`` as Wan's VAE state dict (``.pth``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in vae_to_original(vae.state_dict()).items()}
    torch.save(state, str(out))
    return out


# ------------------------------------------------------------------------------------------------ release dir


def find_release_files(root: str | os.PathLike[str]) -> dict[str, Path]:
    """The files of a local download of the LumosX hub repo (or of a Wan2.1 original-layout repo).

    Looks in ``root`` and ``root/LumosX_models``: ``models_t5_umt5-xxl-enc-bf16.pth`` (text encoder),
    ``umt5-xxl/`` (tokenizer), ``vae.pth`` (or ``Wan2.1_VAE.pth``), and the transformer: the one remaining
    ``.pt`` / ``.pth`` / ``.safetensors`` file, or a sharded ``diffusion_pytorch_model*.safetensors`` set.

    Returns:
        ``{"text_encoder", "tokenizer", "vae", "transformer"}`` -> path; a part not found is left out.
    """
    root = Path(root)
    folders = [f for f in (root, root / "LumosX_models") if f.is_dir()]
    if not folders:
        raise ModelLoadError(
            f"{root}: no such folder; download it with "
            f"`huggingface-cli download Alibaba-DAMO-Academy/LumosX --local-dir {root}`"
        )
    found: dict[str, Path] = {}
    for folder in folders:
        if (folder / T5_FILE).is_file():
            found.setdefault("text_encoder", folder / T5_FILE)
        for name in VAE_FILES:
            if (folder / name).is_file():
                found.setdefault("vae", folder / name)
        for name in TOKENIZER_DIRS:
            if (folder / name).is_dir():
                found.setdefault("tokenizer", folder / name)
    known = {p.resolve() for p in found.values()}
    for folder in folders:
        if "transformer" in found:
            break
        if list(folder.glob("diffusion_pytorch_model*.safetensors")):
            found["transformer"] = folder
            continue
        rest = sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and p.suffix in WEIGHT_SUFFIXES and p.resolve() not in known
        )
        if len(rest) == 1:
            found["transformer"] = rest[0]
        elif len(rest) > 1:
            raise ModelLoadError(
                f"{folder}: several candidate transformer files ({', '.join(p.name for p in rest)}); "
                "set model.transformer_path to the one to use"
            )
    return found
