"""Training and inference configuration (pydantic, loadable from YAML).

Presets ship as YAML in ``lumosx_model/configs/``: ``tiny`` (random tiny models, CPU, for tests and smoke
runs), ``paper_stage1`` / ``paper_stage2`` (the paper's two stages on Wan2.1-T2V-1.3B), ``inference``, and
``lumosx_release`` / ``lumosx_release_finetune`` (run or fine-tune the authors' released weights, original Wan2.1
layout, with the released arithmetic).
Values the paper does not publish (learning rate, batch size, training sigma shift, ...) are marked *design*
in the field descriptions.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lumosx_model.relational import RelationalConfig

WAN_T2V_1_3B = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"

# Wan2.1's standard negative prompt (wan/configs/shared_config.py, ``sample_neg_prompt``), the released LumosX
# inference default; ours is empty unless a preset (lumosx_release) sets this one.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    pretrained: str = Field(
        WAN_T2V_1_3B,
        description="Wan2.1 diffusers repo (hub id or local directory); with weights_format 'wan', a local "
        "download in the original Wan layout, e.g. of the LumosX release (Alibaba-DAMO-Academy/LumosX).",
    )
    revision: str | None = None
    weights_format: Literal["diffusers", "wan"] = Field(
        "diffusers",
        description="'diffusers': pretrained is a diffusers Wan2.1 repo. 'wan': the original Wan2.1 layout "
        "(models_t5_umt5-xxl-enc-bf16.pth, umt5-xxl/ tokenizer, vae.pth, the transformer as .pt/.pth/"
        ".safetensors), found in pretrained or pretrained/LumosX_models unless given below.",
    )
    transformer_path: str | None = Field(
        None,
        description="A trained transformer replacing the pretrained one: a run's checkpoint or final dir (its "
        "'transformer/' subfolder or the dir itself), or an original-layout Wan/LumosX weights file or folder.",
    )
    text_encoder_path: str | None = Field(None, description="'wan' format: the UMT5 encoder .pth.")
    tokenizer_path: str | None = Field(None, description="'wan' format: the umt5-xxl tokenizer folder.")
    vae_path: str | None = Field(None, description="'wan' format: the VAE .pth.")
    tiny: bool = Field(
        False, description="Build tiny random-weight models of the same architectures (tests)."
    )
    tiny_seed: int = 0
    text_len: int = Field(512, description="Prompt length in tokens (Wan: 512).")
    relational: RelationalConfig = Field(default_factory=RelationalConfig)  # validated like a model
    gradient_checkpointing: bool = True


class AugmentConfig(_Strict):
    """Train-time condition augmentations; defaults are the released loader's (SPEC §2)."""

    enabled: bool = True
    crop_scale: tuple[float, float] = (0.67, 1.0)
    downscale_min_pixels: int = Field(112, description="Random downscale keeps the long side >= this.")
    affine_p: float = 0.9
    affine_degrees: float = 20.0
    affine_shear: float = 0.05
    brightness: float = 0.05
    brightness_p: float = 0.9
    background_brightness_p: float = 0.5
    contrast_saturation: float = 0.05
    contrast_saturation_p: float = 0.9
    hflip_p: float = 0.9
    blur_p: float = 0.9
    blur_sigma: tuple[float, float] = (0.1, 0.5)


