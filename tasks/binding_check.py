"""Binding check: a second model looks at every attribute binding on the pixels, after the masks stage.

The entities stage binds phrases to numbered persons from the caption and one image; its rules read text only, so
"black jacket" given to the man in the white jacket passes them, and the masks stage then dutifully finds *some*
jacket inside that man's box. This stage checks each binding with an image-text model that did not make it
(`binding.model`: CLIP, SigLIP, or the offline colour matcher; models/image_text.py):

- **phrase**: the attribute's masked crop must match its own phrase better than every phrase bound to another
  person (by more than `binding.phrase_margin`). Phrases the model cannot tell apart from the own one (text
  cosine >= `binding.same_text_cosine`: the same phrase kept for two persons, or "black jacket" vs "black shirt"
  for the colour matcher) are no evidence and are left out;
- **region**: the attribute's mask must lie in its own person's region (the person's SAM mask, else box, on the
  same keyframe) more than in any other person's (`binding.check_region`, `binding.region_margin`). This is the
  masks stage's containment check seen from the other side: where person boxes overlap, it tells whose body
  the mask is on. It is measured on pixels, not embeddings: comparing the crop's embedding with each person's
  region embedding picked the wrong person when two persons wear the same black jacket (colour matcher: 0.55
  own vs 0.84 other), because the other person showed more jacket.

Scores are cosine similarities averaged over the keyframes where the attribute has a valid mask. A binding that
fails either comparison is dropped from the sample or fails the video with reason `binding_unverified`
(`binding.on_failure`); every score goes into the record and from there into the sample's meta.json
(`persons[].attributes[].binding`), so the gallery and dataset filters can use them. A binding with nothing to
compare (one person, or a phrase without signal for the model) is kept as "unverified".

All crops and phrases of a batch go through the model in one call each.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from schemas.config import BindingConfig
from schemas.entities import BindingRecord, BindingScore, EntitiesRecord
from schemas.records import Box, FacesRecord, KeyframesRecord
from tasks.base import Stage, StageError, VideoContext
from tasks.mask_ops import mask_bbox
from tasks.masks import MasksRecord, attribute_key, mask_inside_frac, person_key

logger = logging.getLogger(__name__)


def masked_crop(frame: np.ndarray, mask: np.ndarray | None, box: Box | None = None) -> np.ndarray:
    """HxWx4 uint8 crop around `mask` (or `box`), alpha = the mask: the embedders look only at those pixels."""
    h, w = frame.shape[:2]
    if box is None:
        box = mask_bbox(mask) if mask is not None else None
        if box is None:
            raise ValueError("an empty mask has no crop")
    x0, y0, x1, y1 = box.pixel_bounds(w, h)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {box.as_tuple()} is outside the {w}x{h} frame")
    alpha = (
        np.full((y1 - y0, x1 - x0), 255, np.uint8)
        if mask is None
        else mask[y0:y1, x0:x1].astype(np.uint8) * 255
    )
    return np.dstack([frame[y0:y1, x0:x1, :3], alpha])


@dataclass
class _Check:
    """One attribute of one video: its crops (one per valid keyframe) and what they are compared with."""

    key: str
    person_id: int
    label: str
    crops: dict[int, int] = field(default_factory=dict)
    """keyframe -> index of its crop in the batch's image list"""
    overlap: dict[int, dict[int, float]] = field(default_factory=dict)
    """keyframe -> person id -> share of the attribute's mask inside that person's region"""


@dataclass
class _Video:
    ctx: VideoContext
    checks: list[_Check] = field(default_factory=list)
    phrases: dict[int, list[str]] = field(default_factory=dict)
    """person id -> its attribute phrases (the settled entities answer)"""


