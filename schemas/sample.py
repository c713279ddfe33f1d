"""What lands in the shards: the per-sample `meta.json`, the manifest row, the shard index.

A shard sample is a WebDataset group of files sharing one key (no dots, [a-z0-9_]):
    <key>.mp4              the clip (H.264 mp4 bytes)
    <key>.caption.txt      the caption (utf-8)
    <key>.face_<i>.png     one bounding-box face crop per person with a usable face (i = person_id)
    <key>.meta.json        `SampleMeta`, versioned by `schema_version`
  v2 samples add the subject conditions (tasks/sample.py lists their member names): attribute, whole-person
  and object cut-outs with their masks, and the background clean plate.
Readers need nothing from this project: plain `webdataset` plus `json`.

`meta.json` has one model, `SampleMeta`, for both versions; `schema_version` says what the sample carries:

- 1, identity-consistent: persons with a face crop and nothing else (`label`, `whole` null, `attributes`,
  `objects` empty, `background` null). The identity-only curation path keeps writing 1, so a reader with plain
  `json` can tell from one integer that a sample has no subject conditions, and existing v1 samples are not
  redone;
- 2, subject-consistent: each person is a subject group bound to its words in the caption (`label`), with
  its attribute cut-outs and optionally a whole-person cut-out, plus objects and a background plate.

Both versions write the same keys (v1 with the v2 ones empty), so a plain-json reader needs no version switch
to find them. The keys the trainer (lumosx_model/) reads are a contract: `schema_version`, `key`, `caption`,
`video.{width,height}`, `persons[].{person_id,label,face,whole,attributes[].{label,image,mask}}`,
`objects[].{label,image,mask}`, `background.{label,image}` or null. Everything else (keyframes, boxes, scores,
models, fingerprints) is provenance next to them. Image fields are member names inside the same sample.

Parse with `load_sample_meta` (the one reader), write with `dump_sample_meta` (the one writer).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from schemas.entities import AttributeKind, BindingScore, appears_verbatim
from schemas.records import Box, FaceQuality, ModelInfo, Record

SchemaVersion = Literal[1, 2]
SCHEMA_VERSIONS: tuple[int, ...] = (1, 2)
"""1 = identity-consistent samples (clip, caption, faces). 2 adds attribute/object/background conditions."""

# Every model below is a `Record` (extra="forbid"), on write AND on read, deliberately: a key a writer adds is
# a schema change and comes with a new `schema_version`, which `load_sample_meta` refuses with a clear message.
# So within a version the key set is fixed, a typo in a writer fails its tests instead of shipping, and no
# reader ever sees a key it does not know the meaning of.

_MEMBER = re.compile(r"^[a-z0-9_\-]+(\.[a-z0-9]+)+$")


def _check_member(name: str | None) -> str | None:
    # Member names become `<key>.<name>` inside a tar: no separators, no leading dot, an extension.
    if name is not None and not _MEMBER.match(name):
        raise ValueError(f"invalid sample member name {name!r} (expected e.g. 'face_0.png')")
    return name


class SampleVideo(Record):
    """The source video and the clip cut from it. Optional: imported official cases have no video."""

    uri: str | None = None
    content_id: str | None = Field(
        None, description="content-derived video id: samples sharing it share people"
    )
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    duration_s: float | None = None
    num_frames: int | None = None
    clip_width: int | None = None
    clip_height: int | None = None
    clip_reencoded: bool | None = None


class SampleKeyframe(Record):
    index: int
    position: float
    time_s: float
    frame_index: int


class SampleAttribute(Record):
    """An attribute of one person (v2): its cut-out on white, tightly cropped, and the cut-out's mask."""

    label: str = Field(description="verbatim in the caption, e.g. 'red jacket'")
    kind: AttributeKind = "other"
    image: str = Field(description="SAM cut-out on white, tightly cropped")
    mask: str | None = Field(None, description="binary mask of the cut-out; absent for imported cases")
    keyframe: int | None = None
    box: Box | None = Field(None, description="grounding box on the keyframe, pixels")
    score: float | None = Field(None, description="grounding score")
    mask_score: float | None = Field(None, description="SAM's predicted IoU")
    cutout_box: Box | None = Field(None, description="the cut-out's crop in the keyframe, pixels")
    binding: BindingScore | None = Field(
        None,
        description="the visual binding check (tasks/binding_check.py): verdict and the scores against its own "
        "and the other persons' phrases and regions; None for samples made before it or imported cases",
    )

    @field_validator("image", "mask")
    @classmethod
    def _member_names(cls, name: str | None) -> str | None:
        return _check_member(name)


