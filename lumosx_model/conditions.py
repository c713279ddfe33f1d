"""Condition images -> white canvases of the video size -> one-frame Wan VAE latents.

Every condition image (background clean plate, object / attribute cut-out on white, face crop, or a
whole-person cut-out) is fitted, aspect kept, onto a white canvas of the video size and VAE-encoded on its own
as a one-frame latent (SPEC §2). At train time the released loader's augmentations run before the padding, so
the padding stays pure white whatever the augmentation did to the image.

Sources of conditions:
- curated shard samples (``meta.json`` + member images), with the train-time choices: at most
  ``max_subjects`` persons and ``max_attributes`` attributes each, and a person given as its whole-person
  cut-out instead of its face + attributes group with probability ``whole_person_prob``;
- official case folders (:mod:`schemas.official_case`) at inference.

Ordering is always canonical (background, objects, then per group face and attributes), so tensors, layouts
and MCAM templates line up index by index.
"""

from __future__ import annotations

import io
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import v2

from lumosx_model.config import AugmentConfig
from lumosx_model.layout import Condition, SampleLayout
from schemas.official_case import OfficialCase
from schemas.sample import SampleMeta, load_sample_meta

WHITE = (255, 255, 255)


class SampleFormatError(ValueError):
    """A shard sample whose meta.json or members do not follow the curated sample format."""


class TooManyConditionsError(ValueError):
    """A sample or case has more condition images than the fixed number of condition slots."""


@dataclass(frozen=True)
class ConditionImage:
    condition: Condition
    image: Image.Image


def load_rgb(data: bytes) -> Image.Image:
    """Decode an image; transparent pixels (cut-outs with alpha) become white, as on the released loader."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            canvas = Image.new("RGB", rgba.size, WHITE)
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            return canvas
        return im.convert("RGB")


def fit_size(image_size: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of an image of ``image_size`` (w, h) fitted inside ``canvas`` (h, w), aspect kept."""
    w, h = image_size
    ch, cw = canvas
    ratio = min(cw / w, ch / h)
    return max(1, int(w * ratio)), max(1, int(h * ratio))


