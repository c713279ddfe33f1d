"""Assemble one sample per video: clip, caption, condition images and meta.json.

Two sample versions, chosen by `config.subjects`:

- v1 (identity-consistent): clip, caption, one bounding-box face crop per person with a usable face, and
  `schemas.sample.SampleMeta` with `schema_version` 1;
- v2 (subject-consistent, SPEC section 1): per subject bound by the entities stage, its face crop, its
  attribute cut-outs and a whole-person cut-out; the object cut-outs; the clean background plate; the masks
  of every cut-out; `SampleMeta` with `schema_version` 2 and the relation graph (which face, attributes, labels,
  keyframes, boxes and scores belong to which person). Each entity's image comes from the keyframe the
  background stage selected for it.

v2 members (i = person id, j = attribute index in the entities answer, k = object index):
    face_<i>.png        bounding-box face crop (the faces stage's crop, from the face's keyframe)
    attr_<i>_<j>.png    attribute: SAM mask cut out on white, tightly cropped; attrmask_<i>_<j>.png its mask
    person_<i>.png      whole person (person + attribute masks) on white; personmask_<i>.png its mask
    object_<k>.png      object cut-out on white; objmask_<k>.png its mask
    background.png      clean plate (absent when skipped or rejected; `background_status` says why)
Masks are 1-bit PNGs of the same size as their cut-out (its alpha, in effect); the meta gives each cut-out's
box in the source frame.

The sample is built in memory (`VideoContext.output`: WebDataset member name -> bytes) and handed to the shard
writer whole; nothing is written beside the shards. Samples made with random-weight test builds are refused here
(reason `random_weights`) unless `shards.include_random_weights` is set: they are not training data.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
from PIL import Image

from schemas.config import fingerprint
from schemas.entities import BindingRecord, EntitiesRecord
from schemas.records import Box, CaptionRecord, FacesRecord, KeyframesRecord, ModelInfo, PersonsRecord
from schemas.sample import (
    BackgroundStatus,
    DroppedEntity,
    PersonWithoutFace,
    PlateAttempt,
    SampleAttribute,
    SampleBackground,
    SampleKeyframe,
    SampleMeta,
    SampleObject,
    SamplePerson,
    SampleRecord,
    SampleVideo,
    dump_sample_meta,
)
from tasks.background import BackgroundRecord, face_key
from tasks.base import Stage, StageError, VideoContext, encode_png
from tasks.clip import ClipInfo, make_clip
from tasks.mask_ops import EmptyMaskError, cutout_on_white, foreground_union, mask_bbox, whole_person_cutout
from tasks.masks import MaskFrame, MasksRecord, attribute_key, object_key, person_key

V1_REQUIRES = ("caption", "keyframes", "faces")
SUBJECT_REQUIRES = ("entities", "masks", "binding", "background")


def producer() -> str:
    try:
        return f"lumosx-curate {version('lumosx-curate')}"
    except PackageNotFoundError:
        return "lumosx-curate (not installed)"


def random_weight_stages(models: dict[str, ModelInfo]) -> list[str]:
    """Stages (the part of a model key before '.') whose model had random test weights."""
    return sorted({name.split(".")[0] for name, m in models.items() if m.random_weights})


class SampleStage(Stage[SampleRecord]):
    name = "sample"
    version = "2"  # 2: built in memory; random-weight samples refused unless asked for
    record_type = SampleRecord
    requires = V1_REQUIRES
    reusable = False  # a finished sample is in the shards: the whole video is skipped, not this stage
    """v1 upstreams; with `config.subjects` the fingerprint also covers SUBJECT_REQUIRES (see `upstreams`)."""

    @property
    def upstreams(self) -> tuple[str, ...]:
        return V1_REQUIRES + SUBJECT_REQUIRES if self.config.subjects else V1_REQUIRES

    def settings(self):
        return {
            "clip": self.config.clip.model_dump(mode="json"),
            "schema_version": 2 if self.config.subjects else 1,
            # Decides whether a random-weight sample is written or refused.
            "include_random_weights": self.config.shards.include_random_weights,
        }

    def fingerprint(self, upstream: dict[str, str]) -> str:
        return fingerprint(self.name, self.version, self.settings(), [upstream[r] for r in self.upstreams])

    def process(self, videos: list[VideoContext]) -> dict[str, SampleRecord | StageError]:
        out: dict[str, SampleRecord | StageError] = {}
        for ctx in videos:
            try:
                out[ctx.video_id] = self._one(ctx)
            except StageError as e:
                out[ctx.video_id] = e
        return out

    def models(self, ctx: VideoContext) -> dict[str, ModelInfo]:
        """Every model that made part of this video's sample, by stage (and role)."""
        caption = ctx.record("caption", CaptionRecord)
        models = {
            "persons": ctx.record("persons", PersonsRecord).model,
            "faces": ctx.record("faces", FacesRecord).model,
        }
        if caption.model is not None:
            models["caption"] = caption.model
        if self.config.subjects:
            masks, bg = ctx.record("masks", MasksRecord), ctx.record("background", BackgroundRecord)
            models["entities"] = ctx.record("entities", EntitiesRecord).model
            models["masks.grounder"] = masks.grounder
            models["masks.segmenter"] = masks.segmenter
            models["binding"] = ctx.record("binding", BindingRecord).model
            if bg.inpainter is not None:
                models["background.inpainter"] = bg.inpainter
            if bg.plate_checker is not None:
                models["background.plate_check"] = bg.plate_checker
        return models

    def _one(self, ctx: VideoContext) -> SampleRecord:
        caption = ctx.record("caption", CaptionRecord)
        keyframes = ctx.record("keyframes", KeyframesRecord)
        faces = ctx.record("faces", FacesRecord)
        if not faces.persons_with_face:
            raise StageError("no_face", "no person with a usable face")
        models = self.models(ctx)
        random_stages = random_weight_stages(models)
        if random_stages and not self.config.shards.include_random_weights:
            # Decided before the clip is encoded: nothing is spent on a sample that will not be written.
            raise StageError(
                "random_weights",
                f"made with random-weight test builds in {random_stages}: not training data "
                "(set shards.include_random_weights=true to write such samples anyway, flagged in meta.json)",
            )
        members: dict[str, bytes] = {}
        clip_bytes, clip = make_clip(ctx.video.uri, ctx.video, self.config.clip)
        members["mp4"] = clip_bytes
        members["caption.txt"] = caption.caption.encode("utf-8")
        if self.config.subjects:
            meta = _SubjectSample(self, ctx, members, caption, keyframes, faces, clip, models).build()
        else:
            meta = self._meta_v1(ctx, members, caption, keyframes, faces, clip, models)
        members["meta.json"] = dump_sample_meta(meta)
        ctx.output = dict(sorted(members.items()))
        v = ctx.video
        return SampleRecord(
            key=ctx.video_id,
            members=list(ctx.output),
            schema_version=meta.schema_version,
            video_id=v.video_id,
            uri=v.uri,
            caption=meta.caption,
            caption_source=meta.caption_source or "unknown",
            num_persons=len(meta.persons) + len(meta.persons_without_face) + len(meta.persons_unbound),
            num_faces=len(meta.persons),
            duration_s=v.duration_s,
            fps=v.fps,
            width=v.width,
            height=v.height,
            num_bytes=sum(len(b) for b in ctx.output.values()),
            random_weights=meta.random_weights,
            config_fingerprint=meta.config_fingerprint or "",
            models={stage: f"{m.model_id}@{m.revision}" for stage, m in sorted(meta.models.items())},
        )

    def _meta_v1(
        self,
        ctx: VideoContext,
        members: dict[str, bytes],
        caption: CaptionRecord,
        keyframes: KeyframesRecord,
        faces: FacesRecord,
        clip: ClipInfo,
        models: dict[str, ModelInfo],
    ) -> SampleMeta:
        sample_persons = []
        for p in faces.persons_with_face:
            member = f"face_{p.person_id}.png"
            members[member] = ctx.data(p.face_path)
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
        random_stages = random_weight_stages(models)
        return SampleMeta(
            schema_version=1,
            key=ctx.video_id,
            caption=caption.caption,
            caption_source=caption.source,
            video=sample_video(ctx, clip),
            keyframes=sample_keyframes(keyframes),
            persons=sample_persons,
            persons_without_face=persons_without_face(faces),
            models=models,
            random_weights=bool(random_stages),
            random_weight_stages=random_stages,
            config_fingerprint=self.config.data_fingerprint(),
            stage_fingerprints={s: ctx.fingerprints[s] for s in sorted(ctx.fingerprints)},
            producer=producer(),
        )


