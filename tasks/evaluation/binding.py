"""The binding score: are each subject's attributes on *that* subject's person, or on someone else?

No published metric checks this, yet it is the point of LumosX's relational attention: a model that copies every
attribute somewhere into the scene scores well on CLIP-I/DINO-I and still puts the red jacket on the wrong person.

Per frame:
1. every detected face is a person; the reference faces are matched one-to-one to them (Hungarian on face
   cosine similarity, as in the identity metric), so subject k has a person (or none: not found);
2. each person's body region is the person detection around its face (the tightest person box holding the face
   centre in its upper part, when no other face shares that box), else a face-anchored box: three face widths
   wide, from the top of the face down to three and a half face heights below the chin;
3. each attribute reference of subject k is compared with every person's body crop: image similarity (crop vs
   the reference image) plus, when the text gives a signal, text similarity (crop vs the attribute label),
   averaged. The attribute is **correct** when its own person scores higher than every other person,
   **swapped** when another *subject's* person scores highest, **elsewhere** when a bystander does.

Per video: binding accuracy = correct / decisions, swap rate = swapped / decisions, over every attribute of
every subject on every scored frame; a subject with no person counts its attributes as not correct.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from schemas.evaluation import BindingDecision
from schemas.records import Box
from tasks.evaluation.identity import hungarian_match


def face_anchored_body(face: Box, width: int, height: int) -> Box:
    fw, fh = face.width, face.height
    return Box(x0=face.x0 - fw, y0=face.y0, x1=face.x1 + fw, y1=face.y1 + 3.5 * fh).clip(width, height)


def body_regions(faces: Sequence[Box], persons: Sequence[Box], width: int, height: int) -> list[Box]:
    """One body box per face: the tightest person box around it that holds no other face, else face-anchored."""
    out = []
    for i, face in enumerate(faces):
        cx, cy = face.center
        best = None
        for p in persons:
            holds = p.x0 <= cx <= p.x1 and p.y0 <= cy <= p.y0 + 0.45 * p.height
            shared = any(
                j != i and p.x0 <= f.center[0] <= p.x1 and p.y0 <= f.center[1] <= p.y1
                for j, f in enumerate(faces)
            )
            if holds and not shared and (best is None or p.area < best.area):
                best = p
        out.append(best.clip(width, height) if best is not None else face_anchored_body(face, width, height))
    return out


def crop(image: np.ndarray, box: Box) -> np.ndarray:
    h, w = image.shape[:2]
    x0, y0, x1, y1 = box.pixel_bounds(w, h)
    if x1 <= x0 or y1 <= y0:
        return image[:1, :1]
    return image[y0:y1, x0:x1]


@dataclass
class FramePersons:
    faces: list[Box]
    bodies: list[Box]
    subject_of: list[int | None]
    """per person: the index of the subject whose reference face it matched, or None (a bystander)"""
    face_similarity: list[float | None] = field(default_factory=list)

    def person_of(self, subject: int) -> int | None:
        return self.subject_of.index(subject) if subject in self.subject_of else None


def match_persons(
    face_boxes: Sequence[Box],
    face_embs: np.ndarray,
    reference_embs: np.ndarray,
    person_boxes: Sequence[Box],
    width: int,
    height: int,
    min_similarity: float = 0.0,
) -> FramePersons:
    """Persons of one frame with their body regions and the subject each one is (Hungarian on face cosine)."""
    faces = list(face_boxes)
    subject_of: list[int | None] = [None] * len(faces)
    sims: list[float | None] = [None] * len(faces)
    if len(faces) and len(reference_embs):
        for ref, person, s in hungarian_match(reference_embs @ np.asarray(face_embs).T):
            if s >= min_similarity:
                subject_of[person], sims[person] = ref, s
    return FramePersons(faces, body_regions(faces, person_boxes, width, height), subject_of, sims)


def attribute_scores(
    matcher,
    frame: np.ndarray,
    persons: FramePersons,
    references: Sequence[np.ndarray],
    labels: Sequence[str],
    use_text: bool = True,
) -> np.ndarray:
    """(attributes, persons) similarity: image similarity, averaged with text similarity where the label gives
    the matcher a signal (the colour matcher has none for "sunglasses"; its text row is zero)."""
    if not persons.bodies or not references:
        return np.zeros((len(references), len(persons.bodies)), np.float32)
    bodies = matcher.embed_images([np.ascontiguousarray(crop(frame, b)) for b in persons.bodies])
    sim = np.asarray(matcher.embed_images(list(references)), np.float32) @ np.asarray(bodies).T
    if use_text:
        texts = np.asarray(matcher.embed_texts(list(labels)), np.float32)
        has_signal = np.linalg.norm(texts, axis=1) > 0
        tsim = texts @ np.asarray(bodies).T
        sim = np.where(has_signal[:, None], (sim + tsim) / 2, sim)
    return sim


def decide(
    scores: np.ndarray, persons: FramePersons, owners: Sequence[int], labels: Sequence[str], frame_index: int
) -> list[BindingDecision]:
    """One decision per attribute (row of `scores`), owned by subject `owners[row]`."""
    out = []
    for row, (subject, label) in enumerate(zip(owners, labels)):
        own = persons.person_of(subject)
        if own is None:
            out.append(
                BindingDecision(
                    subject=subject, attribute=label, frame=frame_index, outcome="person_not_found"
                )
            )
            continue
        others = [p for p in range(len(persons.bodies)) if p != own]
        own_score = float(scores[row, own])
        if not others:
            out.append(
                BindingDecision(
                    subject=subject,
                    attribute=label,
                    frame=frame_index,
                    outcome="correct",
                    own_score=own_score,
                )
            )
            continue
        best = max(others, key=lambda p: scores[row, p])
        best_score = float(scores[row, best])
        if own_score > best_score:
            outcome = "correct"
        elif persons.subject_of[best] is not None:
            outcome = "swapped"
        else:
            outcome = "elsewhere"
        out.append(
            BindingDecision(
                subject=subject,
                attribute=label,
                frame=frame_index,
                outcome=outcome,
                own_score=own_score,
                best_other_score=best_score,
            )
        )
    return out


@dataclass
class BindingResult:
    accuracy: float
    swap_rate: float
    decisions: list[BindingDecision]


def summarise(decisions: Sequence[BindingDecision]) -> BindingResult:
    n = len(decisions)
    if n == 0:
        return BindingResult(float("nan"), float("nan"), [])
    correct = sum(d.outcome == "correct" for d in decisions)
    swapped = sum(d.outcome == "swapped" for d in decisions)
    return BindingResult(correct / n, swapped / n, list(decisions))


def bind_frame(
    frame: np.ndarray,
    frame_index: int,
    face_boxes: Sequence[Box],
    face_embs: np.ndarray,
    reference_embs: np.ndarray,
    person_boxes: Sequence[Box],
    attributes: Sequence[tuple[int, str, np.ndarray]],
    matcher,
    use_text: bool = True,
    min_face_similarity: float = 0.0,
) -> tuple[FramePersons, list[BindingDecision]]:
    """The whole per-frame procedure. attributes: (subject index, label, reference image) triples."""
    h, w = frame.shape[:2]
    persons = match_persons(face_boxes, face_embs, reference_embs, person_boxes, w, h, min_face_similarity)
    owners = [a[0] for a in attributes]
    labels = [a[1] for a in attributes]
    scores = attribute_scores(matcher, frame, persons, [a[2] for a in attributes], labels, use_text)
    return persons, decide(scores, persons, owners, labels, frame_index)
