"""Qwen2.5-VL: the project's one wrapper of the Qwen vision-language model.

Used for video captioning (`models/captioner.py`, backend ``qwen2.5-vl``) and for entity extraction with
person boxes as visual prior (issue 3). It takes chat messages in Qwen's format, where an image or a video (a
list of frames) sits inside a message's content next to the text::

    [{"role": "user", "content": [{"type": "video", "video": [pil, pil, ...], "sample_fps": 0.5},
                                  {"type": "text", "text": "Describe the video."}]}]

and returns the generated text of every conversation. `qwen_vl_utils.process_vision_info` (Qwen's reference
preprocessing) sizes every image and frame within its pixel budget, so the processor does not resize again.

`ModelSpec.options` understood here:
  attn_implementation  "sdpa" (transformers' default), "flash_attention_2" or "eager"
  min_pixels           lower pixel budget of one image / video frame (default: qwen-vl-utils' defaults)
  max_pixels           upper pixel budget of one image / video frame; lower it to save memory on long prompts
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from itertools import islice
from typing import Any

from models.base import ModelLoadError, ModelSpec, model_info, resolve_device, resolve_dtype
from models.weights import DEFAULTS
from schemas.records import ModelInfo

logger = logging.getLogger(__name__)

DEFAULT_QWEN_VL = DEFAULTS["qwen2.5-vl"]
TEST_BUILD_ID = "random-init/qwen2.5-vl-tiny"

Conversation = list[dict[str, Any]]

# Qwen's chat format. Real checkpoints ship their own template (used as is); this one serves the offline test
# build and renders the same layout: a system turn, then <|vision_start|><|video_pad|><|vision_end|> for every
# visual item (the processor expands the pad token to one token per merged patch).
QWEN_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' or 'image' in c %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' or 'video' in c %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in c %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Pixel budgets of the test build: 28x28 to 56x56 per frame, i.e. 1 to 4 visual tokens. Keeps CPU tests fast.
_TEST_MIN_PIXELS = 28 * 28
# qwen-vl-utils resizes list-of-frames videos with twice the merge factor (56 px steps): a budget below about
# 2 x 56 x 56 x aspect rounds the short side of a wide frame down to 0. 160 x 160 keeps 16:9 frames valid.
_TEST_MAX_PIXELS = 160 * 160


# ------------------------------------------------------------------------------------ shared by chat VLMs
def batched(items: Sequence[Any], size: int):
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def generate_text(
    model, processor, inputs, *, max_new_tokens: int, do_sample: bool = False, **gen_kwargs
) -> list[str]:
    """Run `model.generate` on processor outputs and decode only the new tokens of every row.

    Prompts are left-padded, so every row's prompt ends at the same column and the new tokens start there.
    """
    import torch

    inputs = inputs.to(model.device)
    for key in [k for k in inputs if k.startswith("pixel_values")]:
        # Only pixels follow the model's dtype: timing tensors such as second_per_grid_ts must stay float32.
        inputs[key] = inputs[key].to(model.dtype)
    if not do_sample:
        # Checkpoints ship sampling defaults (temperature, top_p) in generation_config; greedy ignores them.
        gen_kwargs = {"temperature": None, "top_p": None, "top_k": None, **gen_kwargs}
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=do_sample, **gen_kwargs)
    new_tokens = out[:, inputs["input_ids"].shape[1] :]
    return processor.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def tiny_byte_tokenizer(special_tokens: Sequence[str], eos_token: str):
    """A real `Qwen2Tokenizer` (byte-level BPE) with one token per byte and no merges, built offline.

    Same pre-tokenizer, decoder and special-token handling as Qwen's 151k-token tokenizer, with a 256-token
    vocabulary plus `special_tokens`: every text round-trips, and model embedding tables stay tiny.
    """
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    tok.eos_token = eos_token
    return tok


def load_error(what: str, weights: str, revision: str | None, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"cannot load {what} from {weights!r} (revision {revision or 'default'}): {exc}. "
        "Give a local directory in `weights`, or make the Hugging Face hub reachable "
        "(HF_HUB_OFFLINE unset, network or a pre-filled HF_HOME cache)."
    )


# ------------------------------------------------------------------------------------------ the adapter
class QwenVL:
    """Qwen2.5-VL for batched, greedy-by-default generation on chat messages with images and videos."""

    def __init__(
        self,
        model,
        processor,
        info: ModelInfo,
        *,
        batch_size: int = 8,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ):
        self.model = model
        self.processor = processor
        self.info = info
        self.batch_size = batch_size
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        # Batched generation needs every prompt to end at the same column: pad on the left.
        self.processor.tokenizer.padding_side = "left"

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> QwenVL:
        unknown = set(spec.options) - {"attn_implementation", "min_pixels", "max_pixels"}
        if unknown:
            raise ModelLoadError(f"qwen2.5-vl: unknown options {sorted(unknown)}")
        if spec.trust_remote_code:
            logger.info("qwen2.5-vl is native to transformers: trust_remote_code is not needed and not used")
        device = resolve_device(spec.device)
        if spec.random_init:
            model, processor = build_test_qwen_vl()
            model.to(device=device, dtype=resolve_dtype(spec.dtype, device))
            return cls(
                model,
                processor,
                model_info(spec, TEST_BUILD_ID),
                batch_size=spec.batch_size,
                min_pixels=spec.options.get("min_pixels", _TEST_MIN_PIXELS),
                max_pixels=spec.options.get("max_pixels", _TEST_MAX_PIXELS),
            )
        weights = spec.weights or DEFAULT_QWEN_VL
        model, processor = load_qwen_vl(
            weights,
            revision=spec.revision,
            device=device,
            dtype=resolve_dtype(spec.dtype, device),
            attn_implementation=spec.options.get("attn_implementation"),
        )
        return cls(
            model,
            processor,
            model_info(spec, DEFAULT_QWEN_VL),
            batch_size=spec.batch_size,
            min_pixels=spec.options.get("min_pixels"),
            max_pixels=spec.options.get("max_pixels"),
        )

    @property
    def device(self):
        return self.model.device

    def generate(
        self,
        conversations: Sequence[Conversation],
        *,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        **gen_kwargs,
    ) -> list[str]:
        """Generated text for every conversation, in order; `batch_size` conversations per forward batch."""
        out: list[str] = []
        for chunk in batched(conversations, self.batch_size):
            inputs = self.prepare(chunk)
            out.extend(
                generate_text(
                    self.model,
                    self.processor,
                    inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    **gen_kwargs,
                )
            )
        return out

    def prepare(self, conversations: Sequence[Conversation]):
        """Tokenised prompts and pixel tensors of one batch (a `BatchFeature` on the CPU)."""
        from qwen_vl_utils import process_vision_info

        conversations = [self._with_pixel_budget(c) for c in conversations]
        texts = [
            self.processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
            for c in conversations
        ]
        images, videos, video_kwargs = process_vision_info(
            conversations, return_video_kwargs=True, return_video_metadata=True
        )
        kwargs: dict[str, Any] = dict(video_kwargs)
        if videos is not None:
            videos, metadata = zip(*videos, strict=True)
            kwargs.update(videos=list(videos), video_metadata=list(metadata))
        # process_vision_info already resized every image and frame to a multiple of the patch size within its
        # budget; a second resize by the processor would only blur.
        return self.processor(
            text=texts, images=images, padding=True, return_tensors="pt", do_resize=False, **kwargs
        )

    def _with_pixel_budget(self, conversation: Conversation) -> Conversation:
        """Copy of the conversation with this adapter's pixel budget on every visual item that sets none."""
        budget = {k: v for k, v in (("min_pixels", self.min_pixels), ("max_pixels", self.max_pixels)) if v}
        if not budget:
            return conversation
        out = []
        for message in conversation:
            content = message.get("content")
            if isinstance(content, list):
                content = [
                    {**budget, **item}
                    if isinstance(item, dict) and ("image" in item or "video" in item)
                    else item
                    for item in content
                ]
            out.append({**message, "content": content})
        return out


