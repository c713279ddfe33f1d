"""DINOv2 image features: the transformers code path with a tiny random build, and loading a local checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from PIL import Image

from models.base import ModelLoadError, ModelSpec
from models.image_features import IMAGE_FEATURES


@pytest.fixture(scope="module")
def dino():
    return IMAGE_FEATURES.build(ModelSpec(backend="dinov2", random_init=True, device="cpu", batch_size=2))


@pytest.fixture(scope="module")
def images():
    astro = skimage.data.astronaut()
    return [astro, astro[:200, 150:350].copy(), skimage.data.chelsea(), skimage.data.coffee()]


def test_embeddings_are_normalised_and_batch_independent(dino, images):
    assert dino.info.random_weights and dino.info.model_id == "facebook/dinov2-base"
    feats = dino.embed_images(images)
    assert feats.shape == (4, 32) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-5)
    one = IMAGE_FEATURES.build(ModelSpec(backend="dinov2", random_init=True, device="cpu", batch_size=1))
    np.testing.assert_allclose(one.embed_images(images), feats, atol=1e-5)
    # PIL and array inputs are the same image; an image against itself has cosine 1.
    np.testing.assert_allclose(dino.embed_images([Image.fromarray(images[2])]), feats[2:3], atol=1e-6)
    assert dino.embed_images([]).shape == (0, 32)


def test_local_checkpoint_loads_through_the_real_path(tmp_path, dino, images):
    dino.model.save_pretrained(tmp_path)
    dino.processor.save_pretrained(tmp_path)
    loaded = IMAGE_FEATURES.build(ModelSpec(backend="dinov2", weights=str(tmp_path), device="cpu"))
    assert not loaded.info.random_weights and loaded.info.model_id == str(tmp_path)
    np.testing.assert_allclose(loaded.embed_images(images), dino.embed_images(images), atol=1e-5)


def test_bad_inputs_and_specs(tmp_path, dino):
    with pytest.raises(ValueError, match="RGB uint8"):
        dino.embed_images([np.zeros((8, 8), np.uint8)])
    with pytest.raises(ValueError, match="empty image"):
        dino.embed_images([np.zeros((0, 8, 3), np.uint8)])
    with pytest.raises(ModelLoadError, match="cannot load DINOv2 weights"):
        IMAGE_FEATURES.build(ModelSpec(backend="dinov2", weights=str(tmp_path / "none"), device="cpu"))
    with pytest.raises(ModelLoadError, match="unknown options"):
        IMAGE_FEATURES.build(ModelSpec(backend="dinov2", random_init=True, options={"pool": "mean"}))
