"""Masks stage: attribute, object and whole-person masks on every keyframe (paper section 3.2, steps 3a/3b).

For each video of the batch and each of its keyframes:

- every **attribute** phrase of a subject is grounded by GroundingDINO *inside that subject's person box* (the
  region is what binds "black shirt" to this person and not to the man next to him);
- every **object** phrase is grounded on the whole frame;
- SAM turns each grounding box into a mask, and each person box (every person of the faces record, bound to a
  subject or not) into a **whole-person** mask: subjects need it for their whole-person cut-out, and the
  background stage must remove everybody from the plate;
- `tasks.mask_ops.check_mask` rejects empty, too small, too large, fragmented or mostly-outside-the-box masks;
- an attribute's grounding box and its mask must lie inside its own person's box (grown by
  `masks.person_margin`), by this stage's own check (`masks.min_inside_person_frac`), whatever the grounder does
  with the search region: a grounder that ignores the region (or a future backend that does not clip to it)
  cannot bind another person's jacket to this one. Otherwise the keyframe's reason is "outside person".

Every entity gets one `MaskFrame` per keyframe, valid or not, with the reason when not, so a sample's missing
attribute can always be explained. Masks are 1-bit PNGs of the full frame in the video's media
(`masks/k<keyframe>_<entity>.png`).

Both models are called once per batch over all keyframes of all videos (the adapters chunk by their own
`batch_size`), never per video.

`MasksRecord` lives here, not in `schemas/entities.py`, because that module had another owner when this stage
was written; it is plain pydantic and can move there unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field

from schemas.config import MasksConfig
from schemas.entities import EntitiesRecord
from schemas.records import Box, FacesRecord, KeyframesRecord, ModelInfo, Person, Record
from tasks.base import Stage, StageError, VideoContext
from tasks.mask_ops import MaskCheck, as_bool_mask, check_mask

logger = logging.getLogger(__name__)

EntityKind = Literal["person", "attribute", "object"]

# Reasons a keyframe gives no mask for an entity, besides check_mask's own ("empty", "too small", ...).
NOT_ON_KEYFRAME = "person not on keyframe"
NOT_GROUNDED = "not grounded"
OUTSIDE_PERSON = "outside person"


def mask_inside_frac(mask: np.ndarray, region: Box) -> float:
    """Share of the mask's pixels inside `region` (rounded outward, as check_mask counts); 0.0 when empty."""
    mask = as_bool_mask(mask)
    total = int(mask.sum())
    if total == 0:
        return 0.0
    x0, y0, x1, y1 = region.pixel_bounds(mask.shape[1], mask.shape[0])
    return int(mask[y0:y1, x0:x1].sum()) / total


# ---------------------------------------------------------------------------------------------- entity keys
def person_key(person_id: int) -> str:
    return f"person_{person_id}"


def attribute_key(person_id: int, index: int) -> str:
    return f"attr_{person_id}_{index}"


def object_key(index: int) -> str:
    return f"object_{index}"


# ---------------------------------------------------------------------------------------------- record
class MaskFrame(Record):
    """One entity on one keyframe: the mask that was made there, or why there is none."""

    keyframe: int
    box: Box | None = Field(None, description="the prompt box: grounding box, or the person box for a person")
    score: float | None = Field(None, description="grounding score (persons: the person detector's score)")
    mask_score: float | None = Field(None, description="SAM's predicted IoU")
    mask: str | None = Field(
        None, description="1-bit full-frame PNG, by name in the video's media (valid only)"
    )
    check: MaskCheck | None = None
    reason: str | None = Field(None, description="None = valid; else why this keyframe gives no mask")

    @property
    def ok(self) -> bool:
        return self.reason is None and self.mask is not None


class EntityMasks(Record):
    key: str = Field(
        description="person_<pid>, attr_<pid>_<j> or object_<j>; j = index in the entities answer"
    )
    kind: EntityKind
    label: str | None = Field(None, description="the phrase (attributes, objects) or subject noun (subjects)")
    person_id: int | None = None
    index: int | None = None
    frames: list[MaskFrame] = Field(default_factory=list)

    def valid_keyframes(self) -> list[int]:
        return sorted(f.keyframe for f in self.frames if f.ok)

    def frame(self, keyframe: int) -> MaskFrame | None:
        return next((f for f in self.frames if f.keyframe == keyframe), None)

    def reasons(self) -> dict[int, str]:
        """keyframe -> why it gave no mask (only the failed keyframes)."""
        return {f.keyframe: f.reason or "no mask" for f in self.frames if not f.ok}


class MasksRecord(Record):
    video_id: str
    grounder: ModelInfo
    segmenter: ModelInfo
    entities: list[EntityMasks]

    def get(self, key: str) -> EntityMasks | None:
        return next((e for e in self.entities if e.key == key), None)