def pad_on_white(image: Image.Image, canvas: tuple[int, int]) -> Image.Image:
    """Paste ``image`` centered on a white canvas of (height, width) ``canvas``."""
    ch, cw = canvas
    out = Image.new("RGB", (cw, ch), WHITE)
    out.paste(image, ((cw - image.width) // 2, (ch - image.height) // 2))
    return out


def fit_on_white(image: Image.Image, canvas: tuple[int, int]) -> Image.Image:
    """The inference-time transform: aspect-fit (bicubic) and center on white."""
    return pad_on_white(image.resize(fit_size(image.size, canvas), Image.BICUBIC), canvas)


def to_model_range(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float ``[3, H, W]`` in [-1, 1]."""
    return v2.functional.to_dtype(v2.functional.pil_to_tensor(image), torch.float32, scale=True) * 2 - 1


class ConditionAugment:
    """The released loader's train-time condition augmentation, on torchvision.transforms.v2, seeded per call.

    Non-background images: aspect-fit + random resized crop (scale 0.67-1) -> random downscale -> affine
    (±20°, slight shear, white fill) -> brightness / contrast / saturation jitter -> horizontal flip -> slight
    blur -> white padding to the video size. The background skips downscale and flip (it fills the frame).
    """

    def __init__(self, cfg: AugmentConfig, canvas: tuple[int, int]) -> None:
        self.cfg = cfg
        self.canvas = canvas
        affine = v2.RandomApply(
            [
                v2.RandomAffine(
                    degrees=cfg.affine_degrees,
                    shear=(-cfg.affine_shear, cfg.affine_shear, -cfg.affine_shear, cfg.affine_shear),
                    fill=255,
                )
            ],
            p=cfg.affine_p,
        )
        contrast = v2.RandomApply(
            [v2.ColorJitter(contrast=cfg.contrast_saturation, saturation=cfg.contrast_saturation)],
            p=cfg.contrast_saturation_p,
        )
        blur = v2.RandomApply([v2.GaussianBlur(kernel_size=3, sigma=cfg.blur_sigma)], p=cfg.blur_p)
        self._foreground = v2.Compose(
            [
                affine,
                v2.RandomApply([v2.ColorJitter(brightness=cfg.brightness)], p=cfg.brightness_p),
                contrast,
                v2.RandomHorizontalFlip(p=cfg.hflip_p),
                blur,
            ]
        )
        self._background = v2.Compose(
            [
                affine,
                v2.RandomApply([v2.ColorJitter(brightness=cfg.brightness)], p=cfg.background_brightness_p),
                contrast,
                blur,
            ]
        )

    def _fit_and_crop(self, image: Image.Image) -> Image.Image:
        w, h = fit_size(image.size, self.canvas)
        fitted = image.resize((w, h), Image.BICUBIC)
        crop = v2.RandomResizedCrop(size=(h, w), scale=self.cfg.crop_scale, antialias=True)
        return crop(fitted)

    def _downscale(self, image: Image.Image) -> Image.Image:
        min_scale = min(self.cfg.downscale_min_pixels / max(image.size), 1.0)
        scale = min_scale + (1.0 - min_scale) * float(torch.rand(()))
        size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
        return image.resize(size, Image.BILINEAR)

    def __call__(self, image: Image.Image, kind: str, seed: int) -> Image.Image:
        # fork_rng: the transforms draw from torch's global RNG; forking keeps them reproducible per (sample,
        # image) and leaves the training RNG (noise, sigmas) untouched, which exact resume relies on.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            image = self._fit_and_crop(image)
            if kind == "background":
                image = self._background(image)
            else:
                image = self._foreground(self._downscale(image))
        return pad_on_white(image, self.canvas)


def condition_pixels(
    conditions: Sequence[ConditionImage],
    canvas: tuple[int, int],
    *,
    augment: ConditionAugment | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """``[N, 3, H, W]`` in [-1, 1]: each image augmented (train) or plainly fitted (inference) on white."""
    if not conditions:
        return torch.zeros((0, 3, *canvas))
    images = []
    for i, ci in enumerate(conditions):
        if augment is None:
            images.append(fit_on_white(ci.image, canvas))
        else:
            images.append(augment(ci.image, ci.condition.kind, seed=mix_seed(seed, i)))
    return torch.stack([to_model_range(im) for im in images])


def encode_conditions(encoders, pixels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Zero-padded condition pixels ``[B, Nmax, 3, H, W]`` -> zero-padded latents ``[B, Nmax, z, H/8, W/8]``.

    Only the ``counts[b]`` real images of each sample are encoded; padding slots stay exactly zero.
    """
    b, n_max = pixels.shape[:2]
    z = encoders.vae.config.z_dim
    out = torch.zeros((b, n_max, z, pixels.shape[-2] // 8, pixels.shape[-1] // 8), device=encoders.device)
    valid = torch.arange(n_max).unsqueeze(0) < counts.cpu().unsqueeze(1)  # [B, Nmax]
    if valid.any():
        out[valid.to(out.device)] = encoders.encode_images(pixels[valid]).to(out.device)
    return out


# ----------------------------------------------------------------------------------------------- sources
def _member(members: Mapping[str, bytes], name: object, what: str) -> bytes:
    if not isinstance(name, str) or name not in members:
        raise SampleFormatError(f"{what}: member {name!r} is missing from the sample")
    return members[name]


def conditions_from_meta(
    meta: SampleMeta | Mapping[str, object],
    members: Mapping[str, bytes],
    *,
    rng: random.Random,
    max_subjects: int = 3,
    max_attributes: int = 3,
    max_objects: int | None = None,
    whole_person_prob: float = 0.3,
    whole_person_as_object: bool = False,
    use_objects: bool = True,
    use_background: bool = True,
) -> list[ConditionImage]:
    """The conditions of one curated shard sample, in canonical order, with the train-time random choices.

    ``meta`` is the sample's parsed meta.json (a dict is read with :func:`schemas.sample.load_sample_meta`,
    v1 or v2). ``members`` maps member names of the sample (``"face_0.png"``) to their bytes. Persons beyond
    ``max_subjects``, attributes beyond ``max_attributes`` and objects beyond ``max_objects`` (None: no cap) are
    dropped at random (order kept). A person
    with a whole-person cut-out is given as that single image (a group of one ``face``-kind condition
    labelled with the person's phrase) with probability ``whole_person_prob``. With
    ``whole_person_as_object`` it is stored as the released LumosX loader stores it: a non-human entry
    (``object`` kind after the other objects: object position, its own word mask, no negative MCAM level
    against the other persons), and the remaining persons' groups are renumbered.
    """
    if not isinstance(meta, SampleMeta):
        try:
            meta = load_sample_meta(meta)
        except ValueError as err:  # pydantic's ValidationError included
            raise SampleFormatError(f"invalid meta.json: {err}") from err
    persons = list(meta.persons)
    if len(persons) > max_subjects:
        keep = sorted(rng.sample(range(len(persons)), max_subjects))
        persons = [persons[i] for i in keep]

    out: list[ConditionImage] = []
    background = meta.background
    if use_background and background is not None:
        out.append(
            ConditionImage(
                Condition("background", background.label),
                load_rgb(_member(members, background.image, "background")),
            )
        )
    if use_objects:
        objects = list(meta.objects)
        # Drawn only when over the cap, so samples within it keep the random stream they always had.
        if max_objects is not None and len(objects) > max_objects:
            objects = [objects[i] for i in sorted(rng.sample(range(len(objects)), max_objects))]
        for obj in objects:
            out.append(
                ConditionImage(
                    Condition("object", obj.label), load_rgb(_member(members, obj.image, "object"))
                )
            )
    groups: list[ConditionImage] = []
    group = -1
    for person in persons:
        # Draw for every person (even without a whole image) so the random stream does not depend on it.
        use_whole = rng.random() < whole_person_prob
        if person.whole and use_whole:
            whole = load_rgb(_member(members, person.whole, "whole"))
            if whole_person_as_object:  # objects precede groups in the canonical order
                out.append(ConditionImage(Condition("object", person.label), whole))
            else:
                group += 1
                groups.append(ConditionImage(Condition("face", person.label, group), whole))
            continue
        group += 1
        groups.append(
            ConditionImage(
                Condition("face", person.label, group), load_rgb(_member(members, person.face, "face"))
            )
        )
        attributes = person.attributes
        if len(attributes) > max_attributes:
            keep = sorted(rng.sample(range(len(attributes)), max_attributes))
            attributes = [attributes[i] for i in keep]
        for attr in attributes:
            groups.append(
                ConditionImage(
                    Condition("attribute", attr.label, group),
                    load_rgb(_member(members, attr.image, "attribute")),
                )
            )
    out.extend(groups)
    layout_of(out)  # built in canonical order; fail loudly if that ever changes
    return out


def conditions_from_case(case: OfficialCase, *, identity_only: bool = False) -> list[ConditionImage]:
    """The conditions of an official case folder (all of them, or faces only for the identity task)."""
    if identity_only:
        case = case.faces_only()
    out: list[ConditionImage] = []
    if case.background is not None:
        out.append(
            ConditionImage(
                Condition("background", case.background.label), load_rgb(case.background.read_bytes())
            )
        )
    for obj in case.objects:
        out.append(ConditionImage(Condition("object", obj.label), load_rgb(obj.read_bytes())))
    for group, subject in enumerate(case.subjects):
        out.append(
            ConditionImage(Condition("face", subject.face.label, group), load_rgb(subject.face.read_bytes()))
        )
        for attr in subject.attributes:
            out.append(ConditionImage(Condition("attribute", attr.label, group), load_rgb(attr.read_bytes())))
    layout_of(out)  # built in canonical order; fail loudly if that ever changes
    return out


def layout_of(conditions: Sequence[ConditionImage]) -> SampleLayout:
    """The layout of conditions built in canonical order (raises LayoutError if they are not)."""
    return SampleLayout(tuple(c.condition for c in conditions))


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (stable across processes, unlike hash())."""
    acc = 0x9E3779B97F4A7C15
    for v in values:
        acc = (acc ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        acc ^= acc >> 31
    return acc & 0x7FFFFFFFFFFFFFFF
