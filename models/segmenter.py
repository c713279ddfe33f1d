"""Box-prompted segmentation: one mask per box (attribute inside a person, object on the frame, whole person).

Backends:
- "sam": Meta's `segment-anything` package. `weights` is the path of an official checkpoint
  (`sam_vit_h_4b8939.pth`, `sam_vit_l_0b3195.pth`, `sam_vit_b_01ec64.pth`, from
  https://github.com/facebookresearch/segment-anything#model-checkpoints) or a `.safetensors` export of the
  same state dict. The file is read with `torch.load(weights_only=True)`: a checkpoint is data, never code.
- "sam-hf": transformers' `SamModel` + `SamProcessor`, hub id or local directory, default
  "facebook/sam-vit-huge".

Both run the image encoder on `batch_size` images at once and decode all boxes of an image together.

Options (`ModelSpec.options`):
- ``model_type`` ("sam" only: "vit_h" | "vit_l" | "vit_b"): architecture of the checkpoint; by default read
  from the file name (`sam_vit_b_...`), else "vit_h";
- ``multimask_output`` (False): ask for SAM's three candidate masks and keep the one with the best predicted
  IoU. With a box prompt the single-mask head is usually the right one; multimask helps for ambiguous small
  parts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from models.base import ModelLoadError, ModelSpec, Registry, model_info, resolve_device, resolve_dtype
from models.weights import DEFAULTS
from schemas.records import Box

SEGMENTERS = Registry("segmenter")

SAM_ARCHS = ("vit_h", "vit_l", "vit_b")
DEFAULT_HF_WEIGHTS = DEFAULTS["sam-hf"]


@dataclass(frozen=True)
class MaskPrediction:
    mask: np.ndarray
    """bool (H, W) in the pixel grid of the image that was segmented"""
    score: float
    """SAM's own predicted IoU of the mask: a confidence, not a measured overlap"""


def _check_inputs(images: Sequence[Image.Image], boxes: Sequence[Sequence[Box]]) -> None:
    if len(images) != len(boxes):
        raise ValueError(f"{len(images)} images but {len(boxes)} box lists")


def _best_masks(masks: torch.Tensor, scores: torch.Tensor) -> list[MaskPrediction]:
    """(N, C, H, W) bool masks and (N, C) predicted IoUs -> the best candidate of each of the N prompts."""
    best = scores.float().argmax(dim=1)
    rows = torch.arange(masks.shape[0])
    chosen, chosen_scores = masks[rows, best].cpu().numpy(), scores[rows, best].float().cpu()
    return [
        MaskPrediction(mask=m.astype(bool, copy=False), score=float(s)) for m, s in zip(chosen, chosen_scores)
    ]


class _Segmenter:
    """Shared batching: chunks of `batch_size` images, images without boxes skipped."""

    batch_size: int

    def segment(
        self, images: Sequence[Image.Image], boxes: Sequence[Sequence[Box]]
    ) -> list[list[MaskPrediction]]:
        """One mask per box, in the order of the boxes, at each image's own size."""
        _check_inputs(images, boxes)
        todo = [i for i, b in enumerate(boxes) if len(b) > 0]
        results: list[list[MaskPrediction]] = [[] for _ in images]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            # np.array copies: torch warns on (and must not write to) PIL's read-only buffers
            rgb = [np.array(images[i].convert("RGB")) for i in chunk]
            for i, preds in zip(chunk, self._segment_batch(rgb, [list(boxes[i]) for i in chunk])):
                results[i] = preds
        return results

    __call__ = segment

    def _segment_batch(self, images: list[np.ndarray], boxes: list[list[Box]]) -> list[list[MaskPrediction]]:
        raise NotImplementedError


