"""Background stage: one keyframe per entity (paper step 3d), then a clean plate on the background's (step 3c).

The two steps live in one stage because their order matters for cost: FLUX Fill is by far the most expensive
model of the pipeline, so the background's keyframe is drawn *before* inpainting and only that keyframe is
repainted (one FLUX generation per sample, plus retries), instead of inpainting all three keyframes and picking
one afterwards.

Selection: every entity of the video's subjects (face, whole person, each attribute), each object and the
background gets one keyframe among those where it is valid (`tasks.select.select_keyframes`, seeded by the
video id and `select.seed_salt`): never all from the same keyframe when another choice exists. A face is only
valid on the keyframe the faces stage took its crop from; the background on every keyframe.

Plate: the union of every person's mask on that keyframe (a person whose mask was rejected is removed by its
box), the subjects' attribute masks (accessories stick out of person masks) and the object masks, dilated
(`tasks.mask_ops.foreground_union`), is repainted by FLUX Fill (`models.inpainter.clean_plates`). The person
detector of the persons stage (same spec, so the same cached adapter) then looks at the plate: a plate that
still shows a person is redone with another seed, up to `background.max_retries` times, then rejected. A
rejected or skipped background is a status with a reason in the record, not a failure: the sample goes on
without a background condition.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field

from schemas.config import BackgroundConfig
from schemas.entities import EntitiesRecord
from schemas.records import FacesRecord, KeyframesRecord, ModelInfo, Record
from schemas.sample import PlateAttempt
from tasks.base import Stage, StageError, VideoContext
from tasks.mask_ops import box_mask, foreground_union
from tasks.masks import MasksRecord, attribute_key, object_key, person_key
from tasks.select import select_keyframes, selection_seed

logger = logging.getLogger(__name__)

BACKGROUND_KEY = "background"


def face_key(person_id: int) -> str:
    return f"face_{person_id}"


# ---------------------------------------------------------------------------------------------- record
class BackgroundRecord(Record):
    video_id: str
    selection_seed: str
    candidates: dict[str, list[int]] = Field(description="entity key -> keyframes where it is valid")
    selection: dict[str, int] = Field(description="entity key -> chosen keyframe (entities with a candidate)")
    status: Literal["ok", "skipped", "rejected"]
    reason: str | None = Field(None, description="why there is no plate (skipped, rejected)")
    label: str | None = Field(None, description="background phrase, verbatim in the caption")
    keyframe: int | None = None
    plate: str | None = Field(None, description="clean plate PNG, by name in the video's media")
    foreground_mask: str | None = Field(None, description="the repainted region (1-bit PNG)")
    attempts: list[PlateAttempt] = Field(default_factory=list)
    flux_calls: int = Field(0, description="FLUX Fill generations spent on this video (target: 1)")
    inpainter: ModelInfo | None = None
    plate_checker: ModelInfo | None = None


# ---------------------------------------------------------------------------------------------- selection
def entity_candidates(
    entities: EntitiesRecord, faces: FacesRecord, masks: MasksRecord, keyframes: list[int]
) -> dict[str, list[int]]:
    """Entity key -> keyframes it is valid on. Entities with no valid keyframe map to [] (they get no image)."""
    persons = {p.person_id: p for p in faces.persons}
    out: dict[str, list[int]] = {}

    def valid(key: str) -> list[int]:
        entity = masks.get(key)
        return entity.valid_keyframes() if entity is not None else []

    for subject in entities.answer.subjects:
        pid = subject.person_id
        person = persons.get(pid)
        face = person.face if person is not None and person.has_face else None
        out[face_key(pid)] = [face.keyframe] if face is not None else []
        out[person_key(pid)] = valid(person_key(pid))
        for j in range(len(subject.attributes)):
            out[attribute_key(pid, j)] = valid(attribute_key(pid, j))
    for j in range(len(entities.answer.objects)):
        out[object_key(j)] = valid(object_key(j))
    if entities.answer.background is not None:
        out[BACKGROUND_KEY] = sorted(keyframes)
    return out


def select_entity_keyframes(candidates: dict[str, list[int]], seed: str) -> dict[str, int]:
    """One keyframe per entity that has any (step 3d); see `tasks.select.select_keyframes`."""
    return select_keyframes({k: v for k, v in candidates.items() if v}, seed)


def plate_seed(video_id: str, base: int, attempt: int) -> int:
    """Per-video seeds (not one shared noise pattern stamped on every plate of the dataset), reproducible."""
    digest = hashlib.sha256(f"{video_id}\x1f{base}".encode()).digest()
    return (int.from_bytes(digest[:4], "big") + attempt) % 2**31


# ---------------------------------------------------------------------------------------------- the stage
@dataclass
class _PlateJob:
    ctx: VideoContext
    record: BackgroundRecord
    frame: Image.Image
    foreground: np.ndarray


class BackgroundStage(Stage[BackgroundRecord]):
    name = "background"
    version = "2"  # 2: plates in memory
    record_type = BackgroundRecord
    requires = ("masks", "entities", "keyframes", "faces")
    uses_gpu = True

    def __init__(self, config, inpainter: Any | None = None, plate_detector: Any | None = None):
        """`inpainter` / `plate_detector` replace the configured models (tests inject fakes or spies)."""
        super().__init__(config)
        self.inpainter = inpainter
        self.plate_detector = plate_detector

    @property
    def cfg(self) -> BackgroundConfig:
        return self.config.background

    def model_specs(self):
        # The plate check runs the person detector too.
        return [self.config.background.model, self.config.persons.model]

    def settings(self) -> dict[str, Any]:
        persons = self.config.persons
        return {
            "background": self.cfg.model_dump(mode="json"),
            "select": self.config.select.model_dump(mode="json"),
            # The plate check is the persons stage's detector with its filters: they decide what is rejected.
            "plate_check": {
                "model": persons.model.model_dump(mode="json"),
                "min_score": persons.min_score,
                "min_height_frac": persons.min_height_frac,
            },
        }

    def setup(self) -> None:
        if self.inpainter is None:
            from models.inpainter import INPAINTERS

            self.inpainter = INPAINTERS.get(self.cfg.model)
        if self.plate_detector is None:
            from models.person_detector import PERSON_DETECTORS

            self.plate_detector = PERSON_DETECTORS.get(self.config.persons.model)

    # -- per video: selection, and the plate job if there is a background to make
    def _prepare(self, ctx: VideoContext) -> BackgroundRecord | _PlateJob:
        entities = ctx.record("entities", EntitiesRecord)
        faces = ctx.record("faces", FacesRecord)
        masks = ctx.record("masks", MasksRecord)
        keyframes = {k.index: k for k in ctx.record("keyframes", KeyframesRecord).keyframes}
        seed = selection_seed(ctx.video_id, self.config.select.seed_salt)
        candidates = entity_candidates(entities, faces, masks, list(keyframes))
        selection = select_entity_keyframes(candidates, seed)
        record = BackgroundRecord(
            video_id=ctx.video_id,
            selection_seed=seed,
            candidates=candidates,
            selection=selection,
            status="skipped",
            label=entities.answer.background,
        )
        if entities.answer.background is None:
            record.reason = "no background phrase in the caption"
            return record
        if BACKGROUND_KEY not in selection:
            record.reason = "no keyframe"
            return record
        k = record.keyframe = selection[BACKGROUND_KEY]
        frame = ctx.pil(keyframes[k].path)
        return _PlateJob(ctx, record, frame, self._foreground(ctx, faces, masks, k, frame.size))

    def _foreground(
        self, ctx: VideoContext, faces: FacesRecord, masks: MasksRecord, k: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Everything to repaint on keyframe k: all persons (bound to a subject or not), attributes, objects."""
        w, h = size
        parts: list[np.ndarray] = []
        for person in faces.persons:
            if k not in person.boxes:
                continue
            entity = masks.get(person_key(person.person_id))
            frame = entity.frame(k) if entity is not None else None
            if frame is not None and frame.ok:
                parts.append(ctx.mask(frame.mask))
            else:  # a rejected person mask must still leave the plate: remove the whole box
                parts.append(box_mask(person.boxes[k], (h, w)))
        for entity in masks.entities:
            if entity.kind != "person":
                frame = entity.frame(k)
                if frame is not None and frame.ok:
                    parts.append(ctx.mask(frame.mask))
        return foreground_union(parts, self.cfg.dilate_frac * max(w, h), shape=(h, w))

    def process(self, videos: list[VideoContext]) -> dict[str, BackgroundRecord | StageError]:
        if self.inpainter is None or self.plate_detector is None:
            self.setup()
        from models.inpainter import clean_plates

        results: dict[str, BackgroundRecord | StageError] = {}
        jobs: list[_PlateJob] = []
        for ctx in videos:
            try:
                prepared = self._prepare(ctx)
            except StageError as e:
                results[ctx.video_id] = e
                continue
            if isinstance(prepared, BackgroundRecord):
                results[ctx.video_id] = prepared
            else:
                prepared.record.inpainter = self.inpainter.info
                prepared.record.plate_checker = self.plate_detector.info
                jobs.append(prepared)

        pending = list(jobs)
        for attempt in range(self.cfg.max_retries + 1):
            if not pending:
                break
            # One batched inpainting call per round for every video still without a plate.
            seeds = [plate_seed(job.record.video_id, self.cfg.seed, attempt) for job in pending]
            plates = clean_plates(
                self.inpainter,
                [job.frame for job in pending],
                [job.foreground for job in pending],
                [job.record.label for job in pending],
                seeds,
            )
            detections = self.plate_detector([np.asarray(p.convert("RGB")) for p in plates])
            retry: list[_PlateJob] = []
            for job, plate, dets, seed in zip(pending, plates, detections, seeds, strict=True):
                inpainted = bool(job.foreground.any())
                job.record.flux_calls += int(inpainted)
                people = self._persons_on(dets, plate.height)
                best = max(people, key=lambda d: d.score, default=None)
                job.record.attempts.append(
                    PlateAttempt(
                        seed=seed,
                        inpainted=inpainted,
                        persons_found=len(people),
                        best_person_score=None if best is None else round(best.score, 4),
                        best_person_box=None if best is None else best.box,
                    )
                )
                if people:
                    retry.append(job)
                else:
                    self._accept(job, plate)
            pending = retry

        for job in pending:
            job.record.status = "rejected"
            job.record.reason = (
                f"person on the plate after {len(job.record.attempts)} attempt(s) "
                f"(best score {job.record.attempts[-1].best_person_score})"
            )
        for job in jobs:
            results[job.record.video_id] = job.record
        return results

    def _persons_on(self, detections: list[Any], height: int) -> list[Any]:
        """The detections the persons stage would keep: the plate check sees people as that stage does."""
        cfg = self.config.persons
        min_height = cfg.min_height_frac * height
        return [d for d in detections if d.score >= cfg.min_score and d.box.height >= min_height]

    def _accept(self, job: _PlateJob, plate: Image.Image) -> None:
        r = job.record
        r.status, r.reason = "ok", None
        r.plate = job.ctx.put(f"plate_k{r.keyframe}.png", plate.convert("RGB"))
        r.foreground_mask = job.ctx.put(f"plate_mask_k{r.keyframe}.png", Image.fromarray(job.foreground))