class SamplePerson(Record):
    """One person with a usable face. In v2 also a subject group: the unit of CSAM and MCAM."""

    person_id: int
    label: str | None = Field(None, description="subject phrase verbatim in the caption (v2); None in v1")
    face: str = Field(description="member name of the bounding-box face crop, e.g. face_0.png")
    face_keyframe: int | None = None
    face_box: Box | None = None
    face_score: float | None = None
    face_quality: FaceQuality | None = None
    boxes: dict[int, Box] = Field(default_factory=dict, description="keyframe index -> person box, pixels")
    scores: dict[int, float] = Field(default_factory=dict, description="keyframe index -> person score")
    attributes: list[SampleAttribute] = Field(default_factory=list)
    whole: str | None = Field(
        None, description="whole-person cut-out (used for 30 % of persons at train time)"
    )
    whole_mask: str | None = None
    whole_keyframe: int | None = None
    whole_box: Box | None = None

    @field_validator("face", "whole", "whole_mask")
    @classmethod
    def _member_names(cls, name: str | None) -> str | None:
        return _check_member(name)


class SampleObject(Record):
    label: str
    image: str
    mask: str | None = None
    keyframe: int | None = None
    box: Box | None = None
    score: float | None = None
    mask_score: float | None = None
    cutout_box: Box | None = None

    @field_validator("image", "mask")
    @classmethod
    def _member_names(cls, name: str | None) -> str | None:
        return _check_member(name)


class SampleBackground(Record):
    label: str
    image: str = Field(description="inpainted clean plate")
    keyframe: int | None = None
    seed: int | None = Field(None, description="FLUX Fill seed of the accepted plate")

    @field_validator("image")
    @classmethod
    def _member_names(cls, name: str | None) -> str | None:
        return _check_member(name)


class PlateAttempt(Record):
    """One clean-plate generation of the background stage."""

    seed: int
    inpainted: bool = Field(description="False when nothing had to be removed (the frame is its own plate)")
    persons_found: int = Field(
        description="person detections on the plate (same filters as the persons stage)"
    )
    best_person_score: float | None = None
    best_person_box: Box | None = None


class BackgroundStatus(Record):
    """Why the sample has (or has no) background plate, and what it cost."""

    status: Literal["ok", "skipped", "rejected"]
    reason: str | None = None
    keyframe: int | None = None
    flux_calls: int = 0
    attempts: list[PlateAttempt] = Field(default_factory=list)


class PersonWithoutFace(Record):
    person_id: int
    reason: str


class DroppedEntity(Record):
    """An entity of the caption that has no condition image in the sample, and why."""

    entity: str = Field(description="entity key, e.g. attr_0_1, object_2, person_0, face_1")
    label: str | None = None
    reason: str


class SampleMeta(Record):
    """`meta.json` of a shard sample, v1 or v2 (see the module docstring)."""

    schema_version: SchemaVersion
    key: str
    caption: str
    caption_source: str | None = None
    video: SampleVideo = Field(default_factory=SampleVideo)
    keyframes: list[SampleKeyframe] = Field(default_factory=list)
    persons: list[SamplePerson] = Field(default_factory=list)
    persons_without_face: list[PersonWithoutFace] = Field(default_factory=list)
    persons_unbound: list[int] = Field(
        default_factory=list, description="persons with a face that no caption subject was bound to (v2)"
    )
    objects: list[SampleObject] = Field(default_factory=list)
    background: SampleBackground | None = None
    background_status: BackgroundStatus | None = None
    selection: dict[str, int] = Field(default_factory=dict, description="entity key -> keyframe of its image")
    selection_seed: str | None = None
    dropped: list[DroppedEntity] = Field(default_factory=list)
    models: dict[str, ModelInfo] = Field(default_factory=dict, description="stage -> model that produced it")
    random_weights: bool = Field(
        False, description="True if ANY model behind this sample had random test weights"
    )
    random_weight_stages: list[str] = Field(default_factory=list)
    config_fingerprint: str | None = None
    stage_fingerprints: dict[str, str] = Field(default_factory=dict)
    producer: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> SampleMeta:
        ids = [p.person_id for p in self.persons]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate person_id in {ids}")
        members = self.members()
        if len(set(members)) != len(members):
            raise ValueError(f"an image member is used twice: {sorted(members)}")
        if self.schema_version == 1 and (self.labels() or any(p.whole for p in self.persons)):
            raise ValueError("schema_version 1 samples carry faces only (no labels, cut-outs or background)")
        for label in self.labels():
            if not appears_verbatim(label, self.caption):
                raise ValueError(f"label {label!r} does not appear verbatim in the caption")
        return self

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
    def has_subject_conditions(self) -> bool:
        """True when the sample carries more than faces (the subject-consistent task needs it)."""
        return bool(self.objects or self.background or any(p.attributes for p in self.persons))


