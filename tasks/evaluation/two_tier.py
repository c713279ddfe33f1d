"""The paper's decoupled two-tier subject metrics on the middle frame of a generated video.

Tier 1 (faces): an open-vocabulary detector (the paper: Florence-2) looks for "<face label> with <attr 1> and
<attr 2> ..." and its best box crops the subject; the face found inside that crop is compared with the reference
face by each face recogniser (ArcSim, CurSim). Tier 2 (attributes, objects): OWLv2 (threshold 0.1, best box)
finds each attribute inside its subject's crop, and each object on the whole frame; the crop is scored by
CLIP-T (crop vs the label text), CLIP-I (crop vs the reference image) and DINO-I (DINOv2 crop vs reference).

A detection failure scores 0 on every metric it would have fed (a subject not found scores 0 for its face and
for each of its attributes). Per video: face scores are averaged over subjects, CLIP-T/CLIP-I/DINO-I over every
attribute and object.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from schemas.evaluation import CaseFailure, Task
from schemas.records import Box
from tasks.evaluation.binding import crop
from tasks.evaluation.identity import calibrate
from tasks.evaluation.inputs import on_white


def subject_query(face_label: str, attributes: Sequence[str]) -> str:
    """The tier-1 text, e.g. "man with red shirt and black hat"."""
    return f"{face_label} with {' and '.join(attributes)}" if attributes else face_label


@dataclass
class Entity:
    """One attribute or object to find: whose it is (subject index, None for objects), label, reference."""

    subject: int | None
    label: str
    reference: np.ndarray


@dataclass
class TwoTierResult:
    face: dict[str, float]
    clip_t: float
    clip_i: float
    dino_i: float
    failures: list[CaseFailure] = field(default_factory=list)
    subject_boxes: list[Box | None] = field(default_factory=list)


def _best(dets, phrase: str):
    hits = [d for d in dets if d.phrase == phrase]
    return max(hits, key=lambda d: d.score) if hits else None


def two_tier(
    frame: np.ndarray,
    key: str,
    task: Task,
    subjects: Sequence[tuple[str, Sequence[str]]],
    reference_faces: Mapping[str, np.ndarray],
    entities: Sequence[Entity],
    *,
    subject_detector,
    attribute_detector,
    attribute_threshold: float,
    face_detector,
    face_embedders: Mapping[str, object],
    image_text,
    image_features,
    face_floor: Mapping[str, float] | None = None,
) -> TwoTierResult:
    """subjects: (face label, attribute labels) per subject; reference_faces: recogniser name -> (m, D)."""
    failures: list[CaseFailure] = []
    queries = [subject_query(label, attrs) for label, attrs in subjects]
    found = subject_detector([frame], [queries])[0] if queries else []
    boxes: list[Box | None] = []
    for (label, _), q in zip(subjects, queries):
        hit = _best(found, q)
        boxes.append(hit.box if hit is not None else None)
        if hit is None:
            failures.append(
                CaseFailure(key=key, task=task, reason="subject_not_detected", entity=label, detail=q)
            )

    # Tier 1: the face inside each subject crop against that subject's reference face.
    face_scores: dict[str, list[float]] = {name: [] for name in face_embedders}
    crops = [crop(frame, b) if b is not None else None for b in boxes]
    present = [i for i, c in enumerate(crops) if c is not None]
    dets = (
        dict(zip(present, face_detector([np.ascontiguousarray(crops[i]) for i in present])))
        if present
        else {}
    )
    for k, (label, _) in enumerate(subjects):
        faces = dets.get(k) or []
        if crops[k] is not None and not faces:
            failures.append(CaseFailure(key=key, task=task, reason="face_not_in_subject_crop", entity=label))
        for name, embedder in face_embedders.items():
            if not faces:
                face_scores[name].append(0.0)
                continue
            embs = np.asarray(
                embedder.embed(
                    np.ascontiguousarray(crops[k]), [d.box for d in faces], [d.landmarks for d in faces]
                ),
                np.float32,
            )
            floor = (face_floor or {}).get(name, 0.0)
            face_scores[name].append(float(calibrate((embs @ reference_faces[name][k]).max(), floor)))

    # Tier 2: each attribute in its subject's crop, each object on the full frame; best box above threshold.
    entity_crops: list[np.ndarray | None] = []
    for ent in entities:
        region = frame if ent.subject is None else crops[ent.subject]
        if region is None:
            entity_crops.append(None)  # its subject was not found: already reported
            continue
        hit = _best(
            attribute_detector([np.ascontiguousarray(region)], [[ent.label]], threshold=attribute_threshold)[
                0
            ],
            ent.label,
        )
        if hit is None:
            reason = "object_not_detected" if ent.subject is None else "attribute_not_detected"
            failures.append(CaseFailure(key=key, task=task, reason=reason, entity=ent.label))
            entity_crops.append(None)
        else:
            entity_crops.append(np.ascontiguousarray(crop(region, hit.box)))
    clip_t, clip_i, dino_i = (np.zeros(len(entities)) for _ in range(3))
    found_idx = [i for i, c in enumerate(entity_crops) if c is not None]
    if found_idx:
        got = [entity_crops[i] for i in found_idx]
        refs = [entities[i].reference for i in found_idx]
        img = np.asarray(image_text.embed_images(got + refs), np.float32)
        txt = np.asarray(image_text.embed_texts([entities[i].label for i in found_idx]), np.float32)
        n = len(found_idx)
        clip_t[found_idx] = np.einsum("nd,nd->n", img[:n], txt)
        clip_i[found_idx] = np.einsum("nd,nd->n", img[:n], img[n:])
        feats = np.asarray(image_features.embed_images(got + [on_white(r) for r in refs]), np.float32)
        dino_i[found_idx] = np.einsum("nd,nd->n", feats[:n], feats[n:])

    def mean(values) -> float:
        return float(np.mean(values)) if len(values) else float("nan")

    return TwoTierResult(
        face={name: mean(v) for name, v in face_scores.items()},
        clip_t=mean(clip_t),
        clip_i=mean(clip_i),
        dino_i=mean(dino_i),
        failures=failures,
        subject_boxes=boxes,
    )
