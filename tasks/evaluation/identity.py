"""Identity preservation (ArcSim / CurSim of the paper): Hungarian matching of frame faces to reference faces.

Per frame: detect faces, embed them, and match them one-to-one to the reference faces by maximising the summed
cosine similarity (scipy's `linear_sum_assignment`). Per video: the sum of the matched cosines over all frames,
divided by frames x reference faces. A reference face with no partner in a frame (fewer faces found than
references) adds 0, so a missed face pulls the score down instead of vanishing from the mean. A negative cosine
is counted as 0 too: a match that is worse than orthogonal says "not this person", like a miss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from schemas.records import Box


def hungarian_match(sim: np.ndarray) -> list[tuple[int, int, float]]:
    """(row, column, similarity) of the one-to-one assignment with the largest summed similarity."""
    sim = np.asarray(sim, dtype=np.float64)
    if sim.size == 0:
        return []
    rows, cols = linear_sum_assignment(sim, maximize=True)
    return [(int(r), int(c), float(sim[r, c])) for r, c in zip(rows, cols)]


def calibrate(cosine: np.ndarray | float, floor: float = 0.0) -> np.ndarray:
    """(cos - floor) / (1 - floor), clipped at 0. floor 0 = the paper's raw cosine (ArcFace-like recognisers centre
    unrelated faces near 0). Recognisers whose unrelated faces sit far above 0 (dlib: ~0.85) get the cosine of their
    own same-person threshold as floor, so an unrelated face scores 0 like a miss."""
    return np.maximum(0.0, (np.asarray(cosine, dtype=np.float64) - floor) / (1.0 - floor))


def frame_score(found: np.ndarray, references: np.ndarray, floor: float = 0.0) -> tuple[float, int]:
    """Summed matched similarity of one frame (negative -> 0) and how many references found no face there.

    found: (n, D) and references: (m, D), both L2-normalised.
    """
    m = len(references)
    if len(found) == 0:
        return 0.0, m
    matches = hungarian_match(calibrate(references @ found.T, floor))
    return sum(max(0.0, s) for _, _, s in matches), m - len(matches)


@dataclass
class IdentityResult:
    score: float
    frames: int
    references: int
    frames_with_miss: int = 0
    per_frame: list[float] = field(default_factory=list)
    """each frame's summed matched cosine divided by the number of references"""


def identity_score(
    found_per_frame: Sequence[np.ndarray], references: np.ndarray, floor: float = 0.0
) -> IdentityResult:
    """sum over frames of matched cosines / (frames x references); 0 with no frames or references."""
    m = len(references)
    per_frame, misses = [], 0
    for found in found_per_frame:
        found = np.asarray(found, dtype=np.float32).reshape(-1, references.shape[1])
        total, missed = frame_score(found, references, floor)
        per_frame.append(total / m if m else 0.0)
        misses += missed > 0
    score = float(np.mean(per_frame)) if per_frame and m else 0.0
    return IdentityResult(score, len(per_frame), m, misses, per_frame)


def reference_embeddings(detector, embedder, faces: Sequence[np.ndarray]) -> tuple[np.ndarray, list[bool]]:
    """Embed reference face crops: the largest detected face of each, or the whole crop when none is found
    (benchmark crops are tight; a detector can miss a face that fills the image). Returns the (m, D) embeddings
    and, per reference, whether a face was detected."""
    boxes, lms, detected = [], [], []
    for img, dets in zip(faces, detector(list(faces))):
        h, w = img.shape[:2]
        if dets:
            best = max(dets, key=lambda d: d.box.area)
            boxes.append([best.box])
            lms.append([best.landmarks])
            detected.append(True)
        else:
            boxes.append([Box(x0=0, y0=0, x1=w, y1=h)])
            lms.append([None])
            detected.append(False)
    embs = embedder(list(faces), boxes, lms)
    return np.concatenate([np.asarray(e, dtype=np.float32) for e in embs], axis=0), detected


def detect_faces(detector, frames: Sequence[np.ndarray]) -> list[list]:
    """FaceDets per frame (face_detector.FaceDet: box, score, landmarks)."""
    return detector(list(frames))


def embed_faces(embedder, frames: Sequence[np.ndarray], dets: Sequence[Sequence]) -> list[np.ndarray]:
    """The detected faces of every frame, embedded: one (n_i, D) array per frame (n_i may be 0)."""
    with_faces = [i for i, ds in enumerate(dets) if ds]
    out: list[np.ndarray] = [np.zeros((0, 0), np.float32) for _ in frames]
    if with_faces:
        embs = embedder(
            [frames[i] for i in with_faces],
            [[d.box for d in dets[i]] for i in with_faces],
            [[d.landmarks for d in dets[i]] for i in with_faces],
        )
        for i, e in zip(with_faces, embs):
            out[i] = np.asarray(e, dtype=np.float32)
    return out


def uniform_indices(n: int, k: int | None) -> list[int]:
    """k indices spread evenly over range(n) (all of them when k is None or >= n)."""
    if k is None or k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)}) if k > 1 else [n // 2]
