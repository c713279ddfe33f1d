"""Score one generated video against its case: every metric of its task, with a reason for each low score.

The models come from the registries in models/ (built once per process, shared by every video of a worker).
A model that cannot be built stops the run before any video is scored (a configuration problem); a video that
cannot be read, or a metric that raises on one video, is recorded as that video's failure and the run goes on.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from schemas.evaluation import CaseFailure, EvalConfig, VideoMetrics
from schemas.official_case import OfficialCase, read_case
from tasks.evaluation import binding as binding_metric
from tasks.evaluation.dynamic import video_dynamic
from tasks.evaluation.identity import (
    detect_faces,
    embed_faces,
    identity_score,
    reference_embeddings,
    uniform_indices,
)
from tasks.evaluation.inputs import EvalItem, load_rgb, load_rgba, read_video
from tasks.evaluation.two_tier import Entity, two_tier
from tasks.evaluation.video_text import viclip_t, viclip_v

logger = logging.getLogger(__name__)


@dataclass
class CaseImages:
    """A case's reference images, decoded once: faces as RGB, attribute and object cut-outs as RGBA."""

    faces: list[np.ndarray]
    attributes: list[tuple[int, str, np.ndarray]]
    objects: list[tuple[str, np.ndarray]]

    @classmethod
    def load(cls, case: OfficialCase) -> CaseImages:
        return cls(
            faces=[load_rgb(None, s.face.read_bytes()) for s in case.subjects],
            attributes=[
                (k, a.label, load_rgba(None, a.read_bytes()))
                for k, s in enumerate(case.subjects)
                for a in s.attributes
            ],
            objects=[(o.label, load_rgba(None, o.read_bytes())) for o in case.objects],
        )