@SEGMENTERS.register("sam")
class SamSegmenter(_Segmenter):
    """segment-anything's `Sam`, called the way its batched-prompt example does (`Sam.forward` on a list)."""

    def __init__(self, model: torch.nn.Module, *, spec: ModelSpec, device: str, dtype: torch.dtype):
        from segment_anything.utils.transforms import ResizeLongestSide

        self.model = model
        self.info = model_info(spec, spec.weights)
        self.device = device
        self.dtype = dtype
        self.batch_size = spec.batch_size
        self.multimask_output = bool(spec.options.get("multimask_output", False))
        self.transform = ResizeLongestSide(model.image_encoder.img_size)

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> SamSegmenter:
        device = resolve_device(spec.device)
        dtype = resolve_dtype(spec.dtype, device)
        unknown = set(spec.options) - {"model_type", "multimask_output"}
        if unknown:
            raise ModelLoadError(f"unknown sam options: {sorted(unknown)}")
        if spec.random_init:
            model = tiny_sam()
        else:
            model = build_sam_from_checkpoint(spec.weights, spec.options.get("model_type"))
        # Weights stay float32; half precision comes from autocast (SAM's pixel normalisation is float32).
        return cls(model.to(device).eval(), spec=spec, device=device, dtype=dtype)

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=self.dtype)

    @torch.inference_mode()
    def _segment_batch(self, images: list[np.ndarray], boxes: list[list[Box]]) -> list[list[MaskPrediction]]:
        batched_input: list[dict[str, Any]] = []
        for rgb, item_boxes in zip(images, boxes):
            x = (
                torch.as_tensor(self.transform.apply_image(rgb), device=self.device)
                .permute(2, 0, 1)
                .contiguous()
            )
            xyxy = torch.tensor([b.as_tuple() for b in item_boxes], dtype=torch.float32, device=self.device)
            batched_input.append(
                {
                    "image": x,
                    "original_size": rgb.shape[:2],
                    "boxes": self.transform.apply_boxes_torch(xyxy, rgb.shape[:2]),
                }
            )
        with self._autocast():
            outputs = self.model(batched_input, multimask_output=self.multimask_output)
        return [_best_masks(out["masks"], out["iou_predictions"]) for out in outputs]


def _arch_from_name(path: Path) -> str:
    for arch in SAM_ARCHS:
        if arch in path.name:
            return arch
    return "vit_h"


def build_sam_from_checkpoint(weights: str | None, model_type: str | None = None) -> torch.nn.Module:
    """The official architecture from `sam_model_registry`, filled from a checkpoint read as plain tensors."""
    from segment_anything import sam_model_registry

    if not weights:
        raise ModelLoadError(
            "segmenter backend 'sam' needs `weights`: the path of a segment-anything checkpoint such as "
            "sam_vit_h_4b8939.pth (https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth)"
        )
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelLoadError(
            f"SAM checkpoint {str(path)!r} does not exist; download an official checkpoint "
            "(https://github.com/facebookresearch/segment-anything#model-checkpoints) "
            "and set `weights` to its path"
        )
    arch = model_type or _arch_from_name(path)
    if arch not in SAM_ARCHS:
        raise ModelLoadError(f"unknown SAM model_type {arch!r}; expected one of {SAM_ARCHS}")
    model = sam_model_registry[arch](checkpoint=None)  # built empty: its own loader would unpickle freely
    load_sam_state_dict(model, path)
    return model


def load_sam_state_dict(model: torch.nn.Module, path: Path) -> None:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(str(path))
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a weights_only refusal (code inside the pickle), a truncated file, ...
        raise ModelLoadError(f"cannot read SAM checkpoint {str(path)!r} as plain tensors: {e}") from e
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(
            f"SAM checkpoint {str(path)!r} does not fit the chosen architecture "
            f"(set options.model_type to the checkpoint's vit_h / vit_l / vit_b): {str(e)[:500]}"
        ) from e