def load_sample_meta(data: Mapping[str, Any] | str | bytes) -> SampleMeta:
    """Parse a sample's meta.json (its bytes/text or the decoded dict), v1 or v2: the one reader of it.

    Raises ValueError for an unknown `schema_version` and pydantic.ValidationError (also a ValueError) for a
    meta that does not follow it.
    """
    if isinstance(data, (str, bytes)):
        data = json.loads(data)
    if not isinstance(data, Mapping):
        raise ValueError(f"meta.json must hold a JSON object, not {type(data).__name__}")
    version = data.get("schema_version")
    if version not in SCHEMA_VERSIONS:
        raise ValueError(
            f"unsupported meta.json schema_version {version!r} (this reader knows {list(SCHEMA_VERSIONS)})"
        )
    if "upgraded_from" in data and data["upgraded_from"] is None:
        # Written (always null) by the v2 writer before v1 and v2 shared one model; carries no information.
        data = {k: v for k, v in data.items() if k != "upgraded_from"}
    return SampleMeta.model_validate(data)


def dump_sample_meta(meta: SampleMeta) -> bytes:
    """meta.json bytes. Nulls are kept: the trainer reads `whole: null` and `background: null` as absent."""
    return json.dumps(meta.model_dump(mode="json"), ensure_ascii=False, sort_keys=True, indent=1).encode(
        "utf-8"
    )


class SampleRecord(Record):
    """The sample stage's record: what one video contributes to the shards (the member bytes travel beside it).

    Its fields are the sample's manifest row, less the shard the writer puts it in (`MANIFEST_SCHEMA`).
    """

    key: str
    members: list[str]
    schema_version: int
    video_id: str
    uri: str
    caption: str
    caption_source: str
    num_persons: int
    num_faces: int
    duration_s: float
    fps: float
    width: int
    height: int
    num_bytes: int
    random_weights: bool
    config_fingerprint: str
    models: dict[str, str] = Field(
        default_factory=dict,
        description="stage -> 'model_id@revision' of the weights that made it (empty in rows of older runs)",
    )

    def manifest_row(self, shard: str) -> dict[str, Any]:
        row = self.model_dump(exclude={"members"})
        row["shard"] = shard
        return row


class ShardEntry(Record):
    url: str = Field(description="shard file name, relative to the shards directory")
    count: int
    num_bytes: int
    sha256: str
    keys: list[str]
    sample_fingerprints: dict[str, str] = Field(description="key -> fingerprint of the sample it holds")


class ShardIndex(Record):
    schema_version: int = Field(1, description="version of the index format (not of the samples)")
    shards: list[ShardEntry] = Field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)


MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("schema_version", pa.int16(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("caption_source", pa.string(), nullable=False),
        pa.field("num_persons", pa.int16(), nullable=False),
        pa.field("num_faces", pa.int16(), nullable=False),
        pa.field("duration_s", pa.float32(), nullable=False),
        pa.field("fps", pa.float32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("num_bytes", pa.int64(), nullable=False),
        pa.field("random_weights", pa.bool_(), nullable=False),
        pa.field("config_fingerprint", pa.string(), nullable=False),
        # stage -> "model_id@revision" (revision: git:<commit>, sha256:<hash>, pkg:<dist>==<version>, random-init)
        pa.field("models", pa.map_(pa.string(), pa.string())),
    ],
    metadata={"producer": "lumosx-curate", "description": "one row per shard sample"},
)

FAILURES_SCHEMA = pa.schema(
    [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error_class", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("time", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