def sample_video(ctx: VideoContext, clip: ClipInfo) -> SampleVideo:
    v = ctx.video
    return SampleVideo(
        uri=v.uri,
        content_id=v.video_id,
        fps=v.fps,
        width=v.width,
        height=v.height,
        duration_s=v.duration_s,
        num_frames=v.num_frames,
        clip_width=clip.width,
        clip_height=clip.height,
        clip_reencoded=clip.reencoded,
    )


def persons_without_face(faces: FacesRecord) -> list[PersonWithoutFace]:
    return [
        PersonWithoutFace(person_id=p.person_id, reason=p.no_face_reason or "no face")
        for p in faces.persons
        if not p.has_face
    ]


def sample_keyframes(keyframes: KeyframesRecord) -> list[SampleKeyframe]:
    return [
        SampleKeyframe(index=k.index, position=k.position, time_s=k.time_s, frame_index=k.frame_index)
        for k in keyframes.keyframes
    ]


def tight_mask(mask: np.ndarray) -> tuple[np.ndarray, Box]:
    """The mask cropped to its own box (the crop `cutout_on_white(pad=0)` makes) and that box in the frame."""
    box = mask_bbox(mask)
    if box is None:
        raise EmptyMaskError("cannot crop an empty mask")
    x0, y0, x1, y1 = (int(v) for v in box.as_tuple())
    return mask[y0:y1, x0:x1], box


