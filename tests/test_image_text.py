"""Image-text embedders: the colour matcher on real pixels, CLIP and SigLIP tiny builds through the real code."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data

from models.base import ModelLoadError, ModelSpec
from models.image_text import COLOUR_NAMES, IMAGE_TEXT, colour_names_in, name_pixels
from tests.binding_frames import GARMENT_BOXES, PERSON_BOXES, crop, two_person_frame


def _unit_or_zero(rows: np.ndarray) -> None:
    assert rows.dtype == np.float32
    norms = np.linalg.norm(rows, axis=1)
    assert np.all((np.abs(norms - 1) < 1e-5) | (norms == 0)), norms


# ---------------------------------------------------------------------------------------------- colour matcher
@pytest.fixture(scope="module")
def colour():
    return IMAGE_TEXT.build(ModelSpec(backend="colour", device="cpu"))


def test_colour_words():
    assert colour_names_in("navy blue coat") == ["blue"]
    assert colour_names_in("Gray hoodie and BLACK jeans") == ["grey", "black"]
    assert colour_names_in("spacesuit") == []
    assert colour_names_in("tankard") == []  # "tan" only as a whole word


def test_colour_names_of_pixels():
    pixels = np.array(
        [[[0, 0, 0], [255, 255, 255], [128, 128, 128], [220, 20, 20], [20, 40, 220], [120, 70, 20]]]
    )
    names = [COLOUR_NAMES[i] for i in name_pixels(pixels.astype(np.uint8))[0]]
    assert names == ["black", "white", "grey", "red", "blue", "brown"]


def test_colour_matcher_on_the_astronaut(colour):
    """Real photo, no pasting: the orange suit is orange, the visor of the helmet is black, the flag is
    red/white/blue."""
    photo = skimage.data.astronaut()
    suit, helmet = photo[260:470, 30:140], photo[360:500, 300:470]
    texts = ["orange spacesuit", "black helmet", "blue jacket", "spacesuit"]
    sims = colour.embed_images([suit, helmet]) @ colour.embed_texts(texts).T
    assert sims[0].argmax() == 0 and sims[0, 0] > 0.8
    assert sims[1].argmax() == 1
    assert sims[:, 3].tolist() == [0.0, 0.0]  # no colour word: no signal, not a random score
    assert colour.info.random_weights is False and colour.logit_scale == 1.0


def test_colour_matcher_on_pasted_garments(colour):
    frame = two_person_frame({0: "white", 1: "black"})
    garments = [crop(frame, GARMENT_BOXES[0]), crop(frame, GARMENT_BOXES[1])]
    texts = ["white jacket", "black jacket"]
    sims = colour.embed_images(garments) @ colour.embed_texts(texts).T
    assert sims[0, 0] > 0.9 and sims[1, 1] > 0.9
    assert sims[0, 1] < 0.2 and sims[1, 0] < 0.2
    # the whole person: the garment dominates, but skin, hair and wall dilute it
    people = colour.embed_images([crop(frame, PERSON_BOXES[0]), crop(frame, PERSON_BOXES[1])])
    person_sims = people @ colour.embed_texts(texts).T
    assert person_sims[0, 0] > person_sims[0, 1] and person_sims[1, 1] > person_sims[1, 0]


def test_alpha_channel_is_a_mask(colour):
    """Only the masked pixels vote: a black garment on a white page is black once the page is masked out."""
    patch = np.full((40, 40, 4), 255, np.uint8)
    patch[10:30, 10:30, :3] = 10
    black = colour.embed_texts(["black"])[0]
    unmasked = colour.embed_images([patch])[0] @ black
    patch[..., 3] = 0
    patch[10:30, 10:30, 3] = 255
    masked = colour.embed_images([patch])[0] @ black
    assert masked == pytest.approx(1.0) and unmasked < 0.5
    patch[..., 3] = 0  # nothing left: zero row, not NaN
    assert not colour.embed_images([patch]).any()


def test_colour_matcher_rejects_options():
    with pytest.raises(ModelLoadError):
        IMAGE_TEXT.build(ModelSpec(backend="colour", options={"bins": 8}))


# ---------------------------------------------------------------------------------------------- neural backends
@pytest.fixture(scope="module")
def tiny_clip():
    return IMAGE_TEXT.build(ModelSpec(backend="clip", device="cpu", random_init=True, batch_size=2))


def test_tiny_clip_embeds(tiny_clip):
    frame = two_person_frame({0: "white", 1: "black"})
    images = [crop(frame, GARMENT_BOXES[0]), crop(frame, GARMENT_BOXES[1]), frame]
    img = tiny_clip.embed_images(images)
    txt = tiny_clip.embed_texts(["white jacket", "", "black jacket"])
    assert img.shape == (3, 16) and txt.shape == (3, 16)
    _unit_or_zero(img)
    _unit_or_zero(txt)
    assert not txt[1].any() and np.abs(np.linalg.norm(txt[[0, 2]], axis=1) - 1).max() < 1e-5
    assert (
        tiny_clip.info.random_weights is True and tiny_clip.info.model_id == "openai/clip-vit-large-patch14"
    )
    assert tiny_clip.logit_scale > 1.0  # exp(log(1/0.07)) at init
    # batching (batch_size=2 over 3 images) gives the same rows as one image at a time
    one_by_one = np.concatenate([tiny_clip.embed_images([im]) for im in images])
    np.testing.assert_allclose(img, one_by_one, atol=1e-5)
    # a masked-out region is painted with the processor's mean colour, so it does not depend on what was there
    a = np.dstack([frame, np.zeros(frame.shape[:2], np.uint8)])
    b = a.copy()
    b[..., :3] = 255 - b[..., :3]
    np.testing.assert_allclose(tiny_clip.embed_images([a]), tiny_clip.embed_images([b]), atol=1e-6)


def test_clip_loads_a_local_checkpoint(tiny_clip, tmp_path):
    """The production loading path (AutoImageProcessor / AutoTokenizer / CLIPModel.from_pretrained) on a saved
    tiny checkpoint: the same embeddings as the in-memory build."""
    tiny_clip.model.save_pretrained(tmp_path)
    tiny_clip.image_processor.save_pretrained(tmp_path)
    tiny_clip.tokenizer.save_pretrained(tmp_path)
    loaded = IMAGE_TEXT.build(ModelSpec(backend="clip", weights=str(tmp_path), device="cpu"))
    assert loaded.info.model_id == str(tmp_path) and loaded.info.random_weights is False
    photo = skimage.data.astronaut()
    np.testing.assert_allclose(loaded.embed_images([photo]), tiny_clip.embed_images([photo]), atol=1e-5)
    texts = ["orange spacesuit", "a woman"]
    np.testing.assert_allclose(loaded.embed_texts(texts), tiny_clip.embed_texts(texts), atol=1e-5)


def test_missing_weights_are_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load clip weights"):
        IMAGE_TEXT.build(ModelSpec(backend="clip", weights=str(tmp_path), device="cpu"))


def test_tiny_siglip_embeds():
    emb = IMAGE_TEXT.build(ModelSpec(backend="siglip", device="cpu", random_init=True))
    img = emb.embed_images([skimage.data.astronaut()])
    txt = emb.embed_texts(["orange spacesuit", "   "])
    assert img.shape[1] == txt.shape[1] == 32
    _unit_or_zero(img)
    _unit_or_zero(txt)
    assert not txt[1].any() and txt[0].any()
    assert emb.info.random_weights is True
