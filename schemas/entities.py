"""Entities of a caption, as the entities stage asks Qwen2.5-VL for them.

`EntitiesAnswer` is what the model is asked to return for one video: the subjects (each bound to a numbered
person box), their attributes, the objects and the background, every phrase copied verbatim from the caption.
`EntitiesRecord` is the entities stage's per-video record around it. The sample built from them (the `meta.json`
relation graph the trainer reads) is `schemas.sample.SampleMeta`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from schemas.labels import LabelRole
from schemas.records import ModelInfo, Record

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
    # Extra keys a chatty model adds ("reason", "box") are dropped; the fields we need are checked strictly:
    # a person id is a JSON integer (not true, "1" or 1.0: a model that writes those is not pointing at a box
    # we drew), a phrase a JSON string (not a number coerced to one).
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)


class EntityAttribute(_Answer):
    phrase: StrictStr = Field(min_length=1, description="verbatim from the caption, e.g. 'red jacket'")
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
    person_id: StrictInt = Field(description="the number drawn on the person's box in the prior image")
    noun: StrictStr = Field(min_length=1, description="verbatim subject phrase, e.g. 'man on the left'")
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
    objects: list[StrictStr] = Field(default_factory=list)
    background: StrictStr | None = None

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


class DroppedLabel(Record):
    """An entity of a valid answer that the entities stage left out, and why (the rest of the answer is kept)."""

    role: LabelRole
    person_id: int | None = Field(None, description="the subject it belonged to (subjects and attributes)")
    label: str
    reason: str = Field(
        description="a schemas.labels reason (the label cannot be exported), 'overlapping_phrase' (part of a "
        "longer attribute of the same person) or 'shared_attribute' (entities.shared_attributes = drop)"
    )
    message: str


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
    dropped: list[DroppedLabel] = Field(
        default_factory=list, description="entities of the model's answer left out of `answer`, with reasons"
    )
    shared_attributes: dict[str, list[int]] = Field(
        default_factory=dict,
        description="attribute phrase -> the persons it is kept for, when more than one (entities."
        "shared_attributes = keep): MCAM's template arithmetic gives its words level 0 for those groups",
    )


# ------------------------------------------------------------------------------------------------ phrases
def appears_verbatim(phrase: str, text: str) -> bool:
    """Case-sensitive exact occurrence as whole words: 'man' is not found inside 'woman' or 'manly'.

    The trainer's cross-attention mask marks a label's tokens by exact token match, so a phrase that is only a
    substring of a longer word would condition nothing.
    """
    return bool(phrase) and re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text) is not None


# ------------------------------------------------------------------------------------------- visual binding check
BindingVerdict = Literal["verified", "failed", "unverified", "no_mask"]


class BindingScore(Record):
    """The visual check of one attribute binding (tasks/binding_check.py), scores averaged over the keyframes
    where the attribute has a valid mask. Cosine similarities of the checking model (not comparable across
    models: CLIP ~0.2-0.35 for a match, the colour matcher 0-1); region scores are shares of mask pixels."""

    key: str = Field(description="attr_<person_id>_<j>, as in the masks record")
    person_id: int
    label: str
    verdict: BindingVerdict = Field(
        description="verified: the crop matches its own phrase better than every other person's phrase and no "
        "check failed; failed: another person's phrase matches better, or more of the mask lies on another "
        "person; unverified: no evidence either "
        "way (no other person's phrase to compare, or the model sees no signal in the phrase); no_mask: no valid "
        "mask to look at"
    )
    reason: str | None = Field(None, description="why failed or unverified, in words")
    keyframes: list[int] = Field(default_factory=list)
    phrase_score: float | None = Field(None, description="crop vs its own phrase")
    other_phrase_score: float | None = Field(
        None, description="crop vs the best-matching other person's phrase"
    )
    other_phrase: str | None = None
    other_phrase_person: int | None = None
    region_score: float | None = Field(
        None, description="share of the attribute's mask inside its own person's region (SAM mask, else box)"
    )
    other_region_score: float | None = Field(
        None, description="the largest share of the mask inside another person's region"
    )
    other_region_person: int | None = None

    @property
    def phrase_margin(self) -> float | None:
        if self.phrase_score is None or self.other_phrase_score is None:
            return None
        return self.phrase_score - self.other_phrase_score


class BindingRecord(Record):
    """Output of the binding check for one video: one score per attribute of the entities answer."""

    video_id: str
    model: ModelInfo
    on_failure: Literal["drop", "fail"]
    attributes: list[BindingScore] = Field(default_factory=list)

    def get(self, key: str) -> BindingScore | None:
        return next((a for a in self.attributes if a.key == key), None)

    def dropped(self, key: str) -> bool:
        """Whether the sample must leave this attribute out (it failed and the policy is drop)."""
        score = self.get(key)
        return score is not None and score.verdict == "failed"