class DataConfig(_Strict):
    shards: list[str] = Field(
        description="Shard URLs / paths; brace patterns ('shard-{000000..000099}.tar') "
        "and globs are expanded."
    )
    buckets: list[tuple[int, int]] = Field(
        default_factory=lambda: [(480, 832)],
        description="(height, width) buckets; each sample goes to the "
        "nearest aspect ratio, resized and center-cropped.",
    )
    num_frames: int = 81
    fps: float = 16.0
    temporal_crop: Literal["random", "start", "center"] = "random"
    batch_size: int = 1
    num_workers: int = 4
    shard_shuffle: int = Field(100, description="Shard shuffle buffer (0 = keep order).")
    shuffle_buffer: int = Field(64, description="Sample shuffle buffer (0 = keep order).")
    resampled: bool = Field(
        False,
        description="Draw shards with replacement (wds resampled mode) instead of "
        "deterministic epochs split by node and worker.",
    )
    min_persons: int = 0
    max_persons: int | None = Field(
        None, description="Stage filter: 1 for the paper's single-subject stage 1."
    )
    max_subjects: int = Field(3, ge=0, description="Persons beyond this are dropped at random.")
    max_attributes: int = Field(
        3, ge=0, description="Attributes per person beyond this are dropped at random."
    )
    max_objects: int | None = Field(
        None, ge=0, description="Objects beyond this are dropped at random (null: keep all)."
    )
    whole_person_prob: float = 0.3
    whole_person_as_object: bool = Field(
        False,
        description="Give a whole-person cut-out as the released loader does: a non-human (object) entry "
        "with its own word mask and no negative MCAM level, instead of a one-image subject group.",
    )
    use_objects: bool = True
    use_background: bool = True
    condition_slots: int | Literal["auto"] | None = Field(
        None,
        description="Condition slots every batch is zero-padded to. null: the batch's own largest count "
        "(shapes vary; fine on CPU). 'auto': max_conditions, the most the caps allow. An int: that many "
        "(at least max_conditions). Fixed slots keep the sequence length fixed, so compiled FlexAttention "
        "kernels (dynamic=False) are built once per bucket instead of once per condition count.",
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    cache_dir: str | None = Field(
        None, description="Cache of video latents and text embeddings (filled by `lumosx-train cache`)."
    )

    @field_validator("num_frames")
    @classmethod
    def _four_k_plus_one(cls, n: int) -> int:
        if n < 1 or (n - 1) % 4:
            raise ValueError(f"num_frames must be 4k+1 for the Wan VAE (1, 5, ..., 81), got {n}")
        return n

    @field_validator("buckets")
    @classmethod
    def _bucket_sizes(cls, buckets: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if not buckets:
            raise ValueError("at least one bucket is needed")
        for h, w in buckets:
            if h % 16 or w % 16:
                raise ValueError(
                    f"bucket {h}x{w}: height and width must be multiples of 16 (VAE 8 x patch 2)"
                )
        return buckets

    @model_validator(mode="after")
    def _cache_needs_fixed_clip(self) -> DataConfig:
        if self.cache_dir is not None and self.temporal_crop == "random":
            raise ValueError(
                "cached video latents fix the clip: use temporal_crop 'start' or 'center' with cache_dir"
            )
        if self.max_persons is not None and self.max_persons < self.min_persons:
            raise ValueError("max_persons < min_persons")
        return self

    @model_validator(mode="after")
    def _slots_hold_every_sample(self) -> DataConfig:
        slots = self.condition_slots
        if slots is None:
            return self
        bound = self.max_conditions
        if bound is None:
            raise ValueError(
                f"condition_slots={slots!r} needs a bound on the number of conditions: set max_objects "
                "(or use_objects: false)"
            )
        if slots != "auto" and slots < bound:
            raise ValueError(
                f"condition_slots={slots} is below the {bound} conditions a sample can have "
                f"({self._bound_terms()}): raise it, use 'auto', or lower the caps"
            )
        return self

    @property
    def max_conditions(self) -> int | None:
        """The most condition images one sample can have under the caps (None: objects are uncapped).

        ``[background] + min(max_objects, objects) + persons x (face + max_attributes)``, persons capped by
        ``max_subjects`` and the stage filter ``max_persons``; a whole-person cut-out is one image, so it never
        exceeds its face + attributes group.
        """
        if self.use_objects and self.max_objects is None:
            return None
        objects = self.max_objects if self.use_objects else 0
        return int(self.use_background) + objects + self._max_groups * (1 + self.max_attributes)

    @property
    def num_condition_slots(self) -> int | None:
        """``condition_slots`` resolved: the fixed slot count, or None to pad to each batch's largest count."""
        return self.max_conditions if self.condition_slots == "auto" else self.condition_slots

    @property
    def _max_groups(self) -> int:
        persons = self.max_subjects
        return persons if self.max_persons is None else min(persons, self.max_persons)

    def _bound_terms(self) -> str:
        return (
            f"{int(self.use_background)} background + {self.max_objects if self.use_objects else 0} objects"
            f" + {self._max_groups} persons x (face + {self.max_attributes} attributes)"
        )


class OptimConfig(_Strict):
    lr: float = Field(1e-5, description="design: common Wan 1.3B full fine-tune value (not published).")
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 100
    max_grad_norm: float = 1.0
    scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = Field(
        "constant_with_warmup",
        description="LR schedule by name (diffusers get_scheduler) over max_steps, with warmup_steps of "
        "linear warmup ('constant' has none).",
    )
    num_cycles: int = Field(1, description="cosine_with_restarts: number of restarts.")
    power: float = Field(1.0, description="polynomial: power of the decay.")


class EMAConfig(_Strict):
    """Exponential moving average of the transformer weights (diffusers ``EMAModel``)."""

    enabled: bool = False
    decay: float = Field(0.9999, description="Largest decay; with warmup, the effective decay grows to it.")
    min_decay: float = 0.0
    update_after_step: int = Field(0, description="Start averaging after this many optimizer steps.")
    use_ema_warmup: bool = Field(False, description="decay = 1 - (1 + step / inv_gamma) ** -power.")
    inv_gamma: float = 1.0
    power: float = 2 / 3
    export: bool = Field(True, description="Export the EMA weights (not the raw ones) as the final model.")


class ValidationConfig(_Strict):
    """Videos generated every ``every`` steps from a fixed list of official case folders, logged to the tracker
    and written to ``<output_dir>/validation/step-N/<case>.mp4`` (main process, EMA weights if enabled)."""

    cases: list[str] = Field(default_factory=list, description="Official case folders.")
    every: int = Field(0, ge=0, description="Steps between validations (0: never).")
    height: int | None = Field(None, description="null: the first data bucket's height.")
    width: int | None = Field(None, description="null: the first data bucket's width.")
    num_frames: int | None = Field(None, description="null: data.num_frames.")
    steps: int = 30
    shift: float = 8.0
    guidance_scale: float = 6.0
    negative_prompt: str = ""
    negative_mcam: Literal["own", "positive"] = "own"
    seed: int = 0


class TrainConfig(_Strict):
    output_dir: str
    seed: int = 42
    stage: str = Field("train", description="Run name in logs, e.g. 'stage1'.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    max_steps: int = 10_000
    grad_accum: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    sigma_shift: float = Field(3.0, description="design: training sigma shift, sigma = s*u/(1+(s-1)*u).")
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = Field(10, description="Steps between loss / LR / speed logs (steps/s, samples/s, ETA).")
    tracker: Literal["tensorboard", "wandb", "none"] = Field(
        "tensorboard", description="Where logs and validation videos go (wandb needs `pip install wandb`)."
    )
    ema: EMAConfig = Field(default_factory=EMAConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    export_wan: bool = Field(
        False,
        description="Also export the final transformer in the original Wan2.1 layout to "
        "<output_dir>/transformer_wan/ (loadable by the authors' scripts).",
    )
    resume_from: str | None = Field(
        "latest", description="'latest' (in output_dir, if any), a checkpoint dir, or null."
    )

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> TrainConfig:
        return cls.model_validate(read_yaml(path))

    @classmethod
    def preset(cls, name: str, **overrides) -> TrainConfig:
        return cls.model_validate(deep_update(read_yaml(preset_path(name)), overrides))

    def to_yaml(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))


class InferenceConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    height: int = 480
    width: int = 832
    num_frames: int = 81
    fps: float = 16.0
    steps: int = 50
    shift: float = 8.0
    guidance_scale: float = 6.0
    negative_prompt: str = Field(
        "", description="CFG negative prompt; the lumosx_release preset uses Wan's standard one."
    )
    negative_mcam: Literal["own", "positive"] = Field(
        "own",
        description="MCAM templates of the CFG negative branch: 'own' (from the negative prompt's tokens, so "
        "an empty prompt gets no bias) or 'positive' (the positive prompt's label masks, as the released "
        "LumosX inference does).",
    )
    seed: int = 0
    device: str = "cuda"
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    identity_only: bool = Field(False, description="Use faces only (the identity-consistent task).")
    condition_slots: int | None = Field(
        None,
        ge=1,
        description="Zero-pad every case's conditions to this many slots (a case with more is refused), so "
        "that compiled FlexAttention kernels are built once for a whole set of cases instead of once per "
        "condition count. null: each case uses exactly its own count (best for a single case).",
    )

    @model_validator(mode="after")
    def _sizes(self) -> InferenceConfig:
        if (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames must be 4k+1, got {self.num_frames}")
        if self.height % 16 or self.width % 16:
            raise ValueError(f"height and width must be multiples of 16, got {self.height}x{self.width}")
        return self

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> InferenceConfig:
        return cls.model_validate(read_yaml(path))

    @classmethod
    def preset(cls, name: str, **overrides) -> InferenceConfig:
        return cls.model_validate(deep_update(read_yaml(preset_path(name)), overrides))


def preset_path(name: str) -> Path:
    path = Path(str(resources.files("lumosx_model") / "configs" / f"{name}.yaml"))
    if not path.is_file():
        raise FileNotFoundError(f"no preset {name!r} (looked for {path})")
    return path


def read_yaml(path: str | os.PathLike[str]) -> dict:
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def deep_update(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = (
            deep_update(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out
