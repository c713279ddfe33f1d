"""Video-text embeddings for ViCLIP-T (generated video <-> caption) and ViCLIP-V (generated <-> ground-truth video).

Backends (registered in `VIDEO_TEXT`):

- ``xclip`` (the evaluation's default): transformers' native `XCLIPModel` + `XCLIPProcessor`, default
  ``microsoft/xclip-base-patch32`` (8 frames of 224 px, CLIP ViT-B/32 with cross-frame attention, trained on
  Kinetics-400). `embed_videos` / `embed_texts` are the plain projected embeddings; `similarity` is X-CLIP's own
  video-text score, whose text side is conditioned on the video by X-CLIP's video-specific prompt generator (the
  way the model was trained to score a caption), as a cosine in [-1, 1].
- ``videoclip-xl``: the paper's VideoCLIP-XL-v2 (``alibaba-pai/VideoCLIP-XL-v2``). It is not a transformers
  model: it ships its own model code (``modeling.py``, ``utils/text_encoder.py``), so it is loaded only when the
  user sets ``trust_remote_code: true`` in its model spec; without it the adapter refuses with `ModelLoadError`. Its state dict is
  loaded with ``torch.load(weights_only=True)``. Usage follows the model card (8 frames, 224 x 224, CLIP
  normalisation, ``vision_model.get_vid_features`` / ``text_model.encode_text``); it has no test build and was
  not run against the real checkpoint here (no hub access).

Videos are T x H x W x 3 RGB ``uint8`` arrays; ``num_frames`` frames are sampled uniformly over each video (the
paper: 8). All embeddings come back as float32 numpy arrays, L2-normalised: cosine similarity = ``a @ b.T``.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from models.base import (
    ModelLoadError,
    ModelSpec,
    Registry,
    hf_load_error,
    load_hf_model,
    model_info,
    resolve_device,
    resolve_dtype,
)
from models.image_features import l2_normalise
from models.weights import DEFAULTS

logger = logging.getLogger(__name__)

VIDEO_TEXT = Registry("video-text embedder")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def sample_frames(video: np.ndarray, num_frames: int) -> np.ndarray:
    """`num_frames` frames spread uniformly over the video (segment centres; frames repeat in a short video)."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"expected a uint8 video T x H x W x 3, got {video.shape} {video.dtype}")
    t = video.shape[0]
    if t == 0 or video.shape[1] == 0 or video.shape[2] == 0:
        raise ValueError(f"empty video {video.shape}")
    idx = np.minimum(((np.arange(num_frames) + 0.5) * t / num_frames).astype(int), t - 1)
    return video[idx]


