"""A scripted world for the subject-consistent stages (entities -> masks -> background -> sample v2).

The tiny random-weight models produce garbage, so tests that check the stages' *wiring* (which phrase is searched
where, which keyframe is chosen, what lands in the sample) script the model outputs instead:

- the videos are the real sample videos (`flows.sample_data`), ingested and keyframed by the real stages;
- caption, persons and faces records are written as those stages would, with the known person boxes;
- `ScriptedEntities` answers the entities prompt with a valid JSON answer per video;
- `FakeGrounder` returns, for each phrase, a sub-box of the search region (attributes) or a fixed box on the
  frame (objects), and records every call;
- `FakeSegmenter` returns a filled ellipse inscribed in each box (so cut-outs have white corners) and can spoil
  chosen masks (empty, fragmented) to exercise the rejection paths;
- `FakePlateDetector` sees a person on the first N plates it is shown.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flows.sample_data import CAPTIONS
from models.grounding import GroundedBox
from models.person_detector import PersonDet
from models.segmenter import MaskPrediction
from schemas.config import CurateConfig
from schemas.records import (
    Box,
    CaptionRecord,
    FaceDetection,
    FacesRecord,
    KeyframesRecord,
    ModelInfo,
    Person,
    PersonDetection,
    PersonsRecord,
)
from tasks.base import VideoContext
from tasks.discovery import discover
from tasks.ingest import IngestStage
from tasks.keyframes import KeyframesStage
from tasks.mask_ops import face_crop
from tasks.runner import run_stage

SCRIPTED = ModelInfo(backend="scripted", model_id="test", random_weights=False)

# Where the people of the sample videos are (flows/sample_data.py pastes them there; they sway by 8 px).
PEOPLE = {
    "two_people": {0: ((40, 0, 300, 360), (115, 40, 195, 130)), 1: ((396, 0, 600, 360), (455, 45, 530, 125))},
    "astronaut_zoom": {0: ((80, 20, 420, 360), (190, 60, 290, 170))},
}

ANSWERS = {
    "two_people": {
        "subjects": [
            {
                "person_id": 0,
                "noun": "woman",
                "attributes": [
                    {"phrase": "black top", "kind": "top"},
                    {"phrase": "long strawberry-blonde hair", "kind": "hair"},
                ],
            },
            {"person_id": 1, "noun": "man", "attributes": [{"phrase": "dark red shirt", "kind": "top"}]},
        ],
        "objects": ["playing cards", "blue poker chip"],
        "background": "plain beige wall",
    },
    "astronaut_zoom": {
        "subjects": [
            {"person_id": 0, "noun": "woman astronaut", "attributes": [{"phrase": "orange spacesuit"}]},
        ],
        "objects": ["white helmet"],
        "background": None,
    },
}


def ingest_contexts(paths: list[Path], config: CurateConfig) -> list[VideoContext]:
    """Contexts of real files after the real ingest stage (discovery's view of each file, then ingest)."""
    sources = [f for p in paths for f in discover(str(p), config.ingest.extensions)]
    items = [VideoContext(source=s) for s in sources]
    run_stage(IngestStage(config), items)
    return items


@dataclass
class World:
    contexts: dict[str, VideoContext]
    """sample video name -> its context (records and media so far)"""
    ids: dict[str, str]
    """sample video name -> video id"""
    fingerprints: dict[str, str] = field(default_factory=dict)

    def items(self, *names: str) -> list[VideoContext]:
        return [self.contexts[n] for n in (names or self.contexts)]


def build_world(sample_videos: list[Path], names: tuple[str, ...], config: CurateConfig) -> World:
    """Ingest + keyframes (real stages), then scripted caption, persons and faces records."""
    items = ingest_contexts([p for p in sample_videos if p.stem in names], config)
    assert all(c.failure is None for c in items), [c.failure for c in items]
    run_stage(KeyframesStage(config), items)
    assert all(c.failure is None for c in items), [c.failure for c in items]
    contexts = {Path(c.uri).stem: c for c in items}
    for name, ctx in contexts.items():
        vid = ctx.video_id
        ctx.records["caption"] = CaptionRecord(video_id=vid, caption=CAPTIONS[name], source="sidecar")
        keyframes = ctx.record("keyframes", KeyframesRecord).keyframes
        detections, persons = [], []
        for pid, (person_box, face_box) in PEOPLE[name].items():
            pbox, fbox = Box.from_tuple(person_box), Box.from_tuple(face_box)
            detections += [PersonDetection(keyframe=k.index, box=pbox, score=0.9) for k in keyframes]
            face = FaceDetection(keyframe=1, box=fbox, score=0.99)
            crop = ctx.put(f"face_{pid}.png", face_crop(ctx.pil(keyframes[1].path), fbox))
            persons.append(
                Person(
                    person_id=pid,
                    boxes={k.index: pbox for k in keyframes},
                    scores={k.index: 0.9 for k in keyframes},
                    face=face,
                    face_path=crop,
                )
            )
        ctx.records["persons"] = PersonsRecord(video_id=vid, model=SCRIPTED, detections=detections)
        ctx.records["faces"] = FacesRecord(video_id=vid, model=SCRIPTED, persons=persons)
    return World(contexts, {n: c.video_id for n, c in contexts.items()})


# ---------------------------------------------------------------------------------------------- fake models
class ScriptedEntities:
    """The entities stage's generator: the valid answer of the video whose caption is in the prompt."""

    info = SCRIPTED

    def __init__(self, answers: dict[str, dict] = ANSWERS):
        self.answers = answers
        self.calls = 0

    def generate(self, messages_batch, max_new_tokens):
        self.calls += 1
        out = []
        for conversation in messages_batch:
            prompt = conversation[0]["content"][-1]["text"]
            name = next(n for n in self.answers if CAPTIONS[n] in prompt)
            out.append("```json\n" + json.dumps(self.answers[name]) + "\n```")
        return out


def attribute_box(region: Box, i: int, n: int) -> Box:
    """Band i of n across the lower 80 % of the region, inset 15 % on each side: always inside the region."""
    top = region.y0 + 0.2 * region.height
    band = 0.8 * region.height / n
    return Box(
        x0=region.x0 + 0.15 * region.width,
        y0=top + i * band,
        x1=region.x1 - 0.15 * region.width,
        y1=top + (i + 1) * band - 2,
    )


def object_box(i: int) -> Box:
    return Box(x0=305.0, y0=60.0 + 100 * i, x1=390.0, y1=140.0 + 100 * i)


class FakeGrounder:
    info = ModelInfo(backend="fake-grounder")

    def __init__(self, missing: Callable[[str, int], bool] = lambda phrase, occurrence: False):
        """`missing(phrase, n)`: find nothing for the n-th (0-based) search of `phrase` within one call."""
        self.missing = missing
        self.calls: list[tuple[list[list[str]], list[Box | None]]] = []

    def detect(self, images, phrases, regions=None):
        regions = regions if regions is not None else [None] * len(images)
        self.calls.append(([list(p) for p in phrases], list(regions)))
        seen: dict[str, int] = {}
        out = []
        for item, region in zip(phrases, regions):
            found = []
            for i, phrase in enumerate(item):
                seen[phrase] = seen.get(phrase, -1) + 1
                if self.missing(phrase, seen[phrase]):
                    continue
                box = object_box(i) if region is None else attribute_box(region, i, len(item))
                found.append(GroundedBox(phrase, box, 0.8 - 0.1 * i))
            out.append(found)
        return out


def ellipse_mask(box: Box, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = box.center
    rx, ry = max(box.width / 2, 1), max(box.height / 2, 1)
    return ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1.0


class FakeSegmenter:
    """Ellipse masks; `spoil[(image_index, box_index)]` = "empty" | "fragmented" spoils that one mask."""

    info = ModelInfo(backend="fake-segmenter")

    def __init__(self, spoil: dict[tuple[int, int], str] | None = None):
        self.spoil = spoil or {}
        self.calls: list[int] = []

    def segment(self, images, boxes):
        self.calls.append(len(images))
        out = []
        for i, (image, item) in enumerate(zip(images, boxes)):
            preds = []
            for j, box in enumerate(item):
                mask = ellipse_mask(box, (image.height, image.width))
                kind = self.spoil.get((i, j))
                if kind == "empty":
                    mask[:] = False
                elif kind == "fragmented":  # vertical slivers 6 px apart: many separate pieces
                    mask &= (np.arange(image.width) // 6) % 2 == 0
                preds.append(MaskPrediction(mask=mask, score=0.9))
            out.append(preds)
        return out


class FakePlateDetector:
    """Sees one tall person on each of the first `first_n` plates it is shown, nobody afterwards."""

    info = ModelInfo(backend="fake-plate-check")

    def __init__(self, first_n: int = 0):
        self.first_n = first_n
        self.seen = 0

    def __call__(self, images):
        out = []
        for image in images:
            self.seen += 1
            h, w = image.shape[:2]
            person = PersonDet(Box(x0=10, y0=0, x1=w / 3, y1=h), 0.95)
            out.append([person] if self.seen <= self.first_n else [])
        return out
