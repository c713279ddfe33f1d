"""What lands in the shards: the per-sample `meta.json`, the manifest row, the shard index.

A shard sample is a WebDataset group of files sharing one key (no dots, [a-z0-9_]):
    <key>.mp4            the clip (H.264 mp4 bytes)
    <key>.caption.txt    the caption (utf-8)
    <key>.face_<i>.png   one bounding-box face crop per person with a usable face (i = person_id)
    <key>.meta.json      `SampleMeta`, versioned by `schema_version`
Readers need nothing from this project: plain `webdataset` plus `json`.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field

from schemas.records import Box, FaceQuality, ModelInfo, Record

SCHEMA_VERSION = 1
"""1 = identity-consistent samples (clip, caption, faces). 2 adds attribute/object/background conditions."""


class SampleVideo(Record):
    uri: str
    content_id: str
    fps: float
    width: int
    height: int
    duration_s: float
    num_frames: int
    clip_width: int
    clip_height: int
    clip_reencoded: bool


class SampleKeyframe(Record):
    index: int
    position: float
    time_s: float
    frame_index: int


class SamplePerson(Record):
    person_id: int
    label: str | None = Field(None, description="subject phrase verbatim in the caption (v2); None in v1")
    face: str = Field(description="member name of the face crop inside this sample, e.g. face_0.png")
    whole: str | None = None
    attributes: list[dict[str, Any]] = Field(default_factory=list)
    face_keyframe: int
    face_box: Box
    face_score: float
    face_quality: FaceQuality | None = None
    boxes: dict[int, Box] = Field(description="person box per keyframe index, in source-frame pixels")


class PersonWithoutFace(Record):
    person_id: int
    reason: str


class SampleMeta(Record):
    schema_version: int = SCHEMA_VERSION
    key: str
    caption: str
    caption_source: str
    video: SampleVideo
    keyframes: list[SampleKeyframe]
    persons: list[SamplePerson]
    persons_without_face: list[PersonWithoutFace] = Field(default_factory=list)
    objects: list[dict[str, Any]] = Field(default_factory=list)
    background: dict[str, Any] | None = None
    models: dict[str, ModelInfo]
    random_weights: bool = Field(description="True if ANY model that produced this sample had random weights")
    random_weight_stages: list[str] = Field(default_factory=list)
    config_fingerprint: str
    stage_fingerprints: dict[str, str]
    producer: str


class SampleRecord(Record):
    """The sample stage's record: where the assembled sample lives in the work directory."""

    key: str
    directory: str
    members: list[str]
    num_bytes: int
    num_persons: int
    num_faces: int


class ShardEntry(Record):
    url: str = Field(description="shard file name, relative to the shards directory")
    count: int
    num_bytes: int
    sha256: str
    keys: list[str]
    sample_fingerprints: dict[str, str] = Field(description="key -> fingerprint of the sample it holds")


class ShardIndex(Record):
    schema_version: int = SCHEMA_VERSION
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