# --------------------------------------------------------------------------------------------------------- X-CLIP
@VIDEO_TEXT.register("xclip")
class XClipVideoText:
    """X-CLIP video and text embeddings, `batch_size` videos (or texts) per forward pass.

    options: ``num_frames`` (default: the checkpoint's, 8 for xclip-base-patch32; X-CLIP's cross-frame attention
    is built for that count).
    """

    def __init__(self, model, processor, spec: ModelSpec, device: str, dtype):
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.batch_size = spec.batch_size
        self.num_frames = int(spec.options.get("num_frames", model.config.vision_config.num_frames))
        self.dim = int(model.config.projection_dim)
        self.info = model_info(spec, DEFAULTS["xclip"])

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> XClipVideoText:
        model, processor, device, dtype = load_hf_model(
            spec,
            family="X-CLIP",
            default_weights=DEFAULTS["xclip"],
            model_class="XCLIPModel",
            processor_class="XCLIPProcessor",
            test_build=build_test_xclip,
            options=frozenset({"num_frames"}),
        )
        return cls(model, processor, spec, device, dtype)

    def _pixels(self, videos: Sequence[np.ndarray]) -> torch.Tensor:
        clips = [list(sample_frames(v, self.num_frames)) for v in videos]
        pixels = self.processor(videos=clips, return_tensors="pt")["pixel_values"]  # (B, T, 3, H, W)
        return pixels.to(self.device, self.dtype)

    def _tokens(self, texts: Sequence[str]):
        return self.processor(text=list(texts), padding=True, truncation=True, return_tensors="pt").to(
            self.device
        )

    @torch.inference_mode()
    def embed_videos(self, videos: Sequence[np.ndarray]) -> np.ndarray:
        out = np.zeros((len(videos), self.dim), np.float32)
        for start in range(0, len(videos), self.batch_size):
            feats = self.model.get_video_features(
                pixel_values=self._pixels(videos[start : start + self.batch_size])
            )
            out[start : start + self.batch_size] = l2_normalise(feats.pooler_output.float().cpu().numpy())
        return out

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for start in range(0, len(texts), self.batch_size):
            feats = self.model.get_text_features(**self._tokens(texts[start : start + self.batch_size]))
            out[start : start + self.batch_size] = l2_normalise(feats.pooler_output.float().cpu().numpy())
        return out

    @torch.inference_mode()
    def similarity(self, videos: Sequence[np.ndarray], texts: Sequence[str]) -> np.ndarray:
        """(N videos, M texts) cosine of X-CLIP's forward pass: texts prompted by each video's visual tokens."""
        out = np.zeros((len(videos), len(texts)), np.float32)
        if not len(videos) or not len(texts):
            return out
        tokens = self._tokens(texts)
        for start in range(0, len(videos), self.batch_size):
            result = self.model(pixel_values=self._pixels(videos[start : start + self.batch_size]), **tokens)
            cosine = result.logits_per_video.float() / self.model.logit_scale.exp().float()
            out[start : start + self.batch_size] = cosine.cpu().numpy()
        return out


def build_test_xclip(seed: int = 0, num_frames: int = 8):
    """Tiny random X-CLIP (1-layer text, vision, MIT and prompt blocks, width 32, 32 px frames, patch 16) with the
    real `XCLIPProcessor` (VideoMAE image processor with CLIP statistics at 32 px) and a CLIP BPE tokenizer built
    offline from the project's word list."""
    from transformers import VideoMAEImageProcessor, XCLIPConfig, XCLIPModel, XCLIPProcessor

    from models.tiny_vocab import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    image_processor = VideoMAEImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        resample=3,
    )
    processor = XCLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = XCLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
            num_frames=num_frames,
            mit_hidden_size=32,
            mit_intermediate_size=64,
            mit_num_hidden_layers=1,
            mit_num_attention_heads=2,
        ),
        projection_dim=32,
        prompt_layers=1,
        prompt_num_attention_heads=2,
        prompt_projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = XCLIPModel(config)
    return model.eval(), processor


