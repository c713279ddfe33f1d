"""Faces stage: link person detections into persons and give each its best face crop (paper step 3a, faces).

Per video:

1. Faces are searched inside every person box (grown by `person_margin`), on every keyframe, and mapped back to
   frame coordinates. With `persons_from_faces` the whole keyframe is searched too (see below). Duplicates (the
   same face seen from two overlapping person boxes) are merged by NMS.
2. Each face is scored: size, detector score, sharpness, frontalness -> `FaceQuality` (usable or not, and why).
3. On each keyframe, faces are assigned to person boxes, one face per person at most: a face belongs to the person
   box that contains it best, preferring boxes whose top centre (where a head is) is nearest; several candidates
   are resolved jointly by Hungarian matching.
4. The keyframes' persons are linked into persons across the video by Hungarian matching on box IoU, starting from
   the keyframe with the most persons (ties: the middle one).
5. Each person keeps its best usable face over the keyframes; its bounding-box crop (grown by `crop_margin`) is
   saved as a PNG. Persons without a usable face stay in the record with `no_face_reason`.

Persons from faces: a weak person detector (OpenCV's HOG in the offline profile) misses seated, cropped or
close-up people although their faces are plain to see. With `persons_from_faces`, a usable face that lies outside
every person box becomes a person of its own (`source="face"`), its box extrapolated from the face: three face
widths wide and down to seven face heights below the chin, clipped to the frame (a rough upper-body/body prior for
the later attribute stages). A weak face (unusable) never creates a person: most are false positives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy.optimize import linear_sum_assignment

from models.face_detector import FACE_DETECTORS, FaceDet
from schemas.config import FaceConfig
from schemas.records import Box, FaceDetection, FaceQuality, FacesRecord, Person, PersonsRecord
from tasks.base import Stage, StageError, VideoContext, encode_png
from tasks.persons import load_keyframes

logger = logging.getLogger(__name__)

MIN_FACE_IN_PERSON = 0.6
"""A face belongs to a person box only if at least this share of the face lies inside it."""
DUPLICATE_FACE_IOU = 0.5
NOSE_DEPTH = 0.5
"""How far the nose tip stands out of the eye plane, relative to the eye distance (frontalness)."""
SHARPNESS_SIDE = 112
"""Faces are resized to this size before measuring sharpness, so big and small faces are judged alike."""


# ---------------------------------------------------------------------------------------------------- quality
def sharpness(gray_face: np.ndarray) -> float:
    """Variance of the Laplacian (a standard focus measure) of a grey face crop at a fixed size."""
    if gray_face.size == 0:
        return 0.0
    face = cv2.resize(gray_face, (SHARPNESS_SIDE, SHARPNESS_SIDE), interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(face, cv2.CV_64F).var())


def frontalness(landmarks: list[tuple[float, float]] | None) -> float | None:
    """1 for a frontal face, falling linearly to 0 at a profile (90 degrees yaw); None without 5 landmarks.

    The nose tip of a frontal face lies on the line joining the eye midpoint and the mouth midpoint; turning the
    head by a yaw angle moves it off that line by about depth * sin(yaw), while the eye distance shrinks to
    eye_dist * cos(yaw). With the nose tip standing out about half the eye distance (NOSE_DEPTH, a typical adult
    face), yaw = atan(offset / (NOSE_DEPTH * eye_distance)). Roll-invariant (measured along the face's own axis).
    frontalness = 1 - yaw / 90 degrees: 0.5 at 45 degrees.
    """
    if landmarks is None or len(landmarks) != 5:
        return None
    le, re, nose, ml, mr = (np.asarray(p, dtype=np.float64) for p in landmarks)
    eyes, mouth = (le + re) / 2, (ml + mr) / 2
    axis = mouth - eyes
    eye_dist = float(np.linalg.norm(re - le))
    axis_len = float(np.linalg.norm(axis))
    if eye_dist < 1e-6 or axis_len < 1e-6:
        return 0.0
    rel = nose - eyes
    offset = abs(axis[0] * rel[1] - axis[1] * rel[0]) / axis_len
    yaw = np.arctan2(offset, NOSE_DEPTH * eye_dist)
    return float(1.0 - yaw / (np.pi / 2))


def _saturate(value: float, good_enough: float) -> float:
    return 1.0 if good_enough <= 0 else min(1.0, value / good_enough)


def face_quality(image: np.ndarray, det: FaceDet, cfg: FaceConfig) -> FaceQuality:
    """Measure one face and decide whether it is usable as a training condition."""
    b = det.box
    crop = image[int(b.y0) : int(np.ceil(b.y1)), int(b.x0) : int(np.ceil(b.x1))]
    gray = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY) if crop.size else crop
    size = min(b.width, b.height)
    sharp = sharpness(gray)
    front = frontalness(det.landmarks)
    reasons = []
    if det.score < cfg.min_score:
        reasons.append(f"low_score: {det.score:.2f} < {cfg.min_score}")
    if size < cfg.min_size_px:
        reasons.append(f"small: {size:.0f} px < {cfg.min_size_px}")
    if sharp < cfg.min_sharpness:
        reasons.append(f"blurry: sharpness {sharp:.1f} < {cfg.min_sharpness}")
    if front is not None and front < cfg.min_frontalness:
        reasons.append(f"not_frontal: {front:.2f} < {cfg.min_frontalness}")
    # Each factor saturates at "good enough", so the best face is the one that is good on every count, not
    # the biggest one: size at 4x the minimum, sharpness at 5x the minimum.
    score = (
        det.score
        * (1.0 if front is None else front)
        * _saturate(size, 4 * cfg.min_size_px)
        * _saturate(sharp, 5 * cfg.min_sharpness)
    )
    return FaceQuality(
        size_px=round(size, 1),
        det_score=round(det.score, 4),
        sharpness=round(sharp, 2),
        frontalness=None if front is None else round(front, 3),
        score=round(float(score), 4),
        usable=not reasons,
        reason="; ".join(reasons) or None,
    )


# ----------------------------------------------------------------------------------------- geometry and matching
def nms_faces(faces: list[FaceDet], iou: float = DUPLICATE_FACE_IOU) -> list[FaceDet]:
    """Greedy NMS: the same face found in two overlapping person boxes is kept once, with its best score."""
    kept: list[FaceDet] = []
    for f in sorted(faces, key=lambda f: -f.score):
        if all(f.box.iou(k.box) < iou for k in kept):
            kept.append(f)
    return kept


def face_person_affinity(face: Box, person: Box) -> float:
    """How well a face fits a person box: containment, minus a penalty for lying far from where a head is.

    Group photos have heavily overlapping person boxes that all contain a given face; the box whose top centre
    is nearest to the face is the face's own. Returns 0 when the face is not inside the box (enough).
    """
    inside = face.fraction_inside(person)
    if inside < MIN_FACE_IN_PERSON or person.width <= 0 or person.height <= 0:
        return 0.0
    fx, fy = face.center
    dx = abs(fx - (person.x0 + person.x1) / 2) / person.width  # 0 .. 0.5 inside the box
    dy = max(0.0, fy - person.y0) / person.height  # 0 at the top, 1 at the bottom
    return max(1e-3, inside - 0.5 * dx - 0.25 * dy)


def assign_faces(persons: list[Box], faces: list[Box]) -> tuple[dict[int, int], list[int]]:
    """Faces -> persons, at most one face per person: (face index -> person index, faces outside every box).

    A face inside a box that lost the match to a better face (two faces in one person box) is neither assigned
    nor reported as outside: it is most likely someone standing behind, whose own box the detector missed.
    """
    aff = np.array([[face_person_affinity(f, p) for p in persons] for f in faces], dtype=np.float64)
    aff = aff.reshape(len(faces), len(persons))
    outside = [i for i in range(len(faces)) if not (aff[i] > 0).any()]
    assigned: dict[int, int] = {}
    if aff.size:
        rows, cols = linear_sum_assignment(aff, maximize=True)
        assigned = {int(r): int(c) for r, c in zip(rows, cols) if aff[r, c] > 0}
    return assigned, outside


def person_box_from_face(face: Box, width: float, height: float) -> Box:
    """A person box extrapolated from a face: 3 face widths wide, from just above the face to 7 face heights
    below the chin, clipped to the frame."""
    cx = (face.x0 + face.x1) / 2
    return Box(
        x0=cx - 1.5 * face.width,
        y0=face.y0 - 0.25 * face.height,
        x1=cx + 1.5 * face.width,
        y1=face.y1 + 7.0 * face.height,
    ).clip(width, height)


def link_affinity(a: Box, b: Box, face_a: Box | None = None, face_b: Box | None = None) -> float:
    """How likely two keyframes' person entries are one person: IoU of the person boxes or, when both have a
    face, of the faces if higher. Faces locate a person far more precisely than a person box does, and they
    link a detector box on one keyframe with a box extrapolated from the same face on another."""
    iou = a.iou(b)
    if face_a is not None and face_b is not None:
        iou = max(iou, face_a.iou(face_b))
    return iou


def link_across_keyframes(
    boxes: dict[int, list[Box]], min_iou: float, faces: dict[int, list[Box | None]] | None = None
) -> list[dict[int, int]]:
    """Link per-keyframe persons into tracks: a list of {keyframe index: entry index on that keyframe}.

    The anchor is the keyframe with the most entries (ties: the one nearest the middle), so that as many persons
    as possible start a track. The other keyframes follow in order of distance from the anchor; each is matched
    (Hungarian, maximising `link_affinity`) against every track's entry on the track's keyframe nearest to it.
    Pairs below `min_iou` are not linked: the entry starts a new track. `faces` (optional, parallel to `boxes`)
    holds each entry's face box or None.
    """
    order = sorted(boxes)
    if not order:
        return []
    faces = faces or {kf: [None] * len(b) for kf, b in boxes.items()}
    mid = (len(order) - 1) / 2
    anchor_pos = min(range(len(order)), key=lambda i: (-len(boxes[order[i]]), abs(i - mid)))
    tracks: list[dict[int, int]] = [{order[anchor_pos]: i} for i in range(len(boxes[order[anchor_pos]]))]
    rest = sorted((i for i in range(len(order)) if i != anchor_pos), key=lambda i: (abs(i - anchor_pos), i))
    for pos in rest:
        kf = order[pos]
        aff = np.zeros((len(tracks), len(boxes[kf])))
        for t, track in enumerate(tracks):
            ref = min(track, key=lambda k: (abs(order.index(k) - pos), k))
            for c, box in enumerate(boxes[kf]):
                aff[t, c] = link_affinity(boxes[ref][track[ref]], box, faces[ref][track[ref]], faces[kf][c])
        matched: set[int] = set()
        if aff.size:
            rows, cols = linear_sum_assignment(aff, maximize=True)
            for r, c in zip(rows, cols):
                if aff[r, c] >= min_iou:
                    tracks[r][kf] = int(c)
                    matched.add(int(c))
        tracks += [{kf: c} for c in range(len(boxes[kf])) if c not in matched]
    return tracks


# ------------------------------------------------------------------------------------------------------- stage
@dataclass
class _Entry:
    """One person on one keyframe: its box, where the box came from, and the face assigned to it."""

    box: Box
    score: float
    source: str
    face: FaceDetection | None = None


@dataclass
class _Frame:
    index: int
    image: np.ndarray
    entries: list[_Entry] = field(default_factory=list)
    faces_found: int = 0


class FacesStage(Stage[FacesRecord]):
    name = "faces"
    version = "1"
    record_type = FacesRecord
    requires = ("persons",)
    uses_gpu = True

    @property
    def cfg(self) -> FaceConfig:
        return self.config.faces

    def settings(self):
        # Linking uses the persons section's match_iou: part of this stage's output too.
        return {"faces": self.cfg, "match_iou": self.config.persons.match_iou}

    def setup(self) -> None:
        self.detector = FACE_DETECTORS.get(self.cfg.model)

    def process(self, videos: list[VideoContext]) -> dict[str, FacesRecord | StageError]:
        if not hasattr(self, "detector"):
            self.setup()
        results: dict[str, FacesRecord | StageError] = {}
        for ctx in videos:
            try:
                results[ctx.video_id] = self._one(ctx)
            except StageError as e:
                results[ctx.video_id] = e
        return results

    # -- steps
    def _detect(self, frames: list[_Frame], persons: PersonsRecord) -> dict[int, list[FaceDet]]:
        """Faces per keyframe in frame coordinates: searched in every grown person box (and the whole frame)."""
        cfg = self.cfg
        regions: list[tuple[int, Box]] = []  # (keyframe, region searched)
        for fr in frames:
            h, w = fr.image.shape[:2]
            for d in persons.detections:
                if d.keyframe == fr.index:
                    regions.append((fr.index, d.box.expand(cfg.person_margin, w, h)))
            if cfg.persons_from_faces:
                regions.append((fr.index, Box(x0=0, y0=0, x1=w, y1=h)))
        by_index = {fr.index: fr for fr in frames}
        found: dict[int, list[FaceDet]] = {fr.index: [] for fr in frames}
        bs = cfg.model.batch_size
        for start in range(0, len(regions), bs):
            chunk = regions[start : start + bs]
            crops, origins = [], []
            for kf, r in chunk:
                x0, y0 = int(r.x0), int(r.y0)
                crops.append(
                    np.ascontiguousarray(by_index[kf].image[y0 : int(np.ceil(r.y1)), x0 : int(np.ceil(r.x1))])
                )
                origins.append((x0, y0))
            keep = [i for i, c in enumerate(crops) if c.shape[0] >= 8 and c.shape[1] >= 8]
            dets = self.detector([crops[i] for i in keep]) if keep else []
            for i, faces in zip(keep, dets):
                kf, (ox, oy) = chunk[i][0], origins[i]
                for f in faces:
                    box = Box(x0=f.box.x0 + ox, y0=f.box.y0 + oy, x1=f.box.x1 + ox, y1=f.box.y1 + oy)
                    lms = None if f.landmarks is None else [(x + ox, y + oy) for x, y in f.landmarks]
                    found[kf].append(FaceDet(box, f.score, lms))
        return {kf: nms_faces(faces) for kf, faces in found.items()}

    def _attach(self, fr: _Frame, persons: PersonsRecord, faces: list[FaceDet]) -> None:
        """Fill `fr.entries`: the keyframe's person boxes with their faces, plus persons made from faces."""
        h, w = fr.image.shape[:2]
        cfg = self.cfg
        fr.entries = [
            _Entry(d.box, d.score, "detector") for d in persons.detections if d.keyframe == fr.index
        ]
        fr.faces_found = len(faces)
        scored = [
            FaceDetection(
                keyframe=fr.index,
                box=f.box,
                score=round(f.score, 4),
                landmarks=f.landmarks,
                quality=face_quality(fr.image, f, cfg),
            )
            for f in faces
        ]
        search_boxes = [e.box.expand(cfg.person_margin, w, h) for e in fr.entries]
        assigned, outside = assign_faces(search_boxes, [f.box for f in scored])
        for fi, pi in assigned.items():
            fr.entries[pi].face = scored[fi]
        if cfg.persons_from_faces:
            for fi in outside:
                face = scored[fi]
                if face.quality is not None and face.quality.usable:
                    fr.entries.append(_Entry(person_box_from_face(face.box, w, h), face.score, "face", face))

    def _save_crop(self, ctx: VideoContext, image: np.ndarray, face: FaceDetection, person_id: int) -> str:
        h, w = image.shape[:2]
        b = face.box.expand(self.cfg.crop_margin, w, h)
        crop = image[int(b.y0) : int(np.ceil(b.y1)), int(b.x0) : int(np.ceil(b.x1))]
        return ctx.put(f"face_{person_id}.png", encode_png(np.ascontiguousarray(crop)))

    def _one(self, ctx: VideoContext) -> FacesRecord:
        keyframes = load_keyframes(ctx)
        persons = ctx.record("persons", PersonsRecord)
        frames = [_Frame(kf.index, ctx.rgb(kf.path)) for kf in keyframes.keyframes]
        faces = self._detect(frames, persons)
        for fr in frames:
            self._attach(fr, persons, faces[fr.index])

        tracks = link_across_keyframes(
            {fr.index: [e.box for e in fr.entries] for fr in frames},
            self.config.persons.match_iou,
            {fr.index: [e.face.box if e.face else None for e in fr.entries] for fr in frames},
        )
        by_index = {fr.index: fr for fr in frames}

        def left_to_right(track: dict[int, int]) -> tuple[float, int]:
            first = min(track)
            return by_index[first].entries[track[first]].box.center[0], first

        out: list[Person] = []
        for pid, track in enumerate(sorted(tracks, key=left_to_right)):
            entries = {kf: by_index[kf].entries[i] for kf, i in sorted(track.items())}
            seen = [e.face for e in entries.values() if e.face is not None]
            usable = [f for f in seen if f.quality is not None and f.quality.usable]
            person = Person(
                person_id=pid,
                boxes={kf: e.box for kf, e in entries.items()},
                scores={kf: round(e.score, 4) for kf, e in entries.items()},
                source="detector" if any(e.source == "detector" for e in entries.values()) else "face",
            )
            if usable:
                best = max(usable, key=lambda f: (f.quality.score, f.score))  # type: ignore[union-attr]
                person.face = best
                person.face_path = self._save_crop(ctx, by_index[best.keyframe].image, best, pid)
            elif seen:
                best = max(seen, key=lambda f: f.quality.score if f.quality else 0.0)
                person.no_face_reason = (
                    f"no usable face; best (keyframe {best.keyframe}): {best.quality.reason}"
                )
            else:
                person.no_face_reason = f"no face found in the person box on keyframes {sorted(entries)}"
            out.append(person)

        if not any(p.has_face for p in out):
            found = sum(fr.faces_found for fr in frames)
            raise StageError(
                "no_face",
                f"{len(out)} person(s), {found} face(s) found on {len(frames)} keyframes, none usable "
                f"(min_score {self.cfg.min_score}, min_size_px {self.cfg.min_size_px}, "
                f"min_sharpness {self.cfg.min_sharpness}, min_frontalness {self.cfg.min_frontalness})",
            )
        return FacesRecord(video_id=ctx.video_id, model=self.detector.info, persons=out)
