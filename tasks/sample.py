"""Assemble one identity-consistent sample per video: clip, caption, face crops and meta.json.

The sample is written as a directory `work/samples/<key>/` whose file names are the WebDataset member names;
it is built under a temporary name and renamed when complete, so the shard writer only ever sees whole samples.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from schemas.config import fingerprint
from schemas.records import CaptionRecord, FacesRecord, KeyframesRecord, ModelInfo
from schemas.sample import (
    PersonWithoutFace,
    SampleKeyframe,
    SampleMeta,
    SamplePerson,
    SampleRecord,
    SampleVideo,
)
from tasks.base import Stage, StageError, VideoContext
from tasks.clip import write_clip


def producer() -> str:
    try:
        return f"lumosx-curate {version('lumosx-curate')}"
    except PackageNotFoundError:
        return "lumosx-curate (not installed)"


class SampleStage(Stage[SampleRecord]):
    name = "sample"
    version = "1"
    record_type = SampleRecord
    requires = ("caption", "keyframes", "faces")

    def settings(self):
        return self.config.clip

    def process(self, videos: list[VideoContext]) -> dict[str, SampleRecord | StageError]:
        return {ctx.video_id: self._one(ctx) for ctx in videos}

    def _one(self, ctx: VideoContext) -> SampleRecord:
        caption = ctx.record("caption", CaptionRecord)
        keyframes = ctx.record("keyframes", KeyframesRecord)
        faces = ctx.record("faces", FacesRecord)
        persons = faces.persons_with_face
        if not persons:
            raise StageError("no_face", "no person with a usable face")
        key = ctx.video_id
        final = self.work.samples / key
        self.work.samples.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=self.work.samples))
        try:
            clip = write_clip(ctx.video.uri, ctx.video, self.config.clip, tmp / "mp4")
            (tmp / "caption.txt").write_text(caption.caption, encoding="utf-8")
            sample_persons = []
            for p in persons:
                member = f"face_{p.person_id}.png"
                shutil.copyfile(self.work.abs(p.face_path), tmp / member)
                sample_persons.append(
                    SamplePerson(
                        person_id=p.person_id,
                        face=member,
                        face_keyframe=p.face.keyframe,
                        face_box=p.face.box,
                        face_score=p.face.score,
                        face_quality=p.face.quality,
                        boxes=p.boxes,
                    )
                )
            models: dict[str, ModelInfo] = {"persons": self._persons_model(ctx), "faces": faces.model}
            if caption.model is not None:
                models["caption"] = caption.model
            random_stages = sorted(s for s, m in models.items() if m.random_weights)
            meta = SampleMeta(
                key=key,
                caption=caption.caption,
                caption_source=caption.source,
                video=SampleVideo(
                    uri=ctx.video.uri,
                    content_id=ctx.video.video_id,
                    fps=ctx.video.fps,
                    width=ctx.video.width,
                    height=ctx.video.height,
                    duration_s=ctx.video.duration_s,
                    num_frames=ctx.video.num_frames,
                    clip_width=clip.width,
                    clip_height=clip.height,
                    clip_reencoded=clip.reencoded,
                ),
                keyframes=[
                    SampleKeyframe(index=k.index, position=k.position, time_s=k.time_s, frame_index=k.frame_index)
                    for k in keyframes.keyframes
                ],
                persons=sample_persons,
                persons_without_face=[
                    PersonWithoutFace(person_id=p.person_id, reason=p.no_face_reason or "no face")
                    for p in faces.persons
                    if not p.has_face
                ],
                models=models,
                random_weights=bool(random_stages),
                random_weight_stages=random_stages,
                config_fingerprint=fingerprint(self.config),
                stage_fingerprints={s: ctx.fingerprints[s] for s in sorted(ctx.fingerprints)},
                producer=producer(),
            )
            (tmp / "meta.json").write_text(meta.model_dump_json(indent=1), encoding="utf-8")
            members = sorted(p.name for p in tmp.iterdir())
            num_bytes = sum((tmp / m).stat().st_size for m in members)
            if final.exists():  # an older version of this sample (different fingerprint)
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return SampleRecord(
            key=key,
            directory=self.work.rel(final),
            members=members,
            num_bytes=num_bytes,
            num_persons=len(faces.persons),
            num_faces=len(persons),
        )

    def _persons_model(self, ctx: VideoContext) -> ModelInfo:
        from schemas.records import PersonsRecord

        return ctx.record("persons", PersonsRecord).model
