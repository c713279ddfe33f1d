"""Video captioners: a few frames sampled across a video + a prompt -> one dense caption per video.

Backends (`CAPTIONERS`):

``nvila``  NVIDIA's NVILA, the paper's captioner (VILA family), in its Hugging Face format
           (``Efficient-Large-Model/NVILA-8B-hf``, ``NVILA-Lite-2B-hf``: model_type ``nvila``, SigLIP vision
           tower + 2x2-downsampling MLP projector + Qwen2 LLM). transformers has no native NVILA class: these
           checkpoints ship their modeling and processing code, so they load only with
           ``trust_remote_code: true`` in the model spec (pin ``revision`` too: remote code runs with your
           privileges and can change upstream). Any native transformers image-text-to-text checkpoint with a
           video-capable processor also loads here. Test build: a tiny random LLaVA-OneVision (native
           transformers; the closest architecture to NVILA: SigLIP vision tower + MLP projector with 2x2
           spatial pooling of video frames + Qwen2 LLM).
``qwen2.5-vl``  Qwen2.5-VL through `models/qwen_vl.py` (the project's one Qwen wrapper); its test build is a
           tiny random Qwen2.5-VL with the real processor.

Every adapter: ``__call__(videos, prompt) -> list[str]`` where each video is a list of PIL frames sampled
across it, batched by ``spec.batch_size``, greedy decoding (captions are data: same input, same caption).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from PIL import Image

from models.base import ModelLoadError, ModelSpec, Registry, model_info, resolve_device, resolve_dtype
from models.qwen_vl import (
    QwenVL,
    batched,
    from_pretrained_vlm,
    generate_text,
    load_error,
    tiny_byte_tokenizer,
)
from models.weights import DEFAULTS
from schemas.records import ModelInfo

logger = logging.getLogger(__name__)

CAPTIONERS = Registry("captioner")

Video = Sequence[Image.Image]


class Captioner(Protocol):
    info: ModelInfo

    def __call__(
        self,
        videos: Sequence[Video],
        prompt: str,
        *,
        max_new_tokens: int = 256,
        sample_fps: Sequence[float] | None = None,
    ) -> list[str]: ...


def check_videos(videos: Sequence[Video], sample_fps: Sequence[float] | None) -> None:
    """Reject malformed input with a clear message before it reaches a processor deep inside transformers."""
    for i, frames in enumerate(videos):
        if isinstance(frames, Image.Image) or len(frames) == 0:
            raise ValueError(f"video {i}: expected a non-empty list of PIL frames sampled across the video")
        bad = [type(f).__name__ for f in frames if not isinstance(f, Image.Image)]
        if bad:
            raise ValueError(f"video {i}: frames must be PIL images, got {bad[0]}")
    if sample_fps is not None and len(sample_fps) != len(videos):
        raise ValueError(f"sample_fps has {len(sample_fps)} entries for {len(videos)} videos")


# ------------------------------------------------------------------------------------------ qwen2.5-vl
@CAPTIONERS.register("qwen2.5-vl")
class QwenVLCaptioner:
    """Captions with Qwen2.5-VL; frames go in as one video so the model sees their order and timing."""

    def __init__(self, qwen: QwenVL):
        self.qwen = qwen
        self.info = qwen.info

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> QwenVLCaptioner:
        return cls(QwenVL.from_spec(spec))

    def __call__(
        self,
        videos: Sequence[Video],
        prompt: str,
        *,
        max_new_tokens: int = 256,
        sample_fps: Sequence[float] | None = None,
    ) -> list[str]:
        check_videos(videos, sample_fps)
        conversations = []
        for i, frames in enumerate(videos):
            video: dict[str, Any] = {"type": "video", "video": [f.convert("RGB") for f in frames]}
            if sample_fps is not None:
                # Rate of the sampled frames: Qwen2.5-VL aligns its temporal positions to real time.
                video["sample_fps"] = float(sample_fps[i])
            conversations.append([{"role": "user", "content": [video, {"type": "text", "text": prompt}]}])
        return self.qwen.generate(conversations, max_new_tokens=max_new_tokens)


# ------------------------------------------------------------------------------------------ nvila
DEFAULT_NVILA = DEFAULTS["nvila"]
NVILA_TEST_BUILD_ID = "random-init/llava-onevision-tiny (nvila test build)"


@CAPTIONERS.register("nvila")
class NvilaCaptioner:
    """NVILA (HF format) through transformers' generic processor + `generate` interface.

    Prompts are built with the processor's chat template from ``[{"type": "video"}, {"type": "text"}]``
    content, and the frames are passed as ``videos=``; the processor expands the video placeholder into visual
    tokens.

    `ModelSpec.options` understood here: ``attn_implementation`` ("sdpa", "flash_attention_2", "eager").
    """

    def __init__(self, model, processor, info: ModelInfo, *, batch_size: int = 8):
        self.model = model
        self.processor = processor
        self.info = info
        self.batch_size = batch_size
        self.processor.tokenizer.padding_side = "left"  # batched generation: prompts end at the same column

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> NvilaCaptioner:
        unknown = set(spec.options) - {"attn_implementation"}
        if unknown:
            raise ModelLoadError(f"nvila: unknown options {sorted(unknown)}")
        device = resolve_device(spec.device)
        dtype = resolve_dtype(spec.dtype, device)
        if spec.random_init:
            model, processor = build_test_nvila()
            model.to(device=device, dtype=dtype)
            info = model_info(spec, NVILA_TEST_BUILD_ID)
        else:
            model, processor = load_nvila(
                spec.weights or DEFAULT_NVILA,
                revision=spec.revision,
                device=device,
                dtype=dtype,
                trust_remote_code=spec.trust_remote_code,
                attn_implementation=spec.options.get("attn_implementation"),
            )
            info = model_info(spec, DEFAULT_NVILA)
        return cls(model.eval(), processor, info, batch_size=spec.batch_size)

    def __call__(
        self,
        videos: Sequence[Video],
        prompt: str,
        *,
        max_new_tokens: int = 256,
        sample_fps: Sequence[float] | None = None,
    ) -> list[str]:
        # sample_fps is accepted for interface parity; NVILA's processor has no use for frame timing.
        check_videos(videos, sample_fps)
        conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        out: list[str] = []
        for chunk in batched(list(videos), self.batch_size):
            inputs = self.processor(
                text=[text] * len(chunk),
                videos=[[f.convert("RGB") for f in frames] for frames in chunk],
                padding=True,
                return_tensors="pt",
            )
            out.extend(generate_text(self.model, self.processor, inputs, max_new_tokens=max_new_tokens))
        return out


def load_nvila(
    weights: str,
    *,
    revision: str | None,
    device: str,
    dtype,
    trust_remote_code: bool,
    attn_implementation: str | None = None,
):
    """Model and processor of an NVILA-hf checkpoint, or of any native image-text-to-text checkpoint.

    Whether remote code is needed is read from the checkpoint's config.json (a model_type that transformers
    does not know) before anything is imported or executed, so the error says what to opt into instead of
    failing half-way through a load.
    """
    from transformers import AutoModel, AutoModelForImageTextToText, PreTrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(weights, revision=revision)
    except (OSError, ValueError) as exc:
        raise load_error("NVILA", weights, revision, exc) from exc
    model_type = config_dict.get("model_type")
    auto_map = config_dict.get("auto_map") or {}
    # auto_map values are "module.Class" or, for tokenizers, [slow, fast] pairs with None for a missing one
    shipped = {c for v in auto_map.values() for c in (v if isinstance(v, list) else [v]) if c}
    shipped_code = ", ".join(sorted(shipped)) or "no auto_map either"
    needs_remote_code = model_type not in CONFIG_MAPPING
    if needs_remote_code and not trust_remote_code:
        raise ModelLoadError(
            f"{weights!r} (model_type {model_type!r}) is not a native transformers architecture: "
            f"it ships its own modeling code ({shipped_code}). "
            "Loading it runs that code. To opt in, review the code at a fixed revision and set "
            "`trust_remote_code: true` and `revision: <commit>` in caption.model."
        )
    if trust_remote_code and revision is None:
        logger.warning(
            "loading %s with trust_remote_code and no pinned revision: its code may change upstream", weights
        )
    # NVILA-hf registers its model class under AutoModel; native VLMs under AutoModelForImageTextToText.
    auto_cls = (
        AutoModel
        if needs_remote_code and "AutoModelForImageTextToText" not in auto_map
        else AutoModelForImageTextToText
    )
    return from_pretrained_vlm(
        auto_cls,
        "NVILA",
        weights,
        revision=revision,
        device=device,
        dtype=dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
    )


# Chat template of the test build: ChatML, as NVILA-hf's Qwen2 LLM uses; <video> is LLaVA-OneVision's
# placeholder.
_NVILA_TEST_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'video' %}<video>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_test_nvila(seed: int = 0, image_size: int = 56):
    """Tiny random LLaVA-OneVision standing in for NVILA (no native NVILA class exists in transformers).

    Same component families as NVILA-8B-hf: SigLIP vision tower, MLP projector, 2x2 spatial pooling of video
    frame features, Qwen2 LLM with ChatML; real LLaVA-OneVision image and video processors at `image_size`.
    """
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    specials = ("<|im_start|>", "<|im_end|>", "<image>", "<video>")
    tokenizer = tiny_byte_tokenizer(specials, eos_token="<|im_end|>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    patch = 14
    size = {"height": image_size, "width": image_size}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size=size, image_grid_pinpoints=[[image_size, image_size]]
        ),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tokenizer,
        num_image_tokens=(image_size // patch) ** 2,
        vision_feature_select_strategy="full",
        chat_template=_NVILA_TEST_TEMPLATE,
    )
    config = LlavaOnevisionConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch,
            vision_use_head=False,
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            bos_token_id=tokenizer.pad_token_id,
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=[[image_size, image_size]],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    return model.eval(), processor