class _SubjectSample:
    """Adds the v2 members of one video to `members` and returns its meta."""

    def __init__(
        self,
        stage: SampleStage,
        ctx: VideoContext,
        members: dict[str, bytes],
        caption: CaptionRecord,
        keyframes: KeyframesRecord,
        faces: FacesRecord,
        clip: ClipInfo,
        models: dict[str, ModelInfo],
    ):
        self.stage, self.ctx, self.members, self.models = stage, ctx, members, models
        self.caption, self.keyframes, self.faces, self.clip = caption, keyframes, faces, clip
        self.entities = ctx.record("entities", EntitiesRecord)
        self.masks = ctx.record("masks", MasksRecord)
        self.binding = ctx.record("binding", BindingRecord)
        self.background = ctx.record("background", BackgroundRecord)
        self.selection = self.background.selection
        self.dropped: list[DroppedEntity] = []
        self._frames: dict[int, np.ndarray] = {}

    def frame(self, k: int) -> np.ndarray:
        if k not in self._frames:
            kf = next(kf for kf in self.keyframes.keyframes if kf.index == k)
            self._frames[k] = self.ctx.rgb(kf.path)
        return self._frames[k]

    def _drop(self, key: str, label: str | None, reason: str) -> None:
        self.dropped.append(DroppedEntity(entity=key, label=label, reason=reason))

    def _chosen(self, key: str, label: str | None) -> tuple[int, MaskFrame] | None:
        """The selected keyframe of a masked entity and its mask frame, or None (recorded as dropped)."""
        entity = self.masks.get(key)
        k = self.selection.get(key)
        if entity is None or k is None:
            reasons = entity.reasons() if entity is not None else {}
            why = "; ".join(f"keyframe {kf}: {r}" for kf, r in sorted(reasons.items())) or "not masked"
            self._drop(key, label, f"no valid mask ({why})")
            return None
        frame = entity.frame(k)
        if frame is None or not frame.ok:
            raise StageError(
                "inconsistent_records",
                f"{key}: keyframe {k} was selected but the masks record has no mask there",
            )
        return k, frame

    def _write_cutout(
        self, k: int, mask: np.ndarray, image_member: str, mask_member: str, parts: Sequence[np.ndarray] = ()
    ) -> Box:
        """Cut-out on white (with `parts`: a whole person) and its mask, both cropped to the mask's box."""
        frame = self.frame(k)
        if parts:
            cut = whole_person_cutout(frame, mask, parts)
            mask = foreground_union([mask, *parts], dilate_px=0)  # the region whole_person_cutout cut out
        else:
            cut = cutout_on_white(frame, mask)
        self.members[image_member] = encode_png(cut)
        cropped, box = tight_mask(mask)
        self.members[mask_member] = encode_png(Image.fromarray(cropped))
        return box

    def build(self) -> SampleMeta:
        persons = {p.person_id: p for p in self.faces.persons}
        groups: list[SamplePerson] = []
        for subject in sorted(self.entities.answer.subjects, key=lambda s: s.person_id):
            pid = subject.person_id
            person = persons.get(pid)
            if person is None or not person.has_face:
                self._drop(face_key(pid), subject.noun, "the person has no usable face")
                continue
            face = f"face_{pid}.png"
            self.members[face] = self.ctx.data(person.face_path)
            attributes: list[SampleAttribute] = []
            for j, attr in enumerate(subject.attributes):
                key = attribute_key(pid, j)
                if self.binding.dropped(key):
                    score = self.binding.get(key)
                    self._drop(key, attr.phrase, f"binding_unverified: {score.reason if score else ''}")
                    continue
                chosen = self._chosen(key, attr.phrase)
                if chosen is None:
                    continue
                k, mf = chosen
                image, mask_member = f"attr_{pid}_{j}.png", f"attrmask_{pid}_{j}.png"
                cut_box = self._write_cutout(k, self.ctx.mask(mf.mask), image, mask_member)
                attributes.append(
                    SampleAttribute(
                        label=attr.phrase,
                        kind=attr.kind,
                        image=image,
                        mask=mask_member,
                        keyframe=k,
                        box=mf.box,
                        score=mf.score,
                        mask_score=mf.mask_score,
                        cutout_box=cut_box,
                        binding=self.binding.get(key),
                    )
                )
            whole = self._whole(pid, subject.noun, len(subject.attributes))
            groups.append(
                SamplePerson(
                    person_id=pid,
                    label=subject.noun,
                    face=face,
                    face_keyframe=person.face.keyframe,  # type: ignore[union-attr]
                    face_box=person.face.box,  # type: ignore[union-attr]
                    face_score=person.face.score,  # type: ignore[union-attr]
                    face_quality=person.face.quality,  # type: ignore[union-attr]
                    attributes=attributes,
                    boxes=person.boxes,
                    scores=person.scores,
                    **whole,
                )
            )
        for d in self.entities.dropped:  # what the entities stage left out of its answer (label rules, ...)
            key = {"attribute": "attr", "subject": "subject"}.get(d.role, d.role)
            self._drop(
                key if d.person_id is None else f"{key}_{d.person_id}", d.label, f"{d.reason}: {d.message}"
            )
        if not groups:
            raise StageError("no_subject", "no subject bound by the entities stage has a usable face")
        objects = self._objects()
        background = self._background()
        return self._meta(groups, objects, background)

    def _whole(self, pid: int, noun: str, num_attributes: int) -> dict[str, Any]:
        key = person_key(pid)
        chosen = self._chosen(key, noun)
        if chosen is None:
            return {}
        k, mf = chosen
        # Attribute masks of the same keyframe join the person mask: accessories stick out of it.
        parts = []
        for j in range(num_attributes):
            if self.binding.dropped(attribute_key(pid, j)):
                continue  # a mask that failed the binding check is not this person's: not part of them
            entity = self.masks.get(attribute_key(pid, j))
            af = entity.frame(k) if entity is not None else None
            if af is not None and af.ok:
                parts.append(self.ctx.mask(af.mask))
        mask = self.ctx.mask(mf.mask)
        image, mask_member = f"person_{pid}.png", f"personmask_{pid}.png"
        box = self._write_cutout(k, mask, image, mask_member, parts=parts)
        return {"whole": image, "whole_mask": mask_member, "whole_keyframe": k, "whole_box": box}

    def _objects(self) -> list[SampleObject]:
        out = []
        for j, phrase in enumerate(self.entities.answer.objects):
            chosen = self._chosen(object_key(j), phrase)
            if chosen is None:
                continue
            k, mf = chosen
            image, mask_member = f"object_{j}.png", f"objmask_{j}.png"
            mask = self.ctx.mask(mf.mask)
            cut_box = self._write_cutout(k, mask, image, mask_member)
            out.append(
                SampleObject(
                    label=phrase,
                    image=image,
                    mask=mask_member,
                    keyframe=k,
                    box=mf.box,
                    score=mf.score,
                    mask_score=mf.mask_score,
                    cutout_box=cut_box,
                )
            )
        return out

    def _background(self) -> SampleBackground | None:
        bg = self.background
        if bg.status != "ok" or bg.plate is None or bg.label is None:
            return None
        self.members["background.png"] = self.ctx.data(bg.plate)
        return SampleBackground(
            label=bg.label, image="background.png", keyframe=bg.keyframe, seed=bg.attempts[-1].seed
        )

    def _meta(
        self, groups: list[SamplePerson], objects: list[SampleObject], background: SampleBackground | None
    ) -> SampleMeta:
        ctx, bg, models = self.ctx, self.background, self.models
        random_stages = random_weight_stages(models)
        bound = {g.person_id for g in groups}
        return SampleMeta(
            schema_version=2,
            key=ctx.video_id,
            caption=self.caption.caption,
            caption_source=self.caption.source,
            video=sample_video(ctx, self.clip),
            keyframes=sample_keyframes(self.keyframes),
            persons=groups,
            objects=objects,
            background=background,
            background_status=BackgroundStatus(
                status=bg.status,
                reason=bg.reason,
                keyframe=bg.keyframe,
                flux_calls=bg.flux_calls,
                # tasks.background keeps its own PlateAttempt record; the sample's is the schemas one.
                attempts=[PlateAttempt.model_validate(a.model_dump()) for a in bg.attempts],
            ),
            selection=dict(sorted(self.selection.items())),
            selection_seed=bg.selection_seed,
            dropped=self.dropped,
            persons_without_face=persons_without_face(self.faces),
            persons_unbound=sorted({p.person_id for p in self.faces.persons_with_face} - bound),
            models=models,
            random_weights=bool(random_stages),
            random_weight_stages=random_stages,
            config_fingerprint=self.stage.config.data_fingerprint(),
            stage_fingerprints={s: ctx.fingerprints[s] for s in sorted(ctx.fingerprints)},
            producer=producer(),
        )
