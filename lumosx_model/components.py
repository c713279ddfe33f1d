"""The model components: Wan2.1's frozen encoders (UMT5 text encoder + tokenizer, Wan VAE) and the relational
transformer, loaded from Wan2.1 weights or a trained checkpoint, or built tiny for tests.

All are loaded from the diffusers layout of Wan2.1 (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``: subfolders
``tokenizer``, ``text_encoder``, ``vae``), from the original Wan2.1 layout the LumosX release uses
(``weights_format: wan``, see :mod:`lumosx_model.wan_original`), or built tiny with random weights from configs for tests (same
classes, same code path, milliseconds on a CPU).

Conventions copied from diffusers' ``WanPipeline`` so that training and inference see the same tensors:
prompts are padded to ``text_len`` tokens and the embeddings past each prompt's length are zeroed; latents are
normalised per channel with the VAE's ``latents_mean`` / ``latents_std``. Latents are taken at the posterior
mean (not sampled): deterministic, so cached latents equal fresh ones and resumed runs replay exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from transformers import PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from models.base import ModelLoadError
from models.tiny_vocab import TINY_WORDS

# UMT5's special ids, mirrored by the tiny tokenizer so both behave alike (pad 0, eos 1, unk 2).
_SPECIALS = ("<pad>", "</s>", "<unk>")

# Vocabulary of the tiny test tokenizer: enough caption words for fixtures and smoke runs. Unknown words map
# to <unk>, which is harmless for a random-weight model but makes MCAM word masks of unknown labels empty.
TINY_VOCAB: tuple[str, ...] = TINY_WORDS


def build_tiny_tokenizer(vocab: tuple[str, ...] = TINY_VOCAB) -> PreTrainedTokenizerBase:
    """A word-level fast tokenizer that appends ``</s>`` like UMT5's (offline, no hub)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = list(_SPECIALS) + [w for w in dict.fromkeys(vocab) if w not in _SPECIALS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_vae_config(z_dim: int = 16) -> dict:
    """Wan VAE with Wan's 4x temporal / 8x spatial compression, a few thousand times smaller."""
    return dict(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )


def tiny_text_encoder_config(d_model: int) -> UMT5Config:
    return UMT5Config(
        vocab_size=256,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


@dataclass(frozen=True)
class PromptTokenizer:
    """Tokenizer + prompt length: the picklable part that data-loader workers need (no model weights).

    Prompts and labels are cleaned the way Wan was trained and diffusers' WanPipeline encodes (ftfy when
    installed, HTML entities, runs of whitespace): a caption with a double space or ``&amp;`` then tokenizes as it
    did for the released model, and a label is searched in the prompt in the same cleaned form.
    """

    tokenizer: PreTrainedTokenizerBase
    text_len: int

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, both ``[B, text_len]``, padded like WanPipeline."""
        out = self.tokenizer(
            [prompt_clean(p) for p in prompts],
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return out.input_ids, out.attention_mask

    def label_ids(self, label: str | None) -> list[int] | None:
        """Token ids of a condition label as it appears inside a prompt (no EOS), for MCAM word masks."""
        if label is None:
            return None
        return list(self.tokenizer(prompt_clean(label), add_special_tokens=False).input_ids)


@dataclass
class FrozenEncoders:
    """Tokenizer, text encoder and VAE, frozen (eval mode, no grad).

    Attributes:
        source_id: identifies the weights ("<hub id or dir>@<revision>" or "tiny-<seed>"); part of cache keys.
        text_len: prompts are padded / truncated to this many tokens (Wan: 512).
    """

    tokenizer: PreTrainedTokenizerBase
    text_encoder: UMT5EncoderModel
    vae: AutoencoderKLWan
    text_len: int
    source_id: str

    def __post_init__(self) -> None:
        for module in (self.text_encoder, self.vae):
            module.requires_grad_(False).eval()
        cfg = self.vae.config
        self._mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, cfg.z_dim, 1, 1, 1)
        self._inv_std = 1.0 / torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, cfg.z_dim, 1, 1, 1)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str],
        *,
        revision: str | None = None,
        text_len: int = 512,
        text_encoder_dtype: torch.dtype = torch.bfloat16,
        vae_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> FrozenEncoders:
        """Load from a Wan2.1 diffusers repo (hub id or local dir). The VAE defaults to fp32 as in diffusers'
        Wan examples (its decoder is sensitive to bf16)."""
        from transformers import AutoTokenizer

        model = str(model)
        tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer", revision=revision)
        text_encoder = UMT5EncoderModel.from_pretrained(
            model, subfolder="text_encoder", revision=revision, dtype=text_encoder_dtype
        ).to(device)
        vae = AutoencoderKLWan.from_pretrained(
            model, subfolder="vae", revision=revision, torch_dtype=vae_dtype
        ).to(device)
        return cls(tokenizer, text_encoder, vae, text_len, f"{model}@{revision or 'main'}")

    @classmethod
    def from_original(
        cls,
        *,
        text_encoder: str | os.PathLike[str],
        tokenizer: str | os.PathLike[str],
        vae: str | os.PathLike[str],
        text_len: int = 512,
        text_encoder_dtype: torch.dtype = torch.bfloat16,
        vae_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> FrozenEncoders:
        """Load Wan2.1's original-layout files (the LumosX release): ``models_t5_umt5-xxl-enc-bf16.pth``,
        the ``umt5-xxl/`` tokenizer folder and ``vae.pth`` (see :mod:`lumosx_model.wan_original`)."""
        from transformers import AutoTokenizer

        from lumosx_model.wan_original import load_original_umt5, load_original_vae

        tok = AutoTokenizer.from_pretrained(str(tokenizer))
        encoder = load_original_umt5(text_encoder, torch_dtype=text_encoder_dtype, device=device)
        autoencoder = load_original_vae(vae, torch_dtype=vae_dtype, device=device)
        return cls(
            tok, encoder, autoencoder, text_len, f"wan:{Path(text_encoder).resolve()}|{Path(vae).resolve()}"
        )

    @classmethod
    def tiny(
        cls, *, z_dim: int = 16, text_dim: int = 32, text_len: int = 32, seed: int = 0
    ) -> FrozenEncoders:
        """Random-weight encoders of the real architectures; the same seed always builds the same weights."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            text_encoder = UMT5EncoderModel(tiny_text_encoder_config(text_dim))
            vae = AutoencoderKLWan(**tiny_vae_config(z_dim))
        return cls(build_tiny_tokenizer(), text_encoder, vae, text_len, f"tiny-{seed}-z{z_dim}-d{text_dim}")

    def to(self, device: str | torch.device) -> FrozenEncoders:
        self.text_encoder.to(device)
        self.vae.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def fingerprint(self) -> str:
        """Short stable id of the encoders and text length, used to namespace caches."""
        return hashlib.sha1(f"{self.source_id}|{self.text_len}".encode()).hexdigest()[:12]

    # ---------------------------------------------------------------- text
    @property
    def prompt_tokenizer(self) -> PromptTokenizer:
        return PromptTokenizer(self.tokenizer, self.text_len)

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, text_len, D]`` embeddings, zero past each prompt's length (as WanPipeline)."""
        device = self.text_encoder.device
        hidden = self.text_encoder(
            input_ids.to(device), attention_mask=attention_mask.to(device)
        ).last_hidden_state
        return hidden * attention_mask.to(device, hidden.dtype).unsqueeze(-1)

    # ---------------------------------------------------------------- VAE
    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, F, H, W]`` in [-1, 1] -> normalised latents ``[B, z, (F-1)/4+1, H/8, W/8]``."""
        video = video.to(self.device, self.vae.dtype)
        latents = self.vae.encode(video).latent_dist.mode().float()
        return (latents - self._mean.to(latents.device)) * self._inv_std.to(latents.device)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """Condition images ``[N, 3, H, W]`` -> one-frame latents ``[N, z, H/8, W/8]``, each encoded on its
        own (a one-frame clip; the Wan VAE treats the first frame independently of any others)."""
        if images.shape[0] == 0:
            z = self.vae.config.z_dim
            return images.new_zeros((0, z, images.shape[-2] // 8, images.shape[-1] // 8), dtype=torch.float32)
        outs = [self.encode_video(part.unsqueeze(2))[:, :, 0] for part in images.split(chunk)]
        return torch.cat(outs)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[B, z, T, h, w]`` -> pixels ``[B, 3, 4(T-1)+1, 8h, 8w]`` in [-1, 1] (fp32)."""
        latents = latents.float().to(self.device)
        latents = latents / self._inv_std.to(latents.device) + self._mean.to(latents.device)
        return self.vae.decode(latents.to(self.vae.dtype)).sample.float().clamp(-1, 1)


# ------------------------------------------------------------------------------------------------ loading
TRANSFORMER_CONFIG = "transformer_config.json"


