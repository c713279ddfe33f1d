"""Self-supervised image features for image-to-image similarity (DINO-I: a crop against a reference image).

Backend ``dinov2`` (registered in `IMAGE_FEATURES`): transformers' `Dinov2Model` with its `AutoImageProcessor`
(resize the short side to 256, centre-crop 224, ImageNet normalisation), default ``facebook/dinov2-base``.
The feature is the CLS token after the final layer norm (`pooler_output`), L2-normalised: cosine = dot product.
``random_init`` builds a tiny Dinov2 (2 layers, width 32) with the same image processor at a small size.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image

from models.base import (
    ModelSpec,
    Registry,
    load_hf_model,
    model_info,
)
from models.weights import DEFAULTS

logger = logging.getLogger(__name__)

IMAGE_FEATURES = Registry("image features")

ImageLike = np.ndarray | Image.Image


def to_pil(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a PIL image or an RGB uint8 H x W x 3 array (anything else is a caller bug)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        desc = f"{type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}"
        raise ValueError(f"expected an RGB uint8 array (H, W, 3) or a PIL image, got {desc}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"empty image {image.shape}")
    return Image.fromarray(image)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@IMAGE_FEATURES.register("dinov2")
class Dinov2Features:
    """DINOv2 CLS features, `batch_size` images per forward pass."""

    def __init__(self, model, processor, spec: ModelSpec, device: str, dtype):
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.batch_size = spec.batch_size
        self.dim = int(model.config.hidden_size)
        self.info = model_info(spec, DEFAULTS["dinov2"])

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> Dinov2Features:
        model, processor, device, dtype = load_hf_model(
            spec,
            family="DINOv2",
            default_weights=DEFAULTS["dinov2"],
            model_class="Dinov2Model",
            processor_class="AutoImageProcessor",
            test_build=build_test_dinov2,
        )
        return cls(model, processor, spec, device, dtype)

    def embed_images(self, images: Sequence[ImageLike]) -> np.ndarray:
        """(N, D) float32, L2-normalised CLS features."""
        import torch

        pils = [to_pil(im) for im in images]
        out = np.zeros((len(pils), self.dim), np.float32)
        for start in range(0, len(pils), self.batch_size):
            inputs = self.processor(images=pils[start : start + self.batch_size], return_tensors="pt")
            pixels = inputs["pixel_values"].to(self.device, self.dtype)
            with torch.inference_mode():
                cls_token = self.model(pixel_values=pixels).pooler_output
            out[start : start + len(cls_token)] = l2_normalise(cls_token.float().cpu().numpy())
        return out

    __call__ = embed_images


def build_test_dinov2(seed: int = 0):
    """Tiny random Dinov2 (2 layers, width 32, patch 14) and the real DINOv2 image processor at 28 x 28."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    # facebook/dinov2-*'s preprocessor_config.json, scaled down: bicubic short side 32, centre crop 28.
    processor = BitImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 28, "width": 28},
        resample=3,
        do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_convert_rgb=True,
    )
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=28,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(config)
    return model.eval(), processor
