"""Clean background plates: repaint the people and objects out of a keyframe (SPEC §1, step 3c).

Backend "flux-fill": diffusers' `FluxFillPipeline`, default weights "black-forest-labs/FLUX.1-Fill-dev" (gated
on the hub: accept its licence, then download it or log in). bfloat16 on CUDA is the intended setting; on CPU
the dtype falls back to float32.

Options (`ModelSpec.options`):
- ``num_inference_steps`` (50) and ``guidance_scale`` (30.0): FLUX Fill's recommended values (it is a
  guidance-distilled model: the guidance value is an input of the transformer, not classifier-free guidance);
- ``max_sequence_length`` (512): T5 prompt length;
- ``max_side`` (1024): frames are inpainted at most this large on their longer side (FLUX is trained at
  ~1 MP), in multiples of the pipeline's 16-pixel latent patch, then resized back to the frame size;
- ``cpu_offload`` (False): `enable_model_cpu_offload` for GPUs with less than ~40 GB.

`clean_plate` / `clean_plates` are the calls the background stage makes; each takes a seed, so a plate that
fails its check (a person detected on it) can be retried with another seed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from models.base import ModelLoadError, ModelSpec, Registry, model_info, resolve_device, resolve_dtype
from models.tiny_vocab import tiny_clip_tokenizer, tiny_t5_tokenizer
from models.weights import DEFAULTS

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = DEFAULTS["flux-fill"]

INPAINTERS = Registry("inpainter")

_OPTIONS = {"num_inference_steps", "guidance_scale", "max_sequence_length", "max_side", "cpu_offload"}


def plate_prompt(background_phrase: str | None) -> str:
    """The fill prompt: the caption's background words, and an explicit ask for nobody in it."""
    phrase = " ".join((background_phrase or "").split()).strip(" ,.")
    return f"{phrase}, empty scene, no people" if phrase else "empty scene, no people"