def load_encoders(
    cfg, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16
) -> FrozenEncoders:
    """Frozen encoders for a :class:`~lumosx_model.config.ModelConfig` (tiny ones when ``cfg.tiny``)."""
    if cfg.tiny:
        from lumosx_model.transformer import RelationalWanTransformer

        text_dim = RelationalWanTransformer.tiny_config()["text_dim"]
        return FrozenEncoders.tiny(text_dim=text_dim, text_len=cfg.text_len, seed=cfg.tiny_seed).to(device)
    if cfg.weights_format == "wan":
        files = original_files(cfg)
        return FrozenEncoders.from_original(
            text_encoder=files["text_encoder"],
            tokenizer=files["tokenizer"],
            vae=files["vae"],
            text_len=cfg.text_len,
            text_encoder_dtype=dtype,
            device=device,
        )
    return FrozenEncoders.from_pretrained(
        cfg.pretrained, revision=cfg.revision, text_len=cfg.text_len, text_encoder_dtype=dtype, device=device
    )


def original_files(cfg, parts: tuple[str, ...] = ("text_encoder", "tokenizer", "vae")) -> dict[str, Path]:
    """Paths of the original-layout files for a ``weights_format: wan`` config (explicit paths first, then
    what :func:`~lumosx_model.wan_original.find_release_files` finds under ``cfg.pretrained``)."""
    from lumosx_model.wan_original import find_release_files

    explicit = {
        "text_encoder": cfg.text_encoder_path,
        "tokenizer": cfg.tokenizer_path,
        "vae": cfg.vae_path,
        "transformer": cfg.transformer_path,
    }
    files = {k: Path(v) for k, v in explicit.items() if v is not None and k in parts}
    if len(files) < len(parts):
        files = {**find_release_files(cfg.pretrained), **files}
    missing = [k for k in parts if k not in files]
    if missing:
        raise ModelLoadError(
            f"{cfg.pretrained}: no {', '.join(missing)} found in the original Wan layout; set model."
            + ", model.".join(f"{k}_path" for k in missing)
        )
    return files


def _is_diffusers_transformer_dir(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and "num_attention_heads" in json.loads(config.read_text())


def load_transformer(cfg, *, torch_dtype: torch.dtype = torch.float32):
    """The relational transformer for a :class:`~lumosx_model.config.ModelConfig`.

    Weights, by priority: ``cfg.transformer_path`` (a diffusers ``transformer/`` dir, a run dir holding one,
    a training checkpoint dir with ``model.safetensors`` + ``transformer_config.json``, or original-layout Wan
    weights: a ``.pt`` / ``.pth`` / ``.safetensors`` file or a folder of them), then the tiny random build
    (``cfg.tiny``, seeded), then ``cfg.pretrained`` (diffusers weights, or with ``weights_format: wan`` the
    transformer file of the original-layout download).
    """
    from lumosx_model.transformer import RelationalWanTransformer
    from lumosx_model.wan_original import load_original_transformer

    if cfg.transformer_path is not None:
        path = Path(cfg.transformer_path)
        if (path / "transformer" / "config.json").is_file():
            path = path / "transformer"
        if path.is_file():
            return load_original_transformer(path, torch_dtype=torch_dtype)
        if _is_diffusers_transformer_dir(path):
            return RelationalWanTransformer.from_pretrained(str(path), torch_dtype=torch_dtype)
        if (path / TRANSFORMER_CONFIG).is_file() and (path / "model.safetensors").is_file():
            from safetensors.torch import load_file

            config = json.loads((path / TRANSFORMER_CONFIG).read_text())
            model = RelationalWanTransformer.from_config(config)
            model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
            return model if torch_dtype == torch.float32 else model.to(torch_dtype)
        if path.is_dir() and any(p.name.endswith((".pt", ".pth", ".safetensors")) for p in path.iterdir()):
            return load_original_transformer(path, torch_dtype=torch_dtype)
        raise FileNotFoundError(
            f"{path}: no transformer weights (expected config.json + safetensors, a "
            f"training checkpoint with {TRANSFORMER_CONFIG} and model.safetensors, or Wan-layout weights)"
        )
    if cfg.tiny:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.tiny_seed)
            model = RelationalWanTransformer.from_config(RelationalWanTransformer.tiny_config())
        return model if torch_dtype == torch.float32 else model.to(torch_dtype)
    if cfg.weights_format == "wan":
        return load_original_transformer(
            original_files(cfg, ("transformer",))["transformer"], torch_dtype=torch_dtype
        )
    return RelationalWanTransformer.from_pretrained(
        cfg.pretrained, subfolder="transformer", revision=cfg.revision, torch_dtype=torch_dtype
    )