class BindingCheckStage(Stage[BindingRecord]):
    name = "binding"
    version = "1"
    record_type = BindingRecord
    requires = ("entities", "masks", "keyframes", "faces")
    uses_gpu = True

    def __init__(self, config, embedder: Any | None = None):
        """`embedder` replaces the configured image-text model (tests inject one built from a spec)."""
        super().__init__(config)
        self.embedder = embedder

    @property
    def cfg(self) -> BindingConfig:
        return self.config.binding

    def settings(self) -> BindingConfig:
        return self.cfg

    def setup(self) -> None:
        if self.embedder is None:
            from models.image_text import IMAGE_TEXT

            self.embedder = IMAGE_TEXT.get(self.cfg.model)

    # -- per video: the crops to embed
    def _prepare(self, ctx: VideoContext, images: list[np.ndarray]) -> _Video:
        entities = ctx.record("entities", EntitiesRecord)
        masks = ctx.record("masks", MasksRecord)
        faces = ctx.record("faces", FacesRecord)
        frames = {k.index: k for k in ctx.record("keyframes", KeyframesRecord).keyframes}
        video = _Video(ctx)
        rgb: dict[int, np.ndarray] = {}

        def frame(k: int) -> np.ndarray:
            if k not in rgb:
                rgb[k] = ctx.rgb(frames[k].path)
            return rgb[k]

        regions: dict[int, dict[int, np.ndarray | Box]] = {}

        def person_regions(k: int) -> dict[int, np.ndarray | Box]:
            """person id -> the person's SAM mask on keyframe k, else its box (every person, bound or not)."""
            if k not in regions:
                regions[k] = {}
                for person in faces.persons:
                    box = person.boxes.get(k)
                    if box is None:
                        continue
                    whole = masks.get(person_key(person.person_id))
                    wf = whole.frame(k) if whole is not None else None
                    regions[k][person.person_id] = ctx.mask(wf.mask) if wf is not None and wf.ok else box
            return regions[k]

        for subject in entities.answer.subjects:
            video.phrases[subject.person_id] = [a.phrase for a in subject.attributes]
            for j, attr in enumerate(subject.attributes):
                check = _Check(attribute_key(subject.person_id, j), subject.person_id, attr.phrase)
                entity = masks.get(check.key)
                for mf in entity.frames if entity is not None else []:
                    if not (mf.ok and mf.keyframe in frames):
                        continue
                    mask = ctx.mask(mf.mask)
                    check.crops[mf.keyframe] = len(images)
                    images.append(masked_crop(frame(mf.keyframe), mask))
                    if self.cfg.check_region:
                        check.overlap[mf.keyframe] = {
                            pid: _inside(mask, region) for pid, region in person_regions(mf.keyframe).items()
                        }
                video.checks.append(check)
        return video

    def process(self, videos: list[VideoContext]) -> dict[str, BindingRecord | StageError]:
        if self.embedder is None:
            self.setup()
        results: dict[str, BindingRecord | StageError] = {}
        images: list[np.ndarray] = []
        prepared: list[_Video] = []
        for ctx in videos:
            own: list[np.ndarray] = []
            try:
                video = self._prepare(ctx, own)
            except StageError as exc:
                results[ctx.video_id] = exc
                continue
            for check in video.checks:  # crop indices were counted from 0 in `own`
                check.crops = {k: i + len(images) for k, i in check.crops.items()}
            images += own
            prepared.append(video)
        phrases = sorted({p for v in prepared for ps in v.phrases.values() for p in ps})
        image_emb = self.embedder.embed_images(images) if images else np.zeros((0, 0), np.float32)
        sentences = [self.cfg.text_template.replace("{}", p) for p in phrases]
        text_emb = dict(zip(phrases, self.embedder.embed_texts(sentences))) if phrases else {}
        for video in prepared:
            scores = [self._score(video, c, image_emb, text_emb) for c in video.checks]
            failed = [s for s in scores if s.verdict == "failed"]
            if failed and self.cfg.on_failure == "fail":
                results[video.ctx.video_id] = StageError(
                    "binding_unverified", "; ".join(f"{s.key} {s.label!r}: {s.reason}" for s in failed)
                )
                continue
            if failed:
                logger.info(
                    "%s: dropping %s", video.ctx.video_id, ", ".join(f"{s.key} {s.label!r}" for s in failed)
                )
            results[video.ctx.video_id] = BindingRecord(
                video_id=video.ctx.video_id,
                model=self.embedder.info,
                on_failure=self.cfg.on_failure,
                attributes=scores,
            )
        return results

    # -- one attribute: the two comparisons and the verdict
    def _score(
        self, video: _Video, check: _Check, image_emb: np.ndarray, text_emb: dict[str, np.ndarray]
    ) -> BindingScore:
        base = {"key": check.key, "person_id": check.person_id, "label": check.label}
        if not check.crops:
            return BindingScore(**base, verdict="no_mask", reason="no valid mask on any keyframe")
        crops = image_emb[[check.crops[k] for k in sorted(check.crops)]]  # (K, D)
        out: dict[str, Any] = {**base, "keyframes": sorted(check.crops)}
        problems: list[str] = []
        no_evidence: list[str] = []

        own = text_emb[check.label]
        rivals = [
            (pid, phrase)
            for pid, phrases in sorted(video.phrases.items())
            if pid != check.person_id
            for phrase in phrases
            if text_emb[phrase].any() and float(text_emb[phrase] @ own) < self.cfg.same_text_cosine
        ]
        phrase_ok: bool | None = None
        if not own.any():
            no_evidence.append("the checking model sees no signal in the phrase")
        elif not rivals:
            no_evidence.append("no other person's phrase that the checking model can tell apart from it")
        else:
            out["phrase_score"] = _r(float((crops @ own).mean()))
            (best_pid, best_phrase), best = max(
                ((r, float((crops @ text_emb[r[1]]).mean())) for r in rivals), key=lambda x: x[1]
            )
            out.update(other_phrase_score=_r(best), other_phrase=best_phrase, other_phrase_person=best_pid)
            phrase_ok = out["phrase_score"] > out["other_phrase_score"] + self.cfg.phrase_margin
            if not phrase_ok:
                problems.append(
                    f"the crop matches {best_phrase!r} of person {best_pid} ({out['other_phrase_score']:.3f}) "
                    f"at least as well as its own phrase ({out['phrase_score']:.3f})"
                )

        if self.cfg.check_region:
            own_fracs, other_fracs = [], {}
            for k in sorted(check.overlap):
                per = check.overlap[k]
                own_fracs.append(per.get(check.person_id, 0.0))
                for pid, frac in per.items():
                    if pid != check.person_id:
                        other_fracs.setdefault(pid, []).append(frac)
            if own_fracs and other_fracs:
                out["region_score"] = _r(float(np.mean(own_fracs)))
                best_pid, best = max(
                    ((p, float(np.mean(v))) for p, v in other_fracs.items()), key=lambda x: x[1]
                )
                out.update(other_region_score=_r(best), other_region_person=best_pid)
                if out["other_region_score"] > out["region_score"] + self.cfg.region_margin:
                    problems.append(
                        f"{out['other_region_score']:.0%} of its mask lies on person {best_pid}, "
                        f"{out['region_score']:.0%} on its own person"
                    )

        if problems:
            return BindingScore(**out, verdict="failed", reason="; ".join(problems))
        if phrase_ok:
            return BindingScore(**out, verdict="verified")
        return BindingScore(**out, verdict="unverified", reason="; ".join(no_evidence) or None)


def _r(x: float) -> float:
    return round(x, 4)


def _inside(mask: np.ndarray, region: np.ndarray | Box) -> float:
    """Share of `mask`'s pixels inside `region` (a person mask, or a box)."""
    if isinstance(region, Box):
        return mask_inside_frac(mask, region)
    total = int(mask.sum())
    return int((mask & region).sum()) / total if total else 0.0