def working_size(width: int, height: int, max_side: int, multiple: int) -> tuple[int, int]:
    """Largest size with the frame's aspect ratio, longer side <= max_side, both sides multiples of
    `multiple`."""
    scale = min(1.0, max_side / max(width, height))
    w = max(multiple, int(width * scale) // multiple * multiple)
    h = max(multiple, int(height * scale) // multiple * multiple)
    return w, h


def working_mask(mask: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """The mask at the working size, grown rather than thinned: a working pixel is repainted if any frame
    pixel under it is masked. A nearest-neighbour resize drops thin parts (an arm, a strap); the pipeline
    would then rebuild them from the original and `composite` would paste them back into the hole as a
    ghost."""
    area = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize(size, Image.Resampling.BOX)
    return Image.fromarray(np.where(np.asarray(area) > 0, np.uint8(255), np.uint8(0)))


def composite(original: Image.Image, filled: Image.Image, mask: np.ndarray) -> Image.Image:
    """Inpainted pixels inside the mask, the original frame's pixels everywhere else.

    The pipeline returns a whole new image: every pixel went through the VAE and, usually, a resize to the
    working size and back. Outside the hole that only adds blur and colour drift to pixels that were already
    right, and the plate is paired with the video it came from, so its unmasked background must stay the
    video's own pixels. The mask is the dilated foreground, so the seam lies on repainted surroundings, not on
    the person's outline.
    """
    orig = np.asarray(original.convert("RGB"))
    new = np.asarray(filled.convert("RGB").resize(original.size, Image.Resampling.LANCZOS))
    return Image.fromarray(np.where(np.asarray(mask, dtype=bool)[..., None], new, orig), mode="RGB")


@INPAINTERS.register("flux-fill")
class FluxFillInpainter:
    """Batched FLUX Fill: frames + boolean masks (True = repaint) + prompts + seeds -> frame-size plates."""

    def __init__(self, pipe: Any, *, spec: ModelSpec, device: str, dtype: torch.dtype):
        self.pipe = pipe
        self.info = model_info(spec, DEFAULT_WEIGHTS)
        self.device = device
        self.dtype = dtype
        self.batch_size = spec.batch_size
        opts = spec.options
        self.num_inference_steps = int(opts.get("num_inference_steps", 50))
        self.guidance_scale = float(opts.get("guidance_scale", 30.0))
        self.max_sequence_length = int(opts.get("max_sequence_length", 512))
        self.max_side = int(opts.get("max_side", 1024))
        # Height and width must be multiples of the VAE factor times Flux's 2x2 latent packing.
        self.multiple = pipe.vae_scale_factor * 2

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> FluxFillInpainter:
        unknown = set(spec.options) - _OPTIONS
        if unknown:  # checked before a multi-GB load, not after
            raise ModelLoadError(f"unknown flux-fill options: {sorted(unknown)}")
        device = resolve_device(spec.device)
        dtype = resolve_dtype(spec.dtype, device)
        if spec.random_init:
            pipe = tiny_flux_fill_pipeline()
        else:
            from diffusers import FluxFillPipeline

            weights = spec.weights or DEFAULT_WEIGHTS
            try:
                pipe = FluxFillPipeline.from_pretrained(weights, revision=spec.revision, dtype=dtype)
            except Exception as e:
                raise ModelLoadError(
                    f"cannot load FLUX Fill weights {weights!r} (revision {spec.revision!r}): {e}. "
                    f"The default {DEFAULT_WEIGHTS} is gated: accept its licence on the hub, then "
                    f"`huggingface-cli download {DEFAULT_WEIGHTS} --local-dir DIR` "
                    "and set the inpainter's `weights` to DIR (or log in with a token on a machine that "
                    "reaches the hub)."
                ) from e
        if spec.random_init and dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)  # from_pretrained already loaded in `dtype`
        if spec.options.get("cpu_offload") and device.startswith("cuda"):
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, spec=spec, device=device, dtype=dtype)

    def inpaint(
        self,
        images: Sequence[Image.Image],
        masks: Sequence[np.ndarray],
        prompts: Sequence[str],
        seeds: Sequence[int],
    ) -> list[Image.Image]:
        """Repaint each image where its mask is True; returns images of each input's own size, composited.

        Frames of the same working size share a pipeline call (up to `batch_size`); every frame gets its own
        seeded generator, so a frame's plate does not depend on which other frames were batched with it.
        """
        n = len(images)
        if not (len(masks) == len(prompts) == len(seeds) == n):
            raise ValueError(f"inpaint needs as many masks, prompts and seeds as images ({n})")
        bool_masks = []
        for image, mask in zip(images, masks):
            mask = np.asarray(mask).astype(bool, copy=False)
            if mask.shape != (image.height, image.width):
                raise ValueError(
                    f"mask shape {mask.shape} does not match image size {(image.height, image.width)}"
                )
            bool_masks.append(mask)

        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(working_size(*image.size, self.max_side, self.multiple), []).append(i)

        results: list[Image.Image | None] = [None] * n
        for (w, h), idx in groups.items():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                todo = [i for i in chunk if bool_masks[i].any()]
                for i in chunk:  # nothing to remove: the frame is its own plate
                    if i not in todo:
                        results[i] = images[i].convert("RGB")
                if not todo:
                    continue
                filled = self.pipe(
                    prompt=[prompts[i] for i in todo],
                    image=[images[i].convert("RGB").resize((w, h), Image.Resampling.LANCZOS) for i in todo],
                    mask_image=[working_mask(bool_masks[i], (w, h)) for i in todo],
                    height=h,
                    width=w,
                    num_inference_steps=self.num_inference_steps,
                    guidance_scale=self.guidance_scale,
                    max_sequence_length=self.max_sequence_length,
                    generator=[torch.Generator(device="cpu").manual_seed(int(seeds[i])) for i in todo],
                ).images
                for i, plate in zip(todo, filled):
                    results[i] = composite(images[i], plate, bool_masks[i])
        return results  # type: ignore[return-value]

    __call__ = inpaint


def clean_plates(
    inpainter: FluxFillInpainter,
    frames: Sequence[Image.Image],
    foreground_masks: Sequence[np.ndarray],
    background_phrases: Sequence[str | None],
    seeds: Sequence[int] | int = 0,
) -> list[Image.Image]:
    """Background plates for several keyframes: foreground (dilated person + object masks) repainted away."""
    if isinstance(seeds, int):
        seeds = [seeds] * len(frames)
    prompts = [plate_prompt(p) for p in background_phrases]
    return inpainter.inpaint(frames, foreground_masks, prompts, seeds)


def clean_plate(
    inpainter: FluxFillInpainter,
    frame: Image.Image,
    foreground_mask: np.ndarray,
    background_phrase: str | None,
    seed: int = 0,
) -> Image.Image:
    """One plate, frame-sized. Retry a rejected plate with another seed: `clean_plate(..., seed=attempt)`."""
    return clean_plates(inpainter, [frame], [foreground_mask], [background_phrase], [seed])[0]


# Test build ------------------------------------------------------------------------------------------------


def tiny_flux_fill_pipeline():
    """Test build: a real FluxFillPipeline over toy-sized components with random weights.

    Same structure as FLUX.1-Fill-dev: a double- and a single-stream Flux block with RoPE and guidance
    embedding, a KL VAE without quant convs and with shift/scale factors, CLIP (pooled) + T5 (sequence) text
    encoders. The transformer's input width follows Fill's layout: packed noisy latents + packed masked-image
    latents + the mask folded from pixel patches (vae_factor² channels per latent pixel, packed 2x2).
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxFillPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
        )
    )
    block_out_channels, latent_channels = (8, 16), 4
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    vae_factor = 2 ** (len(block_out_channels) - 1)
    packed = latent_channels * 4
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=packed + packed + vae_factor**2 * 4,
        out_channels=packed,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,  # = T5 d_model
        pooled_projection_dim=16,  # = CLIP hidden size
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),  # sums to attention_head_dim
    )
    for module in (text_encoder, text_encoder_2, vae, transformer):
        module.eval()  # constructors leave modules in train mode (T5 dropout); from_pretrained would not
    return FluxFillPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
