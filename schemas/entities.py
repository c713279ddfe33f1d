"""Entities of a caption and the v2 sample relation graph.

Two layers live here:

- `EntitiesAnswer`: what Qwen2.5-VL is asked to return for one video: the subjects (each bound to a
  numbered person box), their attributes, the objects and the background, every phrase copied verbatim from
  the caption. `EntitiesRecord` is the entities stage's per-video record around it.
- `SampleMetaV2`: the `meta.json` of a curated v2 sample, i.e. the relation graph the trainer reads: subject
  groups (a face plus its attribute images, optionally a whole-person cut-out), objects and the background,
  each image given by its member name inside the same WebDataset sample. v1 samples (identity only: persons
  with a face and nothing else) are upgraded on read by `load_sample_meta`.

The JSON keys of `meta.json` are a contract with the trainer (lumosx_model/): `schema_version`, `key`,
`caption`, `video`, `persons[].{person_id,label,face,whole,attributes[].{label,image,mask}}`,
`objects[].{label,image,mask}`, `background.{label,image}`. Everything else (keyframes, boxes, scores, models)
is provenance added next to them.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.records import Box, ModelInfo, Record

AttributeKind = Literal["top", "bottom", "accessory", "hair", "other"]
ATTRIBUTE_KINDS: tuple[str, ...] = ("top", "bottom", "accessory", "hair", "other")

# Words a model uses for a kind instead of the asked-for enum value. The kind only steers the masks stage's
# grounding prompt, so an unknown kind becomes "other" instead of costing a retry.
_KIND_SYNONYMS = {
    "upper": "top",
    "upper_body": "top",
    "upper body": "top",
    "shirt": "top",
    "clothing_top": "top",
    "tops": "top",
    "lower": "bottom",
    "lower_body": "bottom",
    "lower body": "bottom",
    "pants": "bottom",
    "bottoms": "bottom",
    "accessories": "accessory",
    "jewelry": "accessory",
    "jewellery": "accessory",
    "headwear": "accessory",
    "hairstyle": "hair",
    "hair style": "hair",
    "haircut": "hair",
}


# ---------------------------------------------------------------------------------------------- model answer
class _Answer(BaseModel):
    # Extra keys a chatty model adds ("reason", "box") are dropped; the fields we need are checked strictly.
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)


class EntityAttribute(_Answer):
    phrase: str = Field(min_length=1, description="verbatim from the caption, e.g. 'red jacket'")
    kind: AttributeKind = "other"

    @field_validator("kind", mode="before")
    @classmethod
    def _normalise_kind(cls, kind: Any) -> Any:
        if kind is None:
            return "other"
        if isinstance(kind, str):
            k = kind.strip().lower()
            k = _KIND_SYNONYMS.get(k, k)
            return k if k in ATTRIBUTE_KINDS else "other"
        return kind


class EntitySubject(_Answer):
    person_id: int = Field(description="the number drawn on the person's box in the prior image")
    noun: str = Field(min_length=1, description="verbatim subject phrase, e.g. 'man on the left'")
    attributes: list[EntityAttribute] = Field(default_factory=list)

    @field_validator("attributes", mode="before")
    @classmethod
    def _bare_strings(cls, value: Any) -> Any:
        # Models often answer ["red jacket", ...] instead of [{"phrase": ...}]: the meaning is unambiguous.
        if isinstance(value, list):
            return [{"phrase": v} if isinstance(v, str) else v for v in value]
        return value


class EntitiesAnswer(_Answer):
    subjects: list[EntitySubject] = Field(default_factory=list)
    objects: list[str] = Field(default_factory=list)
    background: str | None = None

    @field_validator("background", mode="before")
    @classmethod
    def _empty_background(cls, value: Any) -> Any:
        # "", "none", "null" all mean "no background phrase".
        if isinstance(value, str) and value.strip().lower() in ("", "none", "null", "n/a"):
            return None
        return value

    @field_validator("objects", mode="before")
    @classmethod
    def _objects_none(cls, value: Any) -> Any:
        return [] if value is None else value

    def phrases(self) -> list[str]:
        out = [s.noun for s in self.subjects]
        out += [a.phrase for s in self.subjects for a in s.attributes]
        out += list(self.objects)
        if self.background is not None:
            out.append(self.background)
        return out


class EntitiesRecord(Record):
    """Output of the entities stage for one video."""

    video_id: str
    model: ModelInfo
    prompt_version: str = Field(
        description="prompt file name, e.g. entities_v1.txt (its text is fingerprinted)"
    )
    answer: EntitiesAnswer
    attempts: int = Field(ge=1, description="model calls until a valid answer (1 = first answer was valid)")
    prior_keyframes: list[int] = Field(description="keyframes shown to the model with numbered person boxes")
    prior_images: list[str] = Field(
        default_factory=list, description="the annotated images, work-dir relative"
    )


# --------------------------------------------------------------------------------------------- relation graph
_MEMBER = re.compile(r"^[a-z0-9_\-]+(\.[a-z0-9]+)+$")


def _check_member(name: str | None) -> str | None:
    # Member names become `<key>.<name>` inside a tar: no separators, no leading dot, an extension.
    if name is not None and not _MEMBER.match(name):
        raise ValueError(f"invalid sample member name {name!r} (expected e.g. 'face_0.png')")
    return name


class _Meta(BaseModel):
    # Unknown keys are kept (a newer writer may add provenance); known keys are typed.
    model_config = ConfigDict(extra="allow")


class AttributeEntity(_Meta):
    label: str
    kind: AttributeKind = "other"
    image: str = Field(description="SAM cut-out on white, tightly cropped")
    mask: str | None = Field(None, description="binary mask of the cut-out; absent for imported cases")
    keyframe: int | None = None
    box: Box | None = Field(None, description="grounding box on the keyframe, pixels")
    score: float | None = None

    @field_validator("image", "mask")
    @classmethod
    def _member_names(cls, name: str | None) -> str | None:
        return _check_member(name)


class SubjectGroup(_Meta):
    """One person: the face crop plus the attribute images bound to this person; the unit of CSAM and MCAM."""

    person_id: int
    label: str | None = Field(None, description="subject noun, verbatim in the caption; None in v1 samples")
    face: str = Field(description="member name of the bounding-box face crop")
    face_keyframe: int | None = None
    face_box: Box | None = None
    face_score: float | None = None
    attributes: list[AttributeEntity] = Field(default_factory=list)
    whole: str | None = Field(
        None, description="whole-person cut-out (used for 30 % of persons at train time)"
    )
    whole_mask: str | None = None
    whole_keyframe: int | None = None

    @field_validator("face", "whole", "whole_mask")
    @classmethod
    def _member_names(cls, name: str | None) -> str | None:
        return _check_member(name)


class ObjectEntity(_Meta):
    label: str
    image: str
    mask: str | None = None
    keyframe: int | None = None
    box: Box | None = None
    score: float | None = None

    @field_validator("image", "mask")
    @classmethod
    def _member_names(cls, name: str | None) -> str | None:
        return _check_member(name)


class BackgroundEntity(_Meta):
    label: str
    image: str = Field(description="inpainted clean plate")
    keyframe: int | None = None

    @field_validator("image")
    @classmethod
    def _member_names(cls, name: str | None) -> str | None:
        return _check_member(name)


class VideoInfo(_Meta):
    content_id: str | None = Field(
        None, description="content-derived video id: samples sharing it share people"
    )
    uri: str | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    duration_s: float | None = None
    num_frames: int | None = None


def appears_verbatim(phrase: str, text: str) -> bool:
    """Case-sensitive exact occurrence as whole words: 'man' is not found inside 'woman' or 'manly'.

    The trainer's cross-attention mask marks a label's tokens by exact token match, so a phrase that is only a
    substring of a longer word would condition nothing.
    """
    return bool(phrase) and re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text) is not None


class SampleMetaV2(_Meta):
    """`meta.json` of a v2 sample. Image fields are member names inside the same WebDataset sample."""

    schema_version: Literal[2] = 2
    key: str
    caption: str
    video: VideoInfo = Field(default_factory=VideoInfo)
    persons: list[SubjectGroup] = Field(default_factory=list)
    objects: list[ObjectEntity] = Field(default_factory=list)
    background: BackgroundEntity | None = None
    models: dict[str, ModelInfo] = Field(default_factory=dict, description="stage -> model that produced it")
    config_fingerprint: str | None = None
    random_weights: bool = Field(
        False, description="True if ANY model behind this sample had random test weights"
    )
    random_weight_stages: list[str] = Field(default_factory=list)
    upgraded_from: int | None = Field(None, description="1 when read from a v1 (identity-only) sample")

    @model_validator(mode="after")
    def _consistent(self) -> SampleMetaV2:
        ids = [p.person_id for p in self.persons]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate person_id in {ids}")
        members = self.members()
        if len(set(members)) != len(members):
            raise ValueError(f"an image member is used twice: {sorted(members)}")
        for label in self.labels():
            if not appears_verbatim(label, self.caption):
                raise ValueError(f"label {label!r} does not appear verbatim in the caption")
        return self

    @property
    def groups(self) -> list[SubjectGroup]:
        return self.persons

    def labels(self) -> list[str]:
        out = [p.label for p in self.persons if p.label is not None]
        out += [a.label for p in self.persons for a in p.attributes]
        out += [o.label for o in self.objects]
        if self.background is not None:
            out.append(self.background.label)
        return out

    def members(self) -> list[str]:
        """Every image/mask member the sample must contain."""
        out: list[str] = []
        for p in self.persons:
            out.append(p.face)
            out += [m for m in (p.whole, p.whole_mask) if m]
            for a in p.attributes:
                out += [m for m in (a.image, a.mask) if m]
        for o in self.objects:
            out += [m for m in (o.image, o.mask) if m]
        if self.background is not None:
            out.append(self.background.image)
        return out

    @property
    def num_persons(self) -> int:
        return len(self.persons)

    @property
    def has_subject_conditions(self) -> bool:
        """True when the sample carries more than faces (the subject-consistent task needs it)."""
        return bool(self.objects or self.background or any(p.attributes for p in self.persons))


def load_sample_meta(data: dict[str, Any]) -> SampleMetaV2:
    """Parse a sample's meta.json; a v1 (identity-only) sample is upgraded in memory.

    v1 persons carry a face and provenance only (label None, no attributes); v1 has no objects or background.
    Every other v1 key is kept as-is (the v2 model allows extra keys), so nothing is lost on the way.
    """
    version = data.get("schema_version", 1)
    if version == 2:
        return SampleMetaV2.model_validate(data)
    if version != 1:
        raise ValueError(f"unsupported meta.json schema_version {version!r}")
    upgraded = dict(data, schema_version=2, upgraded_from=1)
    upgraded["persons"] = [dict(p, attributes=[], whole=None) for p in data.get("persons") or []]
    upgraded["objects"] = []
    upgraded["background"] = None
    return SampleMetaV2.model_validate(upgraded)


def dump_sample_meta(meta: SampleMetaV2) -> bytes:
    """meta.json bytes. Nulls are kept: the trainer reads `whole: null` and `background: null` as absent."""
    import json

    return json.dumps(meta.model_dump(mode="json"), ensure_ascii=False, sort_keys=True).encode("utf-8")
