"""Persons stage: detect people on every keyframe (paper step 1c).

All keyframes of all videos in the batch go through the detector together, in chunks of the model's batch size,
so a GPU sees full batches even when videos have few keyframes. Detections below `min_score` or shorter than
`min_height_frac` of the frame are dropped. Linking detections across keyframes into persons is the faces stage's
job (it also needs the faces to do it well).
"""

from __future__ import annotations

from dataclasses import dataclass

from models.person_detector import PERSON_DETECTORS
from schemas.config import PersonConfig
from schemas.records import Keyframe, KeyframesRecord, PersonDetection, PersonsRecord
from tasks.base import Stage, StageError, VideoContext


def load_keyframes(ctx: VideoContext) -> KeyframesRecord:
    record = ctx.record("keyframes", KeyframesRecord)
    if not record.keyframes:
        raise StageError("no_keyframes", "the keyframes record lists no keyframe")
    return record


@dataclass
class _Job:
    ctx: VideoContext
    keyframe: Keyframe


class PersonsStage(Stage[PersonsRecord]):
    name = "persons"
    version = "1"
    record_type = PersonsRecord
    requires = ("keyframes",)
    uses_gpu = True

    @property
    def cfg(self) -> PersonConfig:
        return self.config.persons

    def settings(self) -> PersonConfig:
        return self.cfg

    def setup(self) -> None:
        self.detector = PERSON_DETECTORS.get(self.cfg.model)

    def process(self, videos: list[VideoContext]) -> dict[str, PersonsRecord | StageError]:
        if not hasattr(self, "detector"):
            self.setup()
        results: dict[str, PersonsRecord | StageError] = {}
        jobs: list[_Job] = []
        for ctx in videos:
            try:
                kfs = load_keyframes(ctx)
            except StageError as e:
                results[ctx.video_id] = e
                continue
            jobs += [_Job(ctx, kf) for kf in kfs.keyframes]

        found: dict[str, list[PersonDetection]] = {ctx.video_id: [] for ctx in videos}
        batch = self.cfg.model.batch_size
        for start in range(0, len(jobs), batch):
            chunk, images = [], []
            for job in jobs[start : start + batch]:
                if job.ctx.video_id in results:
                    continue  # an earlier keyframe of this video was unreadable
                try:
                    images.append(job.ctx.rgb(job.keyframe.path))
                    chunk.append(job)
                except StageError as e:
                    results[job.ctx.video_id] = e
            for job, image, dets in zip(chunk, images, self.detector(images) if images else []):
                min_height = self.cfg.min_height_frac * image.shape[0]
                found[job.ctx.video_id] += [
                    PersonDetection(keyframe=job.keyframe.index, box=d.box, score=round(d.score, 4))
                    for d in dets
                    if d.score >= self.cfg.min_score and d.box.height >= min_height
                ]

        for ctx in videos:
            vid = ctx.video_id
            if vid in results:
                continue
            if self.cfg.require_person and not found[vid]:
                results[vid] = StageError(
                    "no_person",
                    f"no person with score >= {self.cfg.min_score} and height >= {self.cfg.min_height_frac:.0%} "
                    "of the frame on any keyframe",
                )
                continue
            results[vid] = PersonsRecord(video_id=vid, model=self.detector.info, detections=found[vid])
        return results
