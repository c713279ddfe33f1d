"""Pure image logic around masks: quality checks, foreground unions and the condition-image formats.

Everything here is numpy / PIL / scipy on CPU, with no model in sight, so the rules that decide what becomes
training data are cheap to test exhaustively. Formats follow the released LumosX loader (SPEC §1):
- face: the bounding-box crop of the face, no segmentation (`face_crop`);
- attribute / object: the SAM mask cut out on pure white, tightly cropped (`cutout_on_white`);
- whole person (30 % of persons at train time): the same cut-out over person + attribute masks
  (`whole_person_cutout`).

Masks are boolean arrays of shape (H, W) in the frame's pixel grid; boxes are `schemas.records.Box` in the
same grid (exclusive end).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from schemas.records import Box, Record

WHITE = (255, 255, 255)

# 8-connectivity: a diagonal touch keeps a thin strap or a watch band in one piece.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


class EmptyMaskError(ValueError):
    """A mask (or a box) selects no pixel, so there is nothing to cut out."""


class MaskCheck(Record):
    """Why a mask is (not) good enough to become a condition image. Serialisable next to the stage record."""

    ok: bool
    reason: str | None = None
    area_frac: float
    """mask area / prompt-box area: ~0 means SAM found nothing, >1 means it spilled beyond the box"""
    inside_frac: float
    """share of the mask's pixels that lie inside the prompt box"""
    n_components: int
    """connected pieces, not counting specks smaller than `min_component_frac` of the mask"""
    largest_component_frac: float
    """share of the mask's pixels in its largest piece (1.0 = one solid piece)"""


def as_bool_mask(mask: np.ndarray) -> np.ndarray:
    """Accept bool, 0/1 or 0/255 arrays of shape (H, W); anything else is a caller bug: say so clearly."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be a 2-D (H, W) array, got shape {mask.shape}")
    return mask if mask.dtype == bool else mask > 0


def pixel_bounds(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """Integer crop bounds of `box` on a width x height image (see `Box.pixel_bounds`)."""
    return box.pixel_bounds(width, height)


def mask_bbox(mask: np.ndarray) -> Box | None:
    """Tight box around the mask's pixels (exclusive end), None for an empty mask."""
    mask = as_bool_mask(mask)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return Box(x0=float(cols[0]), y0=float(rows[0]), x1=float(cols[-1] + 1), y1=float(rows[-1] + 1))


