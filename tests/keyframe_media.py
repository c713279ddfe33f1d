"""Keyframes made from real photos of people, written the way the keyframes stage writes them.

The persons and faces stages only read keyframe images and records, so their tests skip video encoding: three
frames of a slow camera pan over a real photo (the sample videos' moves, flows/sample_data.py) go straight into a
`VideoContext`'s media with their `KeyframesRecord`, as the keyframes stage puts them. Nothing here is committed
media: the photos ship inside insightface and scikit-image.
"""

from __future__ import annotations

import numpy as np

from flows.sample_data import astronaut_photo, camera_move, group_photo
from schemas.records import Keyframe, KeyframesRecord, SourceFile, VideoRecord
from tasks.base import VideoContext
from tasks.keyframes import keyframe_name

POSITIONS = (0.05, 0.5, 0.95)


def group_pan_frames(size: tuple[int, int] = (640, 360)) -> list[np.ndarray]:
    """The group photo (six visible faces) panned as in the `group_pan` sample video, at the three keyframes."""
    frames = camera_move(group_photo(), (0, 50, 1280, 770), (60, 40, 1220, 692.5), size, 21)
    return [np.asarray(f) for i, f in enumerate(frames) if i in (1, 10, 19)]


def astronaut_frames() -> list[np.ndarray]:
    frames = camera_move(astronaut_photo(), (0, 64, 512, 448), (96, 40, 416, 280), (480, 360), 21)
    return [np.asarray(f) for i, f in enumerate(frames) if i in (1, 10, 19)]


def video_context(video_id: str, width: int = 640, height: int = 360) -> VideoContext:
    """A context for a 3 s, 16 fps video, as ingest would leave it."""
    video = VideoRecord(
        video_id=video_id,
        uri=f"/videos/{video_id}.mp4",
        size_bytes=1,
        container="mov,mp4,m4a,3gp,3g2,mj2",
        codec="h264",
        width=width,
        height=height,
        fps=16.0,
        duration_s=3.0,
        num_frames=48,
    )
    source = SourceFile(uri=video.uri, size=1, version="1:0", video_id=video_id)
    return VideoContext(source=source, video=video, records={"ingest": video})


def video_with_keyframes(video_id: str, frames: list[np.ndarray]) -> VideoContext:
    """A context whose keyframes are `frames` (arrays in its media + the keyframes record)."""
    h, w = frames[0].shape[:2]
    ctx = video_context(video_id, w, h)
    keyframes = []
    for i, (frame, pos) in enumerate(zip(frames, POSITIONS)):
        name = ctx.put(keyframe_name(i), np.ascontiguousarray(frame))
        keyframes.append(
            Keyframe(
                index=i,
                position=pos,
                target_time_s=3.0 * pos,
                time_s=3.0 * pos,
                frame_index=round(48 * pos),
                path=name,
                width=frame.shape[1],
                height=frame.shape[0],
            )
        )
    ctx.records["keyframes"] = KeyframesRecord(video_id=video_id, keyframes=keyframes)
    return ctx
