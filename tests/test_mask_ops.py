"""Mask quality rules and condition-image formats on synthetic masks (exact pixel expectations)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from schemas.records import Box
from tasks.mask_ops import (
    EmptyMaskError,
    check_mask,
    cutout_on_white,
    dilate,
    face_crop,
    foreground_union,
    mask_bbox,
    pixel_bounds,
    whole_person_cutout,
)

H, W = 60, 80
BOX = Box(x0=20, y0=10, x1=60, y1=50)  # 40 x 40


def blank() -> np.ndarray:
    return np.zeros((H, W), dtype=bool)


def test_good_mask_passes():
    m = blank()
    m[15:45, 25:55] = True
    c = check_mask(m, BOX)
    assert c.ok and c.reason is None
    assert c.area_frac == pytest.approx(900 / 1600)
    assert c.inside_frac == 1.0 and c.n_components == 1 and c.largest_component_frac == 1.0


def test_empty_mask_rejected():
    c = check_mask(blank(), BOX)
    assert not c.ok and c.reason == "empty" and c.n_components == 0


def test_tiny_mask_rejected_as_too_small():
    m = blank()
    m[20:22, 30:32] = True  # 4 px of a 1600 px box
    assert check_mask(m, BOX).reason == "too small"
    assert check_mask(m, BOX, min_area_frac=0.001).ok


def test_mask_spilling_over_the_frame_rejected_as_too_large():
    m = np.ones((H, W), dtype=bool)
    assert check_mask(m, BOX).reason == "too large"


def test_mask_mostly_outside_box_rejected():
    m = blank()
    m[10:50, 50:80] = True  # 10 of 30 columns inside the box
    c = check_mask(m, BOX)
    assert c.reason == "outside box"
    assert c.inside_frac == pytest.approx(1 / 3)


def test_fragmented_mask_rejected():
    m = blank()
    for y in range(12, 48, 8):  # 5 x 4 islands of 3x3 px, none touching (not even diagonally)
        for x in range(22, 58, 9):
            m[y : y + 3, x : x + 3] = True
    c = check_mask(m, BOX, min_area_frac=0.01)
    assert c.reason == "fragmented"
    assert c.n_components == 20 and c.largest_component_frac == pytest.approx(1 / 20)


def test_specks_do_not_count_as_components_and_max_components_applies():
    m = blank()
    m[12:48, 22:40] = True
    m[30, 55] = True  # one-pixel speck: < 1 % of the mask
    c = check_mask(m, BOX)
    assert c.ok and c.n_components == 1
    m[12:30, 45:58] = True  # a second real piece, smaller than the first
    c = check_mask(m, BOX, max_components=1)
    assert c.n_components == 2 and c.reason == "fragmented"
    assert check_mask(m, BOX).ok  # the largest piece still holds > 60 %


def test_diagonal_touch_is_one_component():
    m = blank()
    m[20:30, 30:40] = True
    m[30:40, 40:50] = True  # touches the first square at one corner only
    assert check_mask(m, BOX).n_components == 1


def test_check_mask_accepts_uint8_and_rejects_3d():
    m = np.zeros((H, W), dtype=np.uint8)
    m[15:45, 25:55] = 255
    assert check_mask(m, BOX).ok
    with pytest.raises(ValueError, match="2-D"):
        check_mask(np.zeros((H, W, 3)), BOX)


def test_dilate_is_an_exact_disk():
    m = blank()
    m[30, 40] = True
    d = dilate(m, 5)
    yy, xx = np.mgrid[:H, :W]
    assert np.array_equal(d, (yy - 30) ** 2 + (xx - 40) ** 2 <= 25)
    assert np.array_equal(dilate(m, 0), m)


def test_foreground_union_unites_and_dilates():
    a, b = blank(), blank()
    a[10:20, 10:20] = True
    b[40:50, 60:70] = True
    u = foreground_union([a, b], dilate_px=3)
    assert u[10:20, 10:20].all() and u[40:50, 60:70].all()
    assert u[7, 15] and not u[6, 15]  # 3 px above the first square, not 4
    assert not u[30, 40]
    assert np.array_equal(foreground_union([a, b], dilate_px=0), a | b)


def test_foreground_union_edge_cases():
    assert not foreground_union([], 5, shape=(H, W)).any()
    with pytest.raises(ValueError, match="explicit shape"):
        foreground_union([], 5)
    with pytest.raises(ValueError, match="different shapes"):
        foreground_union([blank(), np.zeros((10, 10), bool)], 1)


def _image() -> np.ndarray:
    rng = np.random.default_rng(0)
    # no pure-white pixel in the source, so any white in a cut-out is background
    return rng.integers(0, 250, (H, W, 3), dtype=np.uint8)


def test_cutout_is_tight_and_white_outside_the_mask():
    img = _image()
    m = blank()
    yy, xx = np.mgrid[:H, :W]
    m[(yy - 30) ** 2 + (xx - 40) ** 2 <= 100] = True  # disk of radius 10: rows/cols 20..40 and 30..50
    out = cutout_on_white(Image.fromarray(img), m)
    assert out.mode == "RGB" and out.size == (21, 21)
    arr = np.asarray(out)
    crop_mask = m[20:41, 30:51]
    assert np.array_equal(arr[crop_mask], img[20:41, 30:51][crop_mask])
    assert (arr[~crop_mask] == 255).all()
    # tight: every border row and column holds at least one mask pixel
    assert crop_mask[0].any() and crop_mask[-1].any() and crop_mask[:, 0].any() and crop_mask[:, -1].any()


def test_cutout_pad_adds_white_margin_clipped_at_frame():
    img = _image()
    m = blank()
    m[0:10, 70:80] = True  # in the top-right corner
    out = np.asarray(cutout_on_white(img, m, pad=4))
    assert out.shape == (14, 14, 3)  # padded only where the frame allows
    assert (out[10:, :] == 255).all() and (out[:, :4] == 255).all()
    assert np.array_equal(out[:10, 4:], img[0:10, 70:80])


def test_cutout_errors():
    with pytest.raises(EmptyMaskError):
        cutout_on_white(_image(), blank())
    with pytest.raises(ValueError, match="does not match"):
        cutout_on_white(_image(), np.ones((10, 10), bool))


def test_face_crop_rounds_outward_and_clips():
    img = _image()
    out = face_crop(Image.fromarray(img), Box(x0=10.4, y0=5.6, x1=20.2, y1=15.0))
    assert out.size == (11, 10)  # x 10..21, y 5..15
    assert np.array_equal(np.asarray(out), img[5:15, 10:21])
    assert face_crop(img, Box(x0=-5, y0=-5, x1=5, y1=5)).size == (5, 5)
    assert face_crop(img, Box(x0=10, y0=10, x1=20, y1=20), margin=0.5).size == (20, 20)
    with pytest.raises(EmptyMaskError, match="outside"):
        face_crop(img, Box(x0=100, y0=100, x1=120, y1=120))


def test_whole_person_cutout_includes_parts_sticking_out():
    img = _image()
    person, hat = blank(), blank()
    person[20:55, 30:50] = True
    hat[12:22, 28:52] = True  # the brim sticks out of the person mask
    out = np.asarray(whole_person_cutout(img, person, [hat]))
    assert out.shape == (43, 24, 3)
    union = (person | hat)[12:55, 28:52]
    assert np.array_equal(out[union], img[12:55, 28:52][union]) and (out[~union] == 255).all()


def test_bbox_helpers():
    m = blank()
    m[3:7, 9:12] = True
    assert mask_bbox(m).as_tuple() == (9.0, 3.0, 12.0, 7.0)
    assert mask_bbox(blank()) is None
    assert pixel_bounds(Box(x0=-3.5, y0=2.2, x1=90, y1=59.1), W, H) == (0, 2, W, H)
    assert pixel_bounds(Box(x0=100, y0=100, x1=120, y1=120), W, H) == (W, H, W, H)
