"""Video-text embedders: X-CLIP through transformers with a tiny random build; VideoCLIP-XL's opt-in loader."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from models.base import ModelLoadError, ModelSpec
from models.video_text import VIDEO_TEXT, sample_frames

TEXTS = ["a man in a black shirt", "a woman in a red dress talking", "a cat"]


@pytest.fixture(scope="module")
def xclip():
    return VIDEO_TEXT.build(ModelSpec(backend="xclip", random_init=True, device="cpu", batch_size=2))


@pytest.fixture(scope="module")
def videos():
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
        for t, h, w in ((3, 40, 60), (20, 48, 48), (9, 30, 50))
    ]


def test_uniform_frame_sampling():
    video = np.arange(16, dtype=np.uint8)[:, None, None, None].repeat(3, axis=3).repeat(2, 1).repeat(2, 2)
    assert sample_frames(video, 8)[:, 0, 0, 0].tolist() == [1, 3, 5, 7, 9, 11, 13, 15]  # segment centres
    assert sample_frames(video[:3], 8)[:, 0, 0, 0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]  # short: repeated
    with pytest.raises(ValueError, match="uint8 video"):
        sample_frames(video[0], 8)
    with pytest.raises(ValueError, match="empty video"):
        sample_frames(video[:0], 8)


def test_xclip_embeddings_and_similarity(xclip, videos):
    assert xclip.info.random_weights and xclip.info.model_id == "microsoft/xclip-base-patch32"
    assert xclip.num_frames == 8
    v, t = xclip.embed_videos(videos), xclip.embed_texts(TEXTS)
    assert v.shape == (3, 32) and t.shape == (3, 32) and v.dtype == t.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    sim = xclip.similarity(videos, TEXTS)
    assert sim.shape == (3, 3) and (np.abs(sim) <= 1 + 1e-5).all()
    # Batch-independent: one video at a time, texts one at a time, gives the same numbers.
    one = VIDEO_TEXT.build(ModelSpec(backend="xclip", random_init=True, device="cpu", batch_size=1))
    np.testing.assert_allclose(one.embed_videos(videos), v, atol=1e-5)
    np.testing.assert_allclose(one.embed_texts(TEXTS), t, atol=1e-5)
    np.testing.assert_allclose(one.similarity(videos[1:2], TEXTS), sim[1:2], atol=1e-5)
    # X-CLIP's score conditions the text on the video: it is not the plain cosine of the two embeddings.
    assert not np.allclose(sim, v @ t.T, atol=1e-3)
    assert xclip.similarity([], TEXTS).shape == (0, 3)


def test_xclip_local_checkpoint(tmp_path, xclip, videos):
    xclip.model.save_pretrained(tmp_path)
    xclip.processor.save_pretrained(tmp_path)
    loaded = VIDEO_TEXT.build(ModelSpec(backend="xclip", weights=str(tmp_path), device="cpu"))
    assert not loaded.info.random_weights
    np.testing.assert_allclose(loaded.embed_videos(videos), xclip.embed_videos(videos), atol=1e-5)
    np.testing.assert_allclose(loaded.embed_texts(TEXTS), xclip.embed_texts(TEXTS), atol=1e-5)
    with pytest.raises(ModelLoadError, match="cannot load X-CLIP"):
        VIDEO_TEXT.build(ModelSpec(backend="xclip", weights=str(tmp_path / "none"), device="cpu"))


def test_videoclip_xl_refuses_without_trust_remote_code(tmp_path):
    with pytest.raises(ModelLoadError, match="trust_remote_code: true"):
        VIDEO_TEXT.build(ModelSpec(backend="videoclip-xl"))
    with pytest.raises(ModelLoadError, match="trust_remote_code: true"):
        VIDEO_TEXT.build(ModelSpec(backend="videoclip-xl", weights=str(tmp_path)))
    with pytest.raises(ModelLoadError, match="modeling.py not found"):
        VIDEO_TEXT.build(ModelSpec(backend="videoclip-xl", weights=str(tmp_path), trust_remote_code=True))


# A stand-in for the repository's own code, with the entry points its model card uses.
_MODELING = """
import torch
from torch import nn
from utils.text_encoder import VOCAB


class _Vision(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 6)

    def get_vid_features(self, x):  # (B, T, 3, H, W)
        return self.proj(x.mean(dim=(1, 3, 4)))


class _Text(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.EmbeddingBag(VOCAB, 6)

    def encode_text(self, tokens):
        return self.emb(tokens)


class VideoCLIP_XL(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_model = _Vision()
        self.text_model = _Text()
"""

_TEXT_ENCODER = """
import torch

VOCAB = 50


class _Encoder:
    def tokenize(self, texts, truncate=False):
        return torch.tensor([[hash(w) % VOCAB for w in (t.split() + ["."] * 4)[:4]] for t in texts])


text_encoder = _Encoder()
"""


def test_videoclip_xl_loads_shipped_code_when_allowed(tmp_path, videos):
    (tmp_path / "utils").mkdir()
    (tmp_path / "modeling.py").write_text(textwrap.dedent(_MODELING))
    (tmp_path / "utils" / "text_encoder.py").write_text(textwrap.dedent(_TEXT_ENCODER))
    spec = ModelSpec(backend="videoclip-xl", weights=str(tmp_path), trust_remote_code=True, device="cpu")
    with pytest.raises(ModelLoadError, match="VideoCLIP-XL-v2.bin not found"):
        VIDEO_TEXT.build(spec)
    (tmp_path / "VideoCLIP-XL-v2.bin").write_bytes(b"")
    torch.manual_seed(0)
    # Build the stand-in once to write its state dict (tensors only: it loads with weights_only=True).
    import importlib.util
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        mod_spec = importlib.util.spec_from_file_location("_standin_modeling", tmp_path / "modeling.py")
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
        torch.save(mod.VideoCLIP_XL().state_dict(), tmp_path / "VideoCLIP-XL-v2.bin")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("utils", None)
        sys.modules.pop("utils.text_encoder", None)
    vt = VIDEO_TEXT.build(spec)
    assert not vt.info.random_weights
    v, t = vt.embed_videos(videos), vt.embed_texts(TEXTS)
    assert v.shape == (3, 6) and t.shape == (3, 6)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(vt.similarity(videos, TEXTS), v @ t.T, atol=1e-6)
