"""Keyframes made from real photos of people, written the way the keyframes stage writes them.

The persons and faces stages only read keyframe images and records, so their tests skip video encoding: three
frames of a slow camera pan over a real photo (the sample videos' moves, flows/sample_data.py) go straight into a
work directory with their `KeyframesRecord`. Nothing here is committed media: the photos ship inside insightface
and scikit-image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from flows.sample_data import astronaut_photo, camera_move, group_photo
from schemas.records import Keyframe, KeyframesRecord, VideoRecord
from tasks.base import VideoContext, WorkDir

POSITIONS = (0.05, 0.5, 0.95)


def group_pan_frames(size: tuple[int, int] = (640, 360)) -> list[np.ndarray]:
    """The group photo (six visible faces) panned as in the `group_pan` sample video, at the three keyframes."""
    frames = camera_move(group_photo(), (0, 50, 1280, 770), (60, 40, 1220, 692.5), size, 21)
    return [np.asarray(f) for i, f in enumerate(frames) if i in (1, 10, 19)]


def astronaut_frames() -> list[np.ndarray]:
    frames = camera_move(astronaut_photo(), (0, 64, 512, 448), (96, 40, 416, 280), (480, 360), 21)
    return [np.asarray(f) for i, f in enumerate(frames) if i in (1, 10, 19)]


def video_with_keyframes(work: WorkDir, video_id: str, frames: list[np.ndarray]) -> VideoContext:
    """Write `frames` as the video's keyframes (PNG + ok record) and return its context."""
    h, w = frames[0].shape[:2]
    keyframes = []
    for i, (frame, pos) in enumerate(zip(frames, POSITIONS)):
        path: Path = work.media(video_id) / f"kf_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(frame).save(path)
        keyframes.append(
            Keyframe(
                index=i,
                position=pos,
                target_time_s=3.0 * pos,
                time_s=3.0 * pos,
                frame_index=round(48 * pos),
                path=work.rel(path),
                width=frame.shape[1],
                height=frame.shape[0],
            )
        )
    work.save_ok("keyframes", video_id, "test", KeyframesRecord(video_id=video_id, keyframes=keyframes))
    video = VideoRecord(
        video_id=video_id,
        uri=f"/videos/{video_id}.mp4",
        size_bytes=1,
        container="mov,mp4,m4a,3gp,3g2,mj2",
        codec="h264",
        width=w,
        height=h,
        fps=16.0,
        duration_s=3.0,
        num_frames=48,
    )
    return VideoContext(video=video, work=work, fingerprints={})