def box_mask(box: Box, shape: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) mask of the pixels a box covers (rounded outward, like every crop here)."""
    h, w = shape
    x0, y0, x1, y1 = pixel_bounds(box, w, h)
    out = np.zeros((h, w), dtype=bool)
    out[y0:y1, x0:x1] = True
    return out


def check_mask(
    mask: np.ndarray,
    box: Box,
    *,
    min_area_frac: float = 0.02,
    max_area_frac: float = 1.5,
    min_inside_frac: float = 0.8,
    min_largest_component_frac: float = 0.6,
    max_components: int | None = None,
    min_component_frac: float = 0.01,
) -> MaskCheck:
    """Accept or reject a SAM mask prompted by `box`.

    Rejected, in this order (the first failing rule is the reason):
    - ``empty``: no pixel at all;
    - ``too small``: area < `min_area_frac` of the box (SAM latched onto a speck);
    - ``too large``: area > `max_area_frac` of the box (SAM segmented the surroundings, e.g. the whole wall);
    - ``outside box``: fewer than `min_inside_frac` of the pixels lie in the box;
    - ``fragmented``: the largest connected piece holds < `min_largest_component_frac` of the pixels, or there
      are more than `max_components` pieces. A cut-out made of scattered islands is a bad condition image.

    Specks smaller than `min_component_frac` of the mask do not count as pieces (SAM's edges are noisy), but
    their pixels still count in every fraction.
    """
    mask = as_bool_mask(mask)
    area = int(mask.sum())
    box_area = float(box_mask(box, mask.shape).sum())
    if area == 0:
        return MaskCheck(
            ok=False,
            reason="empty",
            area_frac=0.0,
            inside_frac=0.0,
            n_components=0,
            largest_component_frac=0.0,
        )

    x0, y0, x1, y1 = pixel_bounds(box, mask.shape[1], mask.shape[0])
    inside = int(mask[y0:y1, x0:x1].sum())
    labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    sizes = np.bincount(labels.ravel())[1:]
    n_components = int((sizes >= min_component_frac * area).sum())
    stats = dict(
        area_frac=area / box_area if box_area > 0 else math.inf,
        inside_frac=inside / area,
        n_components=n_components,
        largest_component_frac=float(sizes.max()) / area,
    )

    if stats["area_frac"] < min_area_frac:
        reason = "too small"
    elif stats["area_frac"] > max_area_frac:
        reason = "too large"
    elif stats["inside_frac"] < min_inside_frac:
        reason = "outside box"
    elif stats["largest_component_frac"] < min_largest_component_frac or (
        max_components is not None and n_components > max_components
    ):
        reason = "fragmented"
    else:
        reason = None
    return MaskCheck(ok=reason is None, reason=reason, **stats)


def dilate(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Grow a mask by a disk of `radius_px` (Euclidean), exact for any radius and linear in the image size."""
    mask = as_bool_mask(mask)
    if radius_px <= 0 or not mask.any():
        return mask.copy()
    # Distance to the nearest mask pixel <= r  <=>  inside the mask dilated by a disk of radius r.
    return ndimage.distance_transform_edt(~mask) <= radius_px


def foreground_union(
    masks: Sequence[np.ndarray], dilate_px: float, shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Union of person and object masks, dilated: the region the background inpainter must repaint.

    Dilation matters: SAM's edges miss hair strands, motion blur and shadows, and any sliver of a person left
    at the hole's border is what the inpainter then grows back into a ghost. `shape` is needed only when
    `masks` may be empty (a background with nothing to remove).
    """
    if not masks:
        if shape is None:
            raise ValueError("foreground_union of no masks needs an explicit shape")
        return np.zeros(shape, dtype=bool)
    bools = [as_bool_mask(m) for m in masks]
    first = bools[0].shape
    if shape is not None and first != tuple(shape):
        raise ValueError(f"masks have shape {first}, expected {tuple(shape)}")
    for m in bools[1:]:
        if m.shape != first:
            raise ValueError(f"masks of different shapes cannot be united: {first} vs {m.shape}")
    return dilate(np.logical_or.reduce(bools), dilate_px)


def _rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {arr.dtype} {arr.shape}")
    return arr


def cutout_on_white(image: Image.Image | np.ndarray, mask: np.ndarray, pad: int = 0) -> Image.Image:
    """The mask's pixels on pure white (255, 255, 255), cropped to the mask's box grown by `pad` pixels.

    `pad` leaves a white margin (clipped at the frame border) so a later aspect-fit onto the white video
    canvas does not put the subject against the canvas edge. Raises `EmptyMaskError` for an empty mask.
    """
    rgb = _rgb_array(image)
    mask = as_bool_mask(mask)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image size {rgb.shape[:2]}")
    bbox = mask_bbox(mask)
    if bbox is None:
        raise EmptyMaskError("cannot cut out an empty mask")
    h, w = mask.shape
    x0, y0, x1, y1 = pixel_bounds(
        Box(x0=bbox.x0 - pad, y0=bbox.y0 - pad, x1=bbox.x1 + pad, y1=bbox.y1 + pad), w, h
    )
    crop = rgb[y0:y1, x0:x1]
    out = np.where(mask[y0:y1, x0:x1, None], crop, np.uint8(255))
    return Image.fromarray(out, mode="RGB")


def face_crop(image: Image.Image | np.ndarray, box: Box, margin: float = 0.0) -> Image.Image:
    """Bounding-box crop of a face (no segmentation: the released loader uses plain crops).

    `margin` grows the box by that fraction of its size on every side first (clipped to the frame).
    """
    rgb = _rgb_array(image)
    h, w = rgb.shape[:2]
    if margin:
        box = box.expand(margin, w, h)
    x0, y0, x1, y1 = pixel_bounds(box, w, h)
    if x1 <= x0 or y1 <= y0:
        raise EmptyMaskError(f"face box {box.as_tuple()} lies outside the {w}x{h} frame")
    return Image.fromarray(np.ascontiguousarray(rgb[y0:y1, x0:x1]), mode="RGB")


def whole_person_cutout(
    image: Image.Image | np.ndarray,
    person_mask: np.ndarray,
    part_masks: Sequence[np.ndarray] = (),
    pad: int = 0,
) -> Image.Image:
    """One cut-out of a whole person on white: the person's mask united with its attribute masks.

    Attribute masks are added because accessories (a hat brim, a bag held at arm's length) often stick out of
    the mask SAM draws from the person box, and the whole-person condition must still show them.
    """
    return cutout_on_white(image, foreground_union([person_mask, *part_masks], dilate_px=0), pad=pad)