class Evaluator:
    """The models of one EvalConfig, loaded on first use, and the per-video scoring."""

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg

    # ------------------------------------------------------------------------------------------ models
    @cached_property
    def face_detector(self):
        from models.face_detector import FACE_DETECTORS

        return FACE_DETECTORS.get(self.cfg.face_detector)

    @cached_property
    def face_embedders(self) -> dict[str, Any]:
        from models.face_embedder import FACE_EMBEDDERS

        return {name: FACE_EMBEDDERS.get(spec) for name, spec in self.cfg.face_recognizers.items()}

    def _get(self, module: str, registry: str, spec):
        if spec is None:
            return None
        import importlib

        return getattr(importlib.import_module(module), registry).get(spec)

    @cached_property
    def video_text(self):
        return self._get("models.video_text", "VIDEO_TEXT", self.cfg.video_text)

    @cached_property
    def optical_flow(self):
        return self._get("models.optical_flow", "OPTICAL_FLOW", self.cfg.optical_flow)

    @cached_property
    def subject_detector(self):
        return self._get("models.open_vocab_detector", "OPEN_VOCAB_DETECTORS", self.cfg.subject_detector)

    @cached_property
    def attribute_detector(self):
        return self._get("models.open_vocab_detector", "OPEN_VOCAB_DETECTORS", self.cfg.attribute_detector)

    @cached_property
    def image_text(self):
        return self._get("models.image_text", "IMAGE_TEXT", self.cfg.image_text)

    @cached_property
    def image_features(self):
        return self._get("models.image_features", "IMAGE_FEATURES", self.cfg.image_features)

    @cached_property
    def person_detector(self):
        return self._get("models.person_detector", "PERSON_DETECTORS", self.cfg.person_detector)

    @cached_property
    def binding_matcher(self):
        return self._get("models.image_text", "IMAGE_TEXT", self.cfg.binding_matcher)

    def load(self, tasks: set[str]) -> dict[str, Any]:
        """Build every model the given tasks need now (fail fast); returns role -> ModelInfo dump."""
        infos: dict[str, Any] = {}
        for role in self.cfg.specs_for(tasks):
            if role.startswith("face_recognizer:"):
                model = self.face_embedders[role.split(":", 1)[1]]
            else:
                model = getattr(self, role)
            infos[role] = model.info.model_dump()
        return infos

    def _random(self, names: tuple[str, ...]) -> bool:
        models = []
        for name in names:
            model = getattr(self, name)
            models += list(model.values()) if isinstance(model, dict) else [model]
        return any(m is not None and getattr(m.info, "random_weights", False) for m in models)

    # ------------------------------------------------------------------------------------------ scoring
    def evaluate(self, item: EvalItem) -> VideoMetrics:
        started = time.perf_counter()
        row = VideoMetrics(key=item.key, case_id=item.key, task=item.task, video=str(item.video or ""))
        try:
            case = read_case(item.case_dir)
        except (ValueError, OSError) as e:
            row.failures.append(
                CaseFailure(key=item.key, task=item.task, reason="unreadable_case", detail=str(e))
            )
            return row
        row.case_id, row.num_subjects = case.case_id, len(case.subjects)
        try:
            images = CaseImages.load(case)
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            row.failures.append(
                CaseFailure(
                    key=item.key, task=item.task, reason="unreadable_case", detail=f"reference image: {e}"
                )
            )
            return row
        if item.video is None:
            row.failures.append(CaseFailure(key=item.key, task=item.task, reason="no_video"))
            return row
        try:
            frames, fps = read_video(item.video, self.cfg.max_side)
        except (ValueError, OSError) as e:  # av.error.* are OSError / ValueError subclasses
            row.failures.append(
                CaseFailure(key=item.key, task=item.task, reason="unreadable_video", detail=str(e))
            )
            return row
        row.num_frames = len(frames)
        refs = self._reference_faces(case, images, row)
        self._metric(
            row,
            "identity",
            lambda: self._identity(row, frames, refs),
            ("face_detector", "face_embedders"),
            run=item.task == "identity" and bool(case.subjects),
        )
        self._metric(
            row,
            "viclip_t",
            lambda: setattr(row, "viclip_t", viclip_t(self.video_text, frames, case.caption)),
            ("video_text",),
            run=self.cfg.video_text is not None,
        )
        self._metric(
            row,
            "dynamic",
            lambda: self._dynamic(row, frames, fps),
            ("optical_flow",),
            run=self.cfg.optical_flow is not None,
        )
        if item.task == "subject":
            self._metric(
                row,
                "viclip_v",
                lambda: self._viclip_v(row, item, frames),
                ("video_text",),
                run=self.cfg.video_text is not None,
            )
            self._metric(
                row,
                "two_tier",
                lambda: self._two_tier(row, case, images, frames, refs),
                ("subject_detector", "attribute_detector", "image_text", "image_features", "face_embedders"),
                run=bool(case.subjects or case.objects) and self._two_tier_configured,
            )
            applicable = len(case.subjects) >= 2 and any(s.attributes for s in case.subjects)
            self._metric(
                row,
                "binding",
                lambda: self._binding(row, case, images, frames, refs),
                ("binding_matcher", "person_detector", "face_embedders"),
                run=applicable and self.cfg.binding_matcher is not None,
            )
        row.seconds = time.perf_counter() - started
        return row

    @property
    def _two_tier_configured(self) -> bool:
        c = self.cfg
        return None not in (c.subject_detector, c.attribute_detector, c.image_text, c.image_features)

    def _metric(self, row: VideoMetrics, name: str, fn, models: tuple[str, ...], run: bool = True) -> None:
        if not run:
            return
        started = time.perf_counter()
        try:
            fn()
        except Exception as e:  # one metric failing on one video must not lose the others or the run
            logger.exception("%s: metric %s failed", row.key, name)
            row.failures.append(
                CaseFailure(
                    key=row.key,
                    task=row.task,
                    reason="model_error",
                    entity=name,
                    detail=f"{type(e).__name__}: {e}",
                )
            )
            return
        finally:
            row.metric_seconds[name] = time.perf_counter() - started
        if self._random(models):
            row.random_weight_metrics.append(name)

    def _reference_faces(
        self, case: OfficialCase, images: CaseImages, row: VideoMetrics
    ) -> dict[str, np.ndarray]:
        if not case.subjects or not self.face_embedders:
            return {}
        faces = images.faces
        out = {}
        for name, emb in self.face_embedders.items():
            out[name], detected = reference_embeddings(self.face_detector, emb, faces)
        for subject, ok in zip(case.subjects, detected):
            if not ok:
                row.failures.append(
                    CaseFailure(
                        key=row.key,
                        task=row.task,
                        reason="reference_face_not_detected",
                        entity=subject.face.label,
                        detail="whole reference image embedded",
                    )
                )
        return out

    def _identity(self, row: VideoMetrics, frames: np.ndarray, refs: dict[str, np.ndarray]) -> None:
        picked = [frames[i] for i in uniform_indices(len(frames), self.cfg.identity_max_frames)]
        dets = detect_faces(self.face_detector, picked)
        no_face = sum(not d for d in dets)
        if no_face:
            row.failures.append(
                CaseFailure(
                    key=row.key,
                    task=row.task,
                    reason="no_face_found",
                    frames=no_face,
                    detail=f"{no_face} of {len(picked)} frames",
                )
            )
        partial = 0
        for name, emb in self.face_embedders.items():
            result = identity_score(
                embed_faces(emb, picked, dets), refs[name], self.cfg.face_cosine_floor.get(name, 0.0)
            )
            row.identity[name] = result.score
            partial = max(partial, result.frames_with_miss - no_face)
        if partial:  # faces were found, but fewer than the case's references
            row.failures.append(
                CaseFailure(
                    key=row.key,
                    task=row.task,
                    reason="face_missed",
                    frames=partial,
                    detail=f"fewer faces than references in {partial} of {len(picked)} frames",
                )
            )

    def _dynamic(self, row: VideoMetrics, frames: np.ndarray, fps: float) -> None:
        small = frames
        h, w = frames.shape[1:3]
        if max(h, w) > self.cfg.dynamic_max_side:
            from PIL import Image

            s = self.cfg.dynamic_max_side / max(h, w)
            size = (max(8, round(w * s)), max(8, round(h * s)))
            small = np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BILINEAR)) for f in frames])
        row.dynamic = float(video_dynamic(self.optical_flow, small, fps, self.cfg.dynamic_fps).dynamic)

    def _viclip_v(self, row: VideoMetrics, item: EvalItem, frames: np.ndarray) -> None:
        if item.ground_truth is None:
            row.failures.append(CaseFailure(key=row.key, task=row.task, reason="no_ground_truth"))
            return
        gt, _ = read_video(item.ground_truth, self.cfg.max_side)
        row.viclip_v = viclip_v(self.video_text, frames, gt)

    def _two_tier(
        self, row: VideoMetrics, case: OfficialCase, images: CaseImages, frames: np.ndarray, refs
    ) -> None:
        middle = frames[len(frames) // 2]
        subjects = [(s.face.label, [a.label for a in s.attributes]) for s in case.subjects]
        entities = [Entity(k, label, ref) for k, label, ref in images.attributes]
        entities += [Entity(None, label, ref) for label, ref in images.objects]
        result = two_tier(
            middle,
            row.key,
            row.task,
            subjects,
            refs,
            entities,
            subject_detector=self.subject_detector,
            attribute_detector=self.attribute_detector,
            attribute_threshold=self.cfg.attribute_threshold,
            face_detector=self.face_detector,
            face_embedders=self.face_embedders,
            image_text=self.image_text,
            image_features=self.image_features,
            face_floor=self.cfg.face_cosine_floor,
        )
        row.tier1_face = {k: v for k, v in result.face.items() if not math.isnan(v)}
        row.clip_t, row.clip_i, row.dino_i = result.clip_t, result.clip_i, result.dino_i
        row.failures.extend(result.failures)

    def _binding(
        self, row: VideoMetrics, case: OfficialCase, images: CaseImages, frames: np.ndarray, refs
    ) -> None:
        if not self.face_embedders:
            raise ValueError("the binding score needs a face recogniser (face_recognizers is empty)")
        name, embedder = next(iter(self.face_embedders.items()))  # the first recogniser decides who is who
        picked = uniform_indices(len(frames), self.cfg.binding_frames)
        attributes = images.attributes
        shown = [frames[i] for i in picked]
        dets = detect_faces(self.face_detector, shown)
        embs = embed_faces(embedder, shown, dets)
        persons = self.person_detector(shown) if self.person_detector is not None else [[] for _ in shown]
        decisions = []
        for idx, image, ds, e, ps in zip(picked, shown, dets, embs, persons):
            _, made = binding_metric.bind_frame(
                image,
                idx,
                [d.box for d in ds],
                e,
                refs[name],
                [p.box for p in ps],
                attributes,
                self.binding_matcher,
                use_text=self.cfg.binding_use_text,
            )
            decisions += made
        result = binding_metric.summarise(decisions)
        row.binding_accuracy, row.swap_rate = result.accuracy, result.swap_rate
        row.binding_attributes, row.binding = len(attributes), result.decisions
        missing = {case.subjects[d.subject].face.label for d in decisions if d.outcome == "person_not_found"}
        for label in sorted(missing):
            row.failures.append(
                CaseFailure(key=row.key, task=row.task, reason="person_not_found", entity=label)
            )
