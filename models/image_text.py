"""Image-text embedders: images and phrases in one space, compared by cosine similarity.

One registry for the curation's visual binding check (does this crop look like "black jacket" more than like the
phrases bound to the other persons?) and for the evaluation's CLIP-T / CLIP-I scores.

    emb = IMAGE_TEXT.get(ModelSpec(backend="clip"))
    sims = emb.embed_images(crops) @ emb.embed_texts(phrases).T     # cosine similarities

Both `embed_*` calls return float32 rows of unit length; a text with no signal (blank for the neural backends,
no colour word for "colour") is a zero row, so its similarity to everything is 0.

Images are PIL images or HxWx3 / HxWx4 uint8 arrays. A fourth (alpha) channel is a mask: "colour" counts only
the pixels with alpha > 0; the neural backends see the masked-out pixels as neutral grey (so the background
around a garment does not vote).

Backends:
- "clip": transformers `CLIPModel`, default weights "openai/clip-vit-large-patch14" (the paper's CLIP ViT-L/14).
- "siglip": transformers `SiglipModel`, default "google/siglip-so400m-patch14-384"; texts are padded to the
  64 tokens SigLIP was trained with (its pooled text output is the last position). Its tokenizer needs the
  `sentencepiece` package.
- "colour": no weights. An image becomes the share of its pixels in each basic colour name (black, white,
  grey, red, orange, yellow, green, blue, purple, pink, brown; pixels named from HSV); a text becomes the
  colour names it contains ("navy" counts as blue, "gray" as grey). Crude, but real, offline and
  deterministic: it checks colour-bearing bindings ("black jacket" vs "white shirt") where no neural model can
  be loaded, and it is what the tests run on real pixels.

`spec.random_init=True` builds the neural backends tiny (2 layers, random weights) with an offline tokenizer
and the real image processor settings: the code path runs, the scores are noise, `info.random_weights` is set.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image

from models.base import ModelLoadError, ModelSpec, Registry, model_info, resolve_device, resolve_dtype
from models.weights import DEFAULTS
from schemas.records import ModelInfo

logger = logging.getLogger(__name__)

IMAGE_TEXT = Registry("image-text embedder")

ImageLike = Image.Image | np.ndarray


class ImageTextEmbedder(Protocol):
    info: ModelInfo
    logit_scale: float

    def embed_images(self, images: Sequence[ImageLike]) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def _as_rgba(image: ImageLike) -> np.ndarray:
    """HxWx4 uint8; alpha 255 where no mask was given."""
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGBA"))
    else:
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8, got {arr.dtype}")
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise ValueError(f"image arrays must be HxWx3 or HxWx4, got shape {arr.shape}")
        if arr.shape[-1] == 3:
            arr = np.concatenate([arr, np.full(arr.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"empty image {arr.shape}")
    return arr


def _normalise(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float32, copy=False)
    norm = np.linalg.norm(rows, axis=-1, keepdims=True)
    return np.divide(rows, norm, out=np.zeros_like(rows), where=norm > 0)


# Colour names ---------------------------------------------------------------------------------------------

COLOUR_NAMES: tuple[str, ...] = (
    "black",
    "white",
    "grey",
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "brown",
)
"""Berlin & Kay's eleven basic colour terms: the axes of the "colour" backend's embedding."""

_COLOUR_WORDS: dict[str, str] = {name: name for name in COLOUR_NAMES} | {
    "gray": "grey",
    "silver": "grey",
    "charcoal": "grey",
    "ivory": "white",
    "cream": "white",
    "navy": "blue",
    "cyan": "blue",
    "turquoise": "blue",
    "teal": "blue",
    "denim": "blue",
    "maroon": "red",
    "crimson": "red",
    "scarlet": "red",
    "burgundy": "red",
    "violet": "purple",
    "lavender": "purple",
    "magenta": "pink",
    "gold": "yellow",
    "golden": "yellow",
    "olive": "green",
    "khaki": "brown",
    "beige": "brown",
    "tan": "brown",
    "chocolate": "brown",
}


def colour_names_in(text: str) -> list[str]:
    """The basic colour names a phrase mentions, in order, without repeats ("navy blue coat" -> ["blue"])."""
    found = [_COLOUR_WORDS[w] for w in re.findall(r"[a-z]+", text.lower()) if w in _COLOUR_WORDS]
    return list(dict.fromkeys(found))


def name_pixels(rgb: np.ndarray) -> np.ndarray:
    """Index into COLOUR_NAMES of every pixel of an HxWx3 uint8 array (HSV thresholds; achromatic first)."""
    hsv = np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., :3])).convert("HSV"), dtype=np.float32)
    h = hsv[..., 0] * (360.0 / 255.0)
    s = hsv[..., 1] / 255.0
    v = hsv[..., 2] / 255.0
    idx = {name: i for i, name in enumerate(COLOUR_NAMES)}
    out = np.full(h.shape, idx["grey"], np.int64)
    chromatic = (s >= 0.25) & (v >= 0.2)
    # hue bands (degrees)
    out[chromatic & ((h < 10) | (h >= 345))] = idx["red"]
    out[chromatic & (h >= 10) & (h < 40)] = idx["orange"]  # red-orange (~14 deg) is called orange
    out[chromatic & (h >= 40) & (h < 70)] = idx["yellow"]
    out[chromatic & (h >= 70) & (h < 170)] = idx["green"]
    out[chromatic & (h >= 170) & (h < 260)] = idx["blue"]
    out[chromatic & (h >= 260) & (h < 295)] = idx["purple"]
    out[chromatic & (h >= 295) & (h < 345)] = idx["pink"]
    # dark orange / red is brown; pale, bright red is pink
    out[chromatic & ((h < 45) | (h >= 345)) & (v < 0.6) & (h >= 10)] = idx["brown"]
    out[chromatic & ((h < 10) | (h >= 330)) & (s < 0.5) & (v >= 0.7)] = idx["pink"]
    achromatic = ~chromatic
    out[achromatic & (v >= 0.8) & (s < 0.25)] = idx["white"]
    out[v < 0.2] = idx["black"]
    out[achromatic & (v >= 0.2) & (v < 0.8)] = idx["grey"]
    return out


@IMAGE_TEXT.register("colour")
class ColourMatcher:
    """Colour-name histograms for images and colour-name indicators for texts (see the module docstring).

    Options: none. `logit_scale` is 1.0: the similarities are shares of pixels, not model logits.
    """

    logit_scale = 1.0

    def __init__(self, spec: ModelSpec):
        self.info = model_info(spec, "colour-names-v1").model_copy(update={"random_weights": False})
        self.batch_size = spec.batch_size

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> ColourMatcher:
        if spec.options:
            raise ModelLoadError(f"the colour matcher takes no options, got {sorted(spec.options)}")
        return cls(spec)

    def embed_images(self, images: Sequence[ImageLike]) -> np.ndarray:
        rows = np.zeros((len(images), len(COLOUR_NAMES)), np.float32)
        for i, image in enumerate(images):
            rgba = _as_rgba(image)
            keep = rgba[..., 3] > 0
            if not keep.any():
                continue
            names = name_pixels(rgba[..., :3])[keep]
            rows[i] = np.bincount(names, minlength=len(COLOUR_NAMES)) / names.size
        return _normalise(rows)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        rows = np.zeros((len(texts), len(COLOUR_NAMES)), np.float32)
        for i, text in enumerate(texts):
            for name in colour_names_in(text):
                rows[i, COLOUR_NAMES.index(name)] = 1.0
        return _normalise(rows)


# Neural dual encoders -------------------------------------------------------------------------------------


class _DualEncoder:
    """CLIP-style model: `get_image_features` / `get_text_features`, a separate image processor and tokenizer."""

    default_weights: str = ""
    text_kwargs: dict[str, Any] = {}

    def __init__(
        self, model: Any, image_processor: Any, tokenizer: Any, *, spec: ModelSpec, device: str, dtype
    ):
        self.model = model
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.info = model_info(spec, self.default_weights)
        self.device = device
        self.dtype = dtype
        self.batch_size = spec.batch_size
        self.logit_scale = float(model.logit_scale.detach().float().exp().item())
        mean = getattr(image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
        self._fill = np.array([round(255 * m) for m in mean], np.uint8)

    @classmethod
    def _load(cls, spec: ModelSpec, model_cls: str, tiny) -> _DualEncoder:
        if spec.options:
            raise ModelLoadError(f"{spec.backend} takes no options, got {sorted(spec.options)}")
        device = resolve_device(spec.device)
        dtype = resolve_dtype(spec.dtype, device)
        if spec.random_init:
            model, image_processor, tokenizer = tiny()
        else:
            import transformers

            weights = spec.weights or cls.default_weights
            kwargs = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
            try:
                image_processor = transformers.AutoImageProcessor.from_pretrained(weights, **kwargs)
                tokenizer = transformers.AutoTokenizer.from_pretrained(weights, **kwargs)
                model = getattr(transformers, model_cls).from_pretrained(weights, dtype=dtype, **kwargs)
            except Exception as e:  # hub, filesystem, missing tokenizer backend: all mean "cannot load"
                raise ModelLoadError(
                    f"cannot load {spec.backend} weights {weights!r} (revision {spec.revision!r}): {e}. "
                    f"Set the embedder's `weights` to a local directory holding a transformers {model_cls} "
                    f"checkpoint (e.g. `huggingface-cli download {cls.default_weights} --local-dir DIR`), "
                    "or use backend 'colour' offline."
                ) from e
        model = model.to(device=device, dtype=dtype).eval()
        return cls(model, image_processor, tokenizer, spec=spec, device=device, dtype=dtype)

    def _rgb(self, image: ImageLike) -> Image.Image:
        rgba = _as_rgba(image)
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = self._fill  # masked-out pixels become the processor's mean: ~zero input
        return Image.fromarray(rgb, "RGB")

    @staticmethod
    def _pooled(out) -> Any:
        return out if hasattr(out, "float") else out.pooler_output  # transformers 5 returns a model output

    def embed_images(self, images: Sequence[ImageLike]) -> np.ndarray:
        import torch

        rows: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            batch = [self._rgb(im) for im in images[start : start + self.batch_size]]
            pixels = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                feats = self._pooled(
                    self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
                )
            rows.append(feats.float().cpu().numpy())
        if not rows:
            return np.zeros((0, self.embed_dim), np.float32)
        return _normalise(np.concatenate(rows))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = np.zeros((len(texts), self.embed_dim), np.float32)
        todo = [i for i, t in enumerate(texts) if t.strip()]
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start : start + self.batch_size]
            enc = self.tokenizer(
                [texts[i] for i in idx], truncation=True, return_tensors="pt", **self.text_kwargs
            )
            enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            with torch.inference_mode():
                feats = self._pooled(self.model.get_text_features(**enc))
            out[idx] = feats.float().cpu().numpy()
        return _normalise(out)

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)


@IMAGE_TEXT.register("clip")
class ClipEmbedder(_DualEncoder):
    """CLIP through transformers (`CLIPModel`); default weights openai/clip-vit-large-patch14."""

    default_weights = DEFAULTS["clip"]
    text_kwargs = {"padding": True, "max_length": 77}

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> ClipEmbedder:
        return cls._load(spec, "CLIPModel", _tiny_clip)  # type: ignore[return-value]


@IMAGE_TEXT.register("siglip")
class SiglipEmbedder(_DualEncoder):
    """SigLIP through transformers (`SiglipModel`); default weights google/siglip-so400m-patch14-384."""

    default_weights = DEFAULTS["siglip"]
    text_kwargs = {"padding": "max_length", "max_length": 64}  # how SigLIP was trained; pooled = last token

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> SiglipEmbedder:
        return cls._load(spec, "SiglipModel", _tiny_siglip)  # type: ignore[return-value]

    @property
    def embed_dim(self) -> int:
        text = self.model.config.text_config
        return int(getattr(text, "projection_size", None) or text.hidden_size)


# Test builds ----------------------------------------------------------------------------------------------


def _tiny_clip():
    """CLIP with 2-layer towers and random weights; the real CLIP image processor (224 px, CLIP mean/std) and a
    CLIP BPE tokenizer over the project's tiny word list."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from models.tiny_vocab import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config=CLIPTextConfig(
            **tower,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,  # CLIP pools the text at the first end-of-text token
            pad_token_id=1,
        ),
        vision_config=CLIPVisionConfig(**tower, image_size=224, patch_size=32),
        projection_dim=16,
    )
    torch.manual_seed(0)
    return CLIPModel(config), CLIPImageProcessor(), tokenizer


def _tiny_siglip():
    """SigLIP with 2-layer towers and random weights; the so400m-384 image processor settings and a Unigram
    tokenizer over the tiny word list (SigLIP's own is a SentencePiece Unigram model too)."""
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    from models.tiny_vocab import tiny_t5_tokenizer

    tokenizer = tiny_t5_tokenizer()
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = SiglipConfig(
        text_config={**tower, "vocab_size": len(tokenizer), "max_position_embeddings": 64},
        vision_config={**tower, "image_size": 384, "patch_size": 32},
    )
    torch.manual_seed(0)
    processor = SiglipImageProcessor(size={"height": 384, "width": 384})
    return SiglipModel(config), processor, tokenizer
