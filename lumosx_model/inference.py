"""Official case folder -> mp4: flow-matching Euler sampling with text CFG on the relational Wan2.1 model.

Settings of the paper (SPEC §2): 50 steps, flow shift 8, text CFG 6 where both branches keep the same image
conditions (only the prompt changes), 480×832, 81 frames at 16 fps. Weights: Wan2.1 diffusers weights (hub id
or local dir, revision) plus an optional trained transformer (a run's ``transformer/`` export or a
checkpoint), or the authors' released weights in the original Wan2.1 layout (``model.weights_format: wan``; the
``lumosx_release`` preset also turns on the released CFG: Wan's negative prompt, positive MCAM masks on the
negative branch).
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from lumosx_model.components import FrozenEncoders, load_encoders, load_transformer
from lumosx_model.conditions import (
    TooManyConditionsError,
    condition_pixels,
    conditions_from_case,
    encode_conditions,
    layout_of,
)
from lumosx_model.config import InferenceConfig
from lumosx_model.masks import mcam_template, pad_templates
from schemas.official_case import OfficialCase, read_case

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class LumosXGenerator:
    """The relational transformer + frozen encoders + sampler. Build with :meth:`from_config`."""

    def __init__(
        self,
        transformer,
        encoders: FrozenEncoders,
        relational,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        self.transformer = transformer.to(device).eval()
        self.encoders = encoders
        self.relational = relational
        self.device = torch.device(device)
        self.dtype = dtype

    @classmethod
    def from_config(cls, cfg: InferenceConfig) -> LumosXGenerator:
        dtype = DTYPES[cfg.dtype]
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available (set device: cpu)")
        encoders = load_encoders(cfg.model, device=device, dtype=dtype)
        transformer = load_transformer(cfg.model, torch_dtype=dtype)
        return cls(transformer, encoders, cfg.model.relational, device=device, dtype=dtype)

    @torch.no_grad()
    def generate(
        self,
        case: OfficialCase,
        *,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        steps: int = 50,
        shift: float = 8.0,
        guidance_scale: float = 6.0,
        negative_prompt: str = "",
        negative_mcam: Literal["own", "positive"] = "own",
        seed: int = 0,
        identity_only: bool = False,
        condition_slots: int | None = None,
    ) -> torch.Tensor:
        """One video for ``case``: ``uint8 [num_frames, height, width, 3]``.

        ``condition_slots`` zero-pads the conditions to that many slots (padding is masked out, so the video is
        the same up to float rounding): every case then has the same sequence length and compiled kernels are
        reused across cases. A case with more conditions raises :class:`TooManyConditionsError`.
        ``negative_mcam="positive"`` gives the negative branch the positive prompt's MCAM templates (the
        released code's behaviour) instead of templates from its own tokens.
        """
        if (num_frames - 1) % 4 or height % 16 or width % 16:
            raise ValueError(
                f"need num_frames = 4k+1 and sizes multiple of 16, got {num_frames}, {height}x{width}"
            )
        enc, device = self.encoders, self.device
        conds = conditions_from_case(case, identity_only=identity_only)
        layout = layout_of(conds)
        num_slots = len(conds) if condition_slots is None else condition_slots
        if len(conds) > num_slots:
            raise TooManyConditionsError(
                f"case {case.case_id} has {len(conds)} condition images, more than condition_slots={num_slots}"
            )
        pixels = torch.zeros((1, num_slots, 3, height, width))
        pixels[0, : len(conds)] = condition_pixels(conds, (height, width))
        cond_latents = encode_conditions(enc, pixels, torch.tensor([len(conds)]))

        use_cfg = guidance_scale != 1.0
        prompts = [case.caption, negative_prompt] if use_cfg else [case.caption]
        input_ids, attention_mask = enc.prompt_tokenizer(prompts)
        text = enc.encode_text(input_ids, attention_mask).to(self.dtype)
        label_ids = [enc.prompt_tokenizer.label_ids(c.condition.label) for c in conds]
        # Both branches see the same images; their MCAM templates follow their own prompt's tokens, or both
        # the positive prompt's (negative_mcam="positive", as released).
        template_ids = input_ids[:1].expand_as(input_ids) if negative_mcam == "positive" else input_ids
        templates = pad_templates(
            [mcam_template(layout, ids.tolist(), label_ids) for ids in template_ids],
            num_slots,
            input_ids.shape[1],
        ).to(device)
        branches = len(prompts)
        cond_latents = cond_latents.expand(branches, *cond_latents.shape[1:]).to(self.dtype)

        z = enc.vae.config.z_dim
        shape = (1, z, (num_frames - 1) // 4 + 1, height // 8, width // 8)
        # Noise drawn on the CPU: the same seed gives the same video on any device.
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        scheduler.set_timesteps(steps, device=device)
        for t in scheduler.timesteps:
            model_in = latents.to(self.dtype).expand(branches, *shape[1:])
            pred = self.transformer(
                model_in,
                t.expand(branches),
                text,
                cond_latents=cond_latents,
                layouts=[layout] * branches,
                mcam_templates=templates,
                relational=self.relational,
            ).float()
            if use_cfg:
                cond, uncond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
        video = enc.decode(latents)[0]  # [3, F, H, W] in [-1, 1]
        return ((video + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).cpu()


def write_mp4(
    frames: torch.Tensor | np.ndarray, path: str | os.PathLike[str], *, fps: float = 16.0, crf: int = 18
) -> Path:
    """Write ``uint8 [F, H, W, 3]`` frames as H.264 mp4 (yuv420p, so H and W must be even)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {frames.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    os.replace(tmp, path)
    return path


def generate_case(
    case_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cfg: InferenceConfig,
    generator: LumosXGenerator | None = None,
) -> Path:
    """Read an official case folder, generate, write ``out`` (mp4)."""
    case = read_case(case_dir)
    generator = generator or LumosXGenerator.from_config(cfg)
    frames = generator.generate(
        case,
        height=cfg.height,
        width=cfg.width,
        num_frames=cfg.num_frames,
        steps=cfg.steps,
        shift=cfg.shift,
        guidance_scale=cfg.guidance_scale,
        negative_prompt=cfg.negative_prompt,
        negative_mcam=cfg.negative_mcam,
        seed=cfg.seed,
        identity_only=cfg.identity_only,
        condition_slots=cfg.condition_slots,
    )
    return write_mp4(frames, out, fps=cfg.fps)