def tiny_sam(image_size: int = 128) -> torch.nn.Module:
    """Test build: SAM's own modules (ViT encoder with windowed + global attention, prompt encoder, two-way
    mask decoder) at toy width and depth, random weights. The input size shrinks with them, so a forward pass
    on CPU takes milliseconds instead of encoding a 1024² canvas."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    patch, dim = 16, 32
    torch.manual_seed(0)
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=image_size,
            patch_size=patch,
            embed_dim=32,
            depth=2,
            num_heads=2,
            mlp_ratio=2,
            out_chans=dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=4,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(image_size // patch, image_size // patch),
            input_image_size=(image_size, image_size),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


@SEGMENTERS.register("sam-hf")
class HfSamSegmenter(_Segmenter):
    """transformers' SAM port: same network, hub-style loading (hub id or local dir, revision, dtype)."""

    def __init__(
        self, model: torch.nn.Module, processor: Any, *, spec: ModelSpec, device: str, dtype: torch.dtype
    ):
        self.model = model
        self.processor = processor
        self.info = model_info(spec, DEFAULT_HF_WEIGHTS)
        self.device = device
        self.dtype = dtype
        self.batch_size = spec.batch_size
        self.multimask_output = bool(spec.options.get("multimask_output", False))

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> HfSamSegmenter:
        device = resolve_device(spec.device)
        dtype = resolve_dtype(spec.dtype, device)
        unknown = set(spec.options) - {"multimask_output"}
        if unknown:
            raise ModelLoadError(f"unknown sam-hf options: {sorted(unknown)}")
        if spec.random_init:
            model, processor = tiny_hf_sam()
        else:
            from transformers import SamModel, SamProcessor

            weights = spec.weights or DEFAULT_HF_WEIGHTS
            try:
                processor = SamProcessor.from_pretrained(weights, revision=spec.revision)
                model = SamModel.from_pretrained(weights, revision=spec.revision, dtype=dtype)
            except Exception as e:
                raise ModelLoadError(
                    f"cannot load transformers SAM weights {weights!r} (revision {spec.revision!r}): {e}. "
                    "Set the segmenter's `weights` to a local directory with a SamModel checkpoint "
                    f"(`huggingface-cli download {DEFAULT_HF_WEIGHTS} --local-dir DIR`) "
                    "or a reachable hub id."
                ) from e
        return cls(
            model.to(device=device, dtype=dtype).eval(), processor, spec=spec, device=device, dtype=dtype
        )

    @torch.inference_mode()
    def _segment_batch(self, images: list[np.ndarray], boxes: list[list[Box]]) -> list[list[MaskPrediction]]:
        # The processor wants as many boxes for every image: pad with copies of the first box, drop later.
        counts = [len(b) for b in boxes]
        padded = [
            [list(b.as_tuple()) for b in item] + [list(item[0].as_tuple())] * (max(counts) - len(item))
            for item in boxes
        ]
        inputs = self.processor(images=images, input_boxes=padded, return_tensors="pt")
        outputs = self.model(
            pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
            input_boxes=inputs["input_boxes"].to(self.device, self.dtype),
            multimask_output=self.multimask_output,
        )
        masks = self.processor.post_process_masks(
            outputs.pred_masks.float().cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"]
        )  # per image: (boxes, C, H, W) bool
        return [_best_masks(m[:n], s[:n]) for m, s, n in zip(masks, outputs.iou_scores.cpu(), counts)]


def tiny_hf_sam(image_size: int = 128) -> tuple[torch.nn.Module, Any]:
    """Test build of the transformers port, same toy sizes as `tiny_sam`, and a processor resizing to them."""
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    patch, dim = 16, 32
    config = SamConfig(
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_dim=64,
            output_channels=dim,
            image_size=image_size,
            patch_size=patch,
            window_size=4,
            global_attn_indexes=[1],
            num_pos_feats=dim // 2,
        ),
        prompt_encoder_config=dict(
            hidden_size=dim, image_size=image_size, patch_size=patch, mask_input_channels=4
        ),
        mask_decoder_config=dict(
            hidden_size=dim, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=32
        ),
    )
    torch.manual_seed(0)
    low_res = 4 * image_size // patch  # the mask decoder upsamples the embedding grid 4x
    processor = SamProcessor(
        image_processor=SamImageProcessor(
            size={"longest_edge": image_size},
            pad_size={"height": image_size, "width": image_size},
            mask_size={"longest_edge": low_res},
            mask_pad_size={"height": low_res, "width": low_res},
        )
    )
    return SamModel(config).eval(), processor