# ---------------------------------------------------------------------------------------------- the stage
@dataclass
class _Frame:
    video_id: str
    keyframe: int
    image: Image.Image
    persons: list[Person]
    """persons with a box on this keyframe"""


@dataclass
class _Prompt:
    """A box to segment, and the entity frame whose fields its mask fills in."""

    frame: _Frame
    entity: EntityMasks
    result: MaskFrame
    person_region: Box | None = None
    """attributes: their person's box grown by `masks.person_margin`; the mask must lie inside it"""


@dataclass
class _Video:
    ctx: VideoContext
    entities: list[EntityMasks] = field(default_factory=list)
    frames: list[_Frame] = field(default_factory=list)


class MasksStage(Stage[MasksRecord]):
    name = "masks"
    version = "3"  # 2: masks in memory; 3: attributes checked inside their own person
    record_type = MasksRecord
    requires = ("entities", "keyframes", "faces")
    uses_gpu = True

    def __init__(self, config, grounder: Any | None = None, segmenter: Any | None = None):
        """`grounder` / `segmenter` replace the configured models (tests inject fakes with the same API)."""
        super().__init__(config)
        self.grounder = grounder
        self.segmenter = segmenter

    @property
    def cfg(self) -> MasksConfig:
        return self.config.masks

    def model_specs(self):
        return [self.config.masks.grounder, self.config.masks.segmenter]

    def settings(self) -> MasksConfig:
        return self.cfg

    def setup(self) -> None:
        from models.grounding import GROUNDERS
        from models.segmenter import SEGMENTERS

        if self.grounder is None:
            self.grounder = GROUNDERS.get(self.cfg.grounder)
        if self.segmenter is None:
            self.segmenter = SEGMENTERS.get(self.cfg.segmenter)

    # -- per video: which entity is looked for on which keyframe
    def _prepare(self, ctx: VideoContext) -> _Video:
        entities = ctx.record("entities", EntitiesRecord)
        faces = ctx.record("faces", FacesRecord)
        keyframes = ctx.record("keyframes", KeyframesRecord).keyframes
        if not keyframes:
            raise StageError("no_keyframes", "the keyframes record lists no keyframe")
        by_id = {p.person_id: p for p in faces.persons}
        video = _Video(ctx)
        for kf in keyframes:
            image = ctx.pil(kf.path)
            video.frames.append(
                _Frame(ctx.video_id, kf.index, image, [p for p in faces.persons if kf.index in p.boxes])
            )
        nouns = {s.person_id: s.noun for s in entities.answer.subjects}
        for p in faces.persons:
            video.entities.append(
                EntityMasks(
                    key=person_key(p.person_id),
                    kind="person",
                    label=nouns.get(p.person_id),
                    person_id=p.person_id,
                )
            )
        for subject in entities.answer.subjects:
            if subject.person_id not in by_id:
                raise StageError(
                    "unknown_person",
                    f"entities bind person {subject.person_id}, absent from the faces record",
                )
            for j, attr in enumerate(subject.attributes):
                video.entities.append(
                    EntityMasks(
                        key=attribute_key(subject.person_id, j),
                        kind="attribute",
                        label=attr.phrase,
                        person_id=subject.person_id,
                        index=j,
                    )
                )
        for j, phrase in enumerate(entities.answer.objects):
            video.entities.append(EntityMasks(key=object_key(j), kind="object", label=phrase, index=j))
        return video

    def process(self, videos: list[VideoContext]) -> dict[str, MasksRecord | StageError]:
        if self.grounder is None or self.segmenter is None:
            self.setup()
        results: dict[str, MasksRecord | StageError] = {}
        prepared: list[_Video] = []
        for ctx in videos:
            try:
                prepared.append(self._prepare(ctx))
            except StageError as e:
                results[ctx.video_id] = e

        prompts = self._ground(prepared)
        self._segment(prepared, prompts)

        for video in prepared:
            results[video.ctx.video_id] = MasksRecord(
                video_id=video.ctx.video_id,
                grounder=self.grounder.info,
                segmenter=self.segmenter.info,
                entities=video.entities,
            )
        return results

    # -- step 1: phrases -> boxes, one batched call for every keyframe of every video
    def _ground(self, videos: list[_Video]) -> dict[tuple[str, int], list[_Prompt]]:
        """Grounding boxes for attributes (inside their person's box) and objects (whole frame).

        Returns, per (video, keyframe), the SAM prompts: every person box, then every grounded phrase's best box.
        Entities that get no prompt on a keyframe are given their reason there.
        """
        images: list[Image.Image] = []
        phrases: list[list[str]] = []
        regions: list[Box | None] = []
        targets: list[tuple[_Frame, list[EntityMasks]]] = []
        prompts: dict[tuple[str, int], list[_Prompt]] = {}
        for video in videos:
            by_kind: dict[str, list[EntityMasks]] = {"person": [], "attribute": [], "object": []}
            for e in video.entities:
                by_kind[e.kind].append(e)
            for fr in video.frames:
                boxes = {p.person_id: p.boxes[fr.keyframe] for p in fr.persons}
                scores = {p.person_id: p.scores.get(fr.keyframe) for p in fr.persons}
                todo = prompts.setdefault((video.ctx.video_id, fr.keyframe), [])
                for e in by_kind["person"]:
                    if e.person_id in boxes:
                        pid = e.person_id
                        result = MaskFrame(keyframe=fr.keyframe, box=boxes[pid], score=scores[pid])
                        todo.append(_Prompt(fr, e, result))
                    else:
                        e.frames.append(MaskFrame(keyframe=fr.keyframe, reason=NOT_ON_KEYFRAME))
                for pid in sorted({e.person_id for e in by_kind["attribute"]}):
                    own = [e for e in by_kind["attribute"] if e.person_id == pid]
                    if pid not in boxes:
                        for e in own:
                            e.frames.append(MaskFrame(keyframe=fr.keyframe, reason=NOT_ON_KEYFRAME))
                        continue
                    images.append(fr.image)
                    phrases.append([e.label for e in own])  # type: ignore[misc]
                    regions.append(boxes[pid])
                    targets.append((fr, own))
                if by_kind["object"]:
                    images.append(fr.image)
                    phrases.append([e.label for e in by_kind["object"]])  # type: ignore[misc]
                    regions.append(None)
                    targets.append((fr, by_kind["object"]))

        found = self.grounder.detect(images, phrases, regions) if images else []
        if len(found) != len(images):
            raise RuntimeError(f"grounder returned {len(found)} results for {len(images)} images")
        for (fr, entities), region, boxes in zip(targets, regions, found, strict=True):
            person_region = (
                region.expand(self.cfg.person_margin, fr.image.width, fr.image.height)
                if region is not None
                else None
            )
            for e in entities:
                # Boxes come best first: the first one of a phrase is its grounding. For an attribute, the best
                # one inside its person: a box elsewhere is another person's (or nobody's) thing.
                mine = [b for b in boxes if b.phrase == e.label]
                if person_region is not None:
                    inside = [
                        b
                        for b in mine
                        if b.box.fraction_inside(person_region) >= self.cfg.min_inside_person_frac
                    ]
                    if mine and not inside:
                        best = mine[0]
                        e.frames.append(
                            MaskFrame(
                                keyframe=fr.keyframe,
                                box=best.box,
                                score=round(best.score, 4),
                                reason=OUTSIDE_PERSON,
                            )
                        )
                        continue
                    mine = inside
                if not mine:
                    e.frames.append(MaskFrame(keyframe=fr.keyframe, reason=NOT_GROUNDED))
                    continue
                best = mine[0]
                result = MaskFrame(keyframe=fr.keyframe, box=best.box, score=round(best.score, 4))
                prompts[(fr.video_id, fr.keyframe)].append(_Prompt(fr, e, result, person_region))
        return prompts

    # -- step 2: boxes -> masks, one batched call; check and save every mask
    def _segment(self, videos: list[_Video], prompts: dict[tuple[str, int], list[_Prompt]]) -> None:
        frames = [fr for video in videos for fr in video.frames]
        jobs = [prompts.get((fr.video_id, fr.keyframe), []) for fr in frames]
        predictions = (
            self.segmenter.segment([fr.image for fr in frames], [[p.result.box for p in job] for job in jobs])
            if frames
            else []
        )
        cfg = self.cfg
        video_of = {video.ctx.video_id: video for video in videos}
        for fr, job, preds in zip(frames, jobs, predictions, strict=True):
            if len(preds) != len(job):
                raise RuntimeError(f"segmenter returned {len(preds)} masks for {len(job)} boxes")
            for prompt, pred in zip(job, preds):
                result = prompt.result
                result.mask_score = round(float(pred.score), 4)
                result.check = check_mask(
                    pred.mask,
                    result.box,  # type: ignore[arg-type]
                    min_area_frac=cfg.min_area_frac,
                    max_area_frac=cfg.max_area_frac,
                    min_inside_frac=cfg.min_inside_frac,
                    min_largest_component_frac=cfg.min_largest_component_frac,
                )
                if (
                    result.check.ok
                    and prompt.person_region is not None
                    and mask_inside_frac(pred.mask, prompt.person_region) < cfg.min_inside_person_frac
                ):
                    result.reason = OUTSIDE_PERSON  # the box was inside, SAM's mask spilled onto someone else
                elif result.check.ok:
                    result.mask = video_of[fr.video_id].ctx.put(
                        f"masks/k{fr.keyframe}_{prompt.entity.key}.png",
                        # mode "1": 1 bit per pixel
                        Image.fromarray(np.asarray(pred.mask, dtype=bool)),
                    )
                else:
                    result.reason = result.check.reason
                prompt.entity.frames.append(result)
        for video in videos:
            for e in video.entities:
                e.frames.sort(key=lambda f: f.keyframe)
