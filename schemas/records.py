"""Per-stage records of the curation pipeline.

Every stage makes one small record per video; pixels live next to it in the video's media (tasks/base.py,
`VideoContext.media`) and records refer to them by name. Records never hold frames or tensors, so they are
cheap to keep in the resume ledger and to diff between runs.
"""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Record(BaseModel):
    """Base of every record: frozen field set, unknown keys rejected (a typo is a bug, not extra data)."""

    model_config = ConfigDict(extra="forbid")


class ModelInfo(Record):
    """What produced a result; copied into every sample's metadata."""

    backend: str
    model_id: str | None = None
    revision: str | None = None
    """The weights that were loaded: `git:<commit>`, `sha256:<hash>`, `pkg:<dist>==<version>`, `random-init` or
    `unresolved:<what was asked>` (models/provenance.py)."""
    random_weights: bool = False
    """True for test builds (tiny random weights): their outputs are not data and are flagged loudly."""


class Box(Record):
    """Axis-aligned box in pixel coordinates of the image it was found on, (x0, y0) top-left, exclusive end."""

    x0: float
    y0: float
    x1: float
    y1: float

    @model_validator(mode="after")
    def _ordered(self) -> Box:
        if not (self.x1 >= self.x0 and self.y1 >= self.y0):
            raise ValueError(f"box corners out of order: {self}")
        return self

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2)

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)

    @classmethod
    def from_tuple(cls, xyxy) -> Box:
        x0, y0, x1, y1 = (float(v) for v in xyxy)
        return cls(x0=x0, y0=y0, x1=x1, y1=y1)

    def intersection(self, other: Box) -> float:
        w = min(self.x1, other.x1) - max(self.x0, other.x0)
        h = min(self.y1, other.y1) - max(self.y0, other.y0)
        return max(0.0, w) * max(0.0, h)

    def iou(self, other: Box) -> float:
        inter = self.intersection(other)
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0

    def fraction_inside(self, other: Box) -> float:
        """Share of this box's area that lies inside `other` (1.0 = fully inside)."""
        return self.intersection(other) / self.area if self.area > 0 else 0.0

    def pixel_bounds(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Integer (x0, y0, x1, y1) covering every pixel the box touches, clipped to a width x height image.

        Rounding outward (floor the start, ceil the end) never cuts a sliver off a face or a region; the result
        can be empty (x1 <= x0) when the box lies outside the image.
        """
        x0 = min(max(math.floor(self.x0), 0), width)
        y0 = min(max(math.floor(self.y0), 0), height)
        x1 = min(max(math.ceil(self.x1), 0), width)
        y1 = min(max(math.ceil(self.y1), 0), height)
        return x0, y0, max(x0, x1), max(y0, y1)

    def clip(self, width: float, height: float) -> Box:
        return Box(
            x0=min(max(self.x0, 0.0), width),
            y0=min(max(self.y0, 0.0), height),
            x1=min(max(self.x1, 0.0), width),
            y1=min(max(self.y1, 0.0), height),
        )

    def expand(self, fraction: float, width: float, height: float) -> Box:
        """Grow by `fraction` of the size on every side, clipped to the image."""
        dx, dy = self.width * fraction, self.height * fraction
        return Box(x0=self.x0 - dx, y0=self.y0 - dy, x1=self.x1 + dx, y1=self.y1 + dy).clip(width, height)


class SourceFile(Record):
    """A file discovery found: what the run knows about it before reading a byte of it."""

    uri: str = Field(description="the path or URL as discovered (a symlink keeps its own path)")
    size: int
    version: str = Field(
        description="changes when the file does: 'size:mtime_ns' for local files, the ETag or mtime remotely"
    )
    sidecar: str | None = Field(None, description="the caption file <stem>.txt beside it (its real path)")
    sidecar_version: str | None = None
    sidecar_problem: str | None = Field(
        None, description="why the <stem>.txt beside it cannot be its caption (outside the input, not a file)"
    )
    video_id: str | None = Field(
        None, description="content id from the ledger when this uri was seen before with the same version"
    )
    seed_part: str | None = Field(
        None, description="ledger part holding this file's reusable stage records (resumed runs)"
    )

    @property
    def uri_key(self) -> str:
        """Id for a file whose bytes cannot be read (its failure row still needs a key): hash of the uri."""
        return "u" + hashlib.blake2b(self.uri.encode(), digest_size=10).hexdigest()

    @property
    def state(self) -> str:
        """Everything about the file and its sidecar that, changed, makes earlier results stale."""
        return f"{self.version}|{self.sidecar_version or ''}|{self.sidecar_problem or ''}"


class VideoRecord(Record):
    """Output of ingest: what the file is, probed with PyAV."""

    video_id: str = Field(description="content-derived id: survives renames; [a-z0-9_] only, safe as tar key")
    uri: str
    size_bytes: int
    container: str
    codec: str
    width: int = Field(description="display width: of the upright picture, after `rotation` and `mirrored`")
    height: int = Field(
        description="display height; the coded frame is height x width when rotation is 90/270"
    )
    fps: float
    duration_s: float
    num_frames: int
    has_audio: bool = False
    sidecar_caption: str | None = None
    rotation: Literal[0, 90, 180, 270] = Field(
        0,
        description="degrees clockwise a player turns the decoded frames to show them upright (the container's "
        "display matrix; phones film portrait as landscape frames + 90). Curation outputs are already turned.",
    )
    mirrored: bool = Field(
        False, description="the display matrix also mirrors left-right (after the rotation)"
    )


class CaptionRecord(Record):
    video_id: str
    caption: str
    source: Literal["model", "sidecar"]
    model: ModelInfo | None = None
    frame_times_s: list[float] = Field(default_factory=list, description="times of the frames the model saw")


class Keyframe(Record):
    index: int = Field(description="0, 1, 2 for the 5 %, 50 %, 95 % keyframes")
    position: float = Field(description="requested fraction of the duration")
    target_time_s: float
    time_s: float = Field(description="presentation time of the decoded frame")
    frame_index: int
    path: str = Field(description="name of the decoded frame in the video's media")
    width: int
    height: int


class KeyframesRecord(Record):
    video_id: str
    keyframes: list[Keyframe]


class PersonDetection(Record):
    keyframe: int
    box: Box
    score: float


class PersonsRecord(Record):
    video_id: str
    model: ModelInfo
    detections: list[PersonDetection]


class FaceQuality(Record):
    size_px: float = Field(description="shorter side of the face box")
    det_score: float
    sharpness: float = Field(description="variance of the Laplacian of the grey face crop")
    frontalness: float | None = Field(
        None, description="1 = frontal, from 5-point landmarks when the detector gives them"
    )
    score: float = Field(description="combined quality used to pick the best face")
    usable: bool
    reason: str | None = Field(None, description="why the face is not usable")


class FaceDetection(Record):
    keyframe: int
    box: Box
    score: float
    landmarks: list[tuple[float, float]] | None = None
    quality: FaceQuality | None = None


class Person(Record):
    """One person tracked across the keyframes, with the best face found for them."""

    person_id: int
    boxes: dict[int, Box] = Field(description="keyframe index -> person box")
    scores: dict[int, float]
    source: Literal["detector", "face"] = Field(
        "detector", description="'face': no person detection; box extrapolated from a face found outside them"
    )
    face: FaceDetection | None = None
    face_path: str | None = Field(
        None, description="bounding-box face crop (PNG), by name in the video's media"
    )
    no_face_reason: str | None = None

    @property
    def has_face(self) -> bool:
        return self.face is not None and self.face_path is not None


class FacesRecord(Record):
    video_id: str
    model: ModelInfo
    persons: list[Person]

    @property
    def persons_with_face(self) -> list[Person]:
        return [p for p in self.persons if p.has_face]


class FailureRecord(Record):
    """A video a stage could not process. The run goes on; the row says why."""

    video_id: str
    uri: str
    stage: str
    error_class: str
    message: str
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))