def load_qwen_vl(
    weights: str, *, revision: str | None, device: str, dtype, attn_implementation: str | None = None
):
    """Model and processor of a Qwen2.5-VL checkpoint (hub id or local directory), placed on `device`."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return from_pretrained_vlm(
        Qwen2_5_VLForConditionalGeneration,
        "Qwen2.5-VL",
        weights,
        revision=revision,
        device=device,
        dtype=dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=False,  # native in transformers: never run checkpoint code
    )


def from_pretrained_vlm(
    model_cls,
    family: str,
    weights: str,
    *,
    revision: str | None,
    device: str,
    dtype,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
):
    """Processor + model of a vision-language checkpoint, loaded straight onto `device`, in eval mode.

    The one loading path of the project's VLMs (Qwen2.5-VL here, NVILA in captioner.py): same revision pinning,
    same remote-code switch, same error message when the weights are missing.
    """
    from transformers import AutoProcessor

    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        processor = AutoProcessor.from_pretrained(weights, **kwargs)
        model = model_cls.from_pretrained(
            weights,
            dtype=dtype,
            device_map={"": device},  # straight to the device, no full copy in host memory first
            **({"attn_implementation": attn_implementation} if attn_implementation else {}),
            **kwargs,
        )
    except (OSError, ValueError) as exc:
        raise load_error(family, weights, revision, exc) from exc
    return model.eval(), processor


def build_test_qwen_vl(seed: int = 0):
    """Tiny random Qwen2.5-VL (2 text layers, 2 vision blocks, width 32) with a real processor, offline.

    The processor is the real `Qwen2_5_VLProcessor` with real image/video processors (patch 14, merge 2,
    temporal patch 2, CLIP normalisation) and a byte-level Qwen2 tokenizer carrying Qwen's special tokens, so
    tokenisation, visual token expansion, M-RoPE positions and generation run exactly as with the 7B model.
    """
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = tiny_byte_tokenizer(QWEN_SPECIAL_TOKENS, eos_token="<|im_end|>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    budget = {"min_pixels": _TEST_MIN_PIXELS, "max_pixels": _TEST_MAX_PIXELS}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**budget),
        video_processor=Qwen2VLVideoProcessor(**budget, cap_pixels_per_frame=True),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=4096,
            # head_dim 16 -> 8 rotary frequencies split over (t, h, w) as in the 7B model's [16, 24, 24]
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            bos_token_id=tokenizer.pad_token_id,
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=32,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    return model.eval(), processor