# ------------------------------------------------------------------------------------------------- VideoCLIP-XL
@VIDEO_TEXT.register("videoclip-xl")
class VideoClipXL:
    """The paper's VideoCLIP-XL-v2 through its own model code (the user's opt-in: ``trust_remote_code: true`` in the spec).

    ``spec.weights``: a local snapshot directory of the model repository (``modeling.py``, ``utils/`` and the
    checkpoint) or a hub id, downloaded with `huggingface_hub.snapshot_download` at ``spec.revision``.
    options: ``checkpoint`` (file name of the state dict, default ``VideoCLIP-XL-v2.bin``), ``num_frames``
    (default 8), ``size`` (frame side, default 224).
    """

    def __init__(self, model, tokenize, spec: ModelSpec, device: str, dtype):
        self.model = model
        self.tokenize = tokenize
        self.device = device
        self.dtype = dtype
        self.batch_size = spec.batch_size
        self.num_frames = int(spec.options.get("num_frames", 8))
        self.size = int(spec.options.get("size", 224))
        self.info = model_info(spec, DEFAULTS["videoclip-xl"])

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> VideoClipXL:
        unknown = set(spec.options) - {"checkpoint", "num_frames", "size"}
        if unknown:
            raise ModelLoadError(f"videoclip-xl: unknown options {sorted(unknown)}")
        if not spec.trust_remote_code:
            raise ModelLoadError(
                "videoclip-xl (VideoCLIP-XL-v2) runs model code shipped with its checkpoint; set "
                "`trust_remote_code: true` (and `revision: <commit>`) in its model spec to allow that, or use the "
                "native 'xclip' backend"
            )
        if spec.revision is None:
            logger.warning(
                "videoclip-xl runs code from its checkpoint with no pinned revision: that code may change upstream"
            )
        if spec.random_init:
            raise ModelLoadError("videoclip-xl has no test build; use 'xclip' with random_init for tests")
        weights = spec.weights or DEFAULTS["videoclip-xl"]
        root = Path(weights).expanduser()
        if not root.is_dir():
            try:
                from huggingface_hub import snapshot_download

                root = Path(snapshot_download(weights, revision=spec.revision))
            except Exception as e:  # offline, missing repo, bad revision
                raise hf_load_error("VideoCLIP-XL", weights, spec.revision, e) from e
        checkpoint = root / spec.options.get("checkpoint", "VideoCLIP-XL-v2.bin")
        for needed in (root / "modeling.py", root / "utils" / "text_encoder.py", checkpoint):
            if not needed.is_file():
                raise ModelLoadError(f"videoclip-xl: {needed} not found in the model snapshot {root}")
        modeling = _import_from(root, "modeling")
        text_encoder = _import_from(root, "utils.text_encoder")
        device = resolve_device(spec.device)
        dtype = resolve_dtype(spec.dtype, device)
        try:
            model = modeling.VideoCLIP_XL()
            model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        except Exception as e:  # the shipped code's own errors, or a state dict that is not plain tensors
            raise ModelLoadError(f"videoclip-xl: cannot build the model from {root}: {e}") from e
        model = model.to(device=device, dtype=dtype).eval()
        return cls(model, text_encoder.text_encoder.tokenize, spec, device, dtype)

    def _pixels(self, videos: Sequence[np.ndarray]) -> torch.Tensor:
        import cv2

        mean = np.asarray(CLIP_MEAN, np.float32) * 255
        std = np.asarray(CLIP_STD, np.float32) * 255
        clips = []
        for v in videos:
            frames = [
                cv2.resize(f, (self.size, self.size), interpolation=cv2.INTER_CUBIC)
                for f in sample_frames(v, self.num_frames)
            ]
            clips.append((np.stack(frames).astype(np.float32) - mean) / std)
        pixels = torch.from_numpy(np.stack(clips)).permute(0, 1, 4, 2, 3)  # (B, T, 3, H, W)
        return pixels.to(self.device, self.dtype)

    @torch.inference_mode()
    def embed_videos(self, videos: Sequence[np.ndarray]) -> np.ndarray:
        chunks = [
            self.model.vision_model.get_vid_features(self._pixels(videos[s : s + self.batch_size]))
            .float()
            .cpu()
            for s in range(0, len(videos), self.batch_size)
        ]
        return l2_normalise(torch.cat(chunks).numpy()) if chunks else np.zeros((0, 0), np.float32)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        chunks = [
            self.model.text_model.encode_text(
                self.tokenize(list(texts[s : s + self.batch_size]), truncate=True).to(self.device)
            )
            .float()
            .cpu()
            for s in range(0, len(texts), self.batch_size)
        ]
        return l2_normalise(torch.cat(chunks).numpy()) if chunks else np.zeros((0, 0), np.float32)

    def similarity(self, videos: Sequence[np.ndarray], texts: Sequence[str]) -> np.ndarray:
        return self.embed_videos(videos) @ self.embed_texts(texts).T


def _import_from(root: Path, dotted: str):
    """Import `dotted` (e.g. "utils.text_encoder") from a model snapshot directory, under a private name."""
    path = root.joinpath(*dotted.split(".")).with_suffix(".py")
    name = f"_videoclip_xl_{abs(hash(str(root)))}_{dotted.replace('.', '_')}"
    if name in sys.modules:
        return sys.modules[name]
    # The shipped code imports its siblings as top-level modules ("from utils.text_encoder import ..."): it needs
    # the snapshot directory on sys.path while it loads.
    sys.path.insert(0, str(root))
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise ModelLoadError(f"videoclip-xl: importing {path} failed: {e}") from e
    finally:
        sys.path.remove(str(root))
    return module
