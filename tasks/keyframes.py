"""Frame-exact access to a few frames of a video: the keyframes stage and the captioner's frame sampler.

For each target time we seek to the last keyframe (I-frame) at or before it and decode forward to the first frame
whose presentation time reaches it: the frame shown at that time, within one frame period, whatever the GOP
length, frame-rate variability or stream start offset. Cost per target is at most one GOP of decoding, never
the whole file (see benchmarks/bench_keyframes.py). Times are seconds from the stream's first frame, the same
origin as `VideoRecord.duration_s`. Images are upright: a frame the container says to rotate or mirror (phone
video) is turned as a player would show it. Keyframes stay in memory as arrays: nothing is written to disk.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import av
import numpy as np
from PIL import Image

from schemas.records import Keyframe, KeyframesRecord, VideoRecord
from tasks.base import Stage, StageError, VideoContext
from tasks.clip import fit_within
from tasks.ingest import frame_orientation, open_media

_EPS_S = 1e-6  # float slack when comparing a frame time with a target time


def _seek_decode(
    container: av.container.InputContainer, stream: av.VideoStream, times_s: Sequence[float]
) -> Iterator[tuple[int, float, av.VideoFrame]]:
    """Yield (index into `times_s`, frame time, frame) for every target time, in increasing time order.

    Targets are visited in time order. For each, we either keep decoding forward from where the previous target
    left off (when the keyframe before the target is not ahead of us: seeking would only re-decode frames we
    already passed; this is what makes 8 frames of a short clip cost about one GOP, not eight), or seek to the
    keyframe before it. Some demuxers (AVI, MPEG-TS, files without an index) land after the requested time, or
    on packets that do not decode; then we seek again from further back (1 s, 2 s, 4 s, ...). A target past the
    last frame gets the last frame.
    """
    tb = stream.time_base
    start = stream.start_time or 0
    index = (
        stream.index_entries
    )  # keyframe table of mp4/mov and indexed mkv; empty for MPEG-TS and raw streams

    def decode_from(seek_pts: int) -> Iterator[tuple[float, av.VideoFrame]]:
        container.seek(seek_pts, stream=stream, backward=True)
        for frame in container.decode(stream):
            pts = frame.pts if frame.pts is not None else frame.dts
            if pts is not None:
                yield float((pts - start) * tb), frame

    def worth_seeking(now_s: float, target: float) -> bool:
        if not len(index):
            return target - now_s > 1.0  # no keyframe table: seek only for jumps longer than a typical GOP
        k = index.search_timestamp(start + math.floor(target / tb), backward=True)
        return k >= 0 and float((index[k].timestamp - start) * tb) > now_s

    frames: Iterator[tuple[float, av.VideoFrame]] | None = None
    current: tuple[float, av.VideoFrame] | None = None  # the last frame decoded
    at_end = False
    for i in sorted(range(len(times_s)), key=lambda j: times_s[j]):
        target = max(0.0, times_s[i])
        if current is not None and (at_end or current[0] >= target - _EPS_S):
            yield i, current[0], current[1]  # duplicate target, or past the last frame
            continue
        if frames is None or current is None or worth_seeking(current[0], target):
            backoff = 0.0
            while True:
                seek_pts = max(start, start + math.floor((target - backoff) / tb))
                frames = decode_from(seek_pts)
                current = next(frames, None)
                # Landed past the target, or after the last keyframe (nothing decodable follows): go back further.
                if seek_pts > start and (current is None or current[0] > target + _EPS_S):
                    backoff = max(1.0, 2 * backoff)
                    continue
                break
            if current is None:
                raise StageError("decode_error", f"no frame decoded at or before {target:.3f} s")
        while current[0] < target - _EPS_S:
            nxt = next(frames, None)
            if nxt is None:
                at_end = True
                break
            current = nxt
        yield i, current[0], current[1]


def _images_at(uri: str, times_s: Sequence[float], max_side: int | None) -> list[tuple[float, np.ndarray]]:
    """(frame time, upright HxWx3 RGB array, longer side <= `max_side`) for every target time, in `times_s` order."""
    out: list = [None] * len(times_s)
    try:
        with open_media(uri) as container:
            if not container.streams.video:
                raise StageError("no_video_stream", f"{uri} has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # slice + frame threads; the seek flushes them
            for i, t, frame in _seek_decode(container, stream, times_s):
                out[i] = t, _upright_array(stream, frame, max_side)
    except av.error.FFmpegError as e:
        raise StageError("decode_error", f"cannot decode {uri}: {e}") from e
    return out


def _upright_array(stream: av.VideoStream, frame: av.VideoFrame, max_side: int | None) -> np.ndarray:
    orientation = frame_orientation(stream, frame)
    # to_ndarray converts straight into the array (PIL's to_image costs ~30x more at 720p).
    if max_side is None or max(frame.width, frame.height) <= max_side:
        array = frame.to_ndarray(format="rgb24")
    else:
        # Scale in the coded orientation (the display size's even rounding, swapped back), then turn.
        w, h = orientation.display_size(
            *fit_within(*orientation.display_size(frame.width, frame.height), max_side)
        )
        array = frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="AREA")
    return orientation.apply_array(array)


def sample_frames(uri: str, times_s: list[float], max_side: int | None = None) -> list[Image.Image]:
    """Upright RGB frames shown at `times_s` (seconds from the first frame), longer side scaled to <= `max_side`."""
    return [Image.fromarray(array) for _t, array in _images_at(uri, times_s, max_side)]


def extract_keyframes(
    uri: str, video: VideoRecord, positions: Sequence[float]
) -> list[tuple[Keyframe, np.ndarray]]:
    """The frames at `positions` (fractions of the duration): each `Keyframe` with its upright RGB array.

    The arrays stay in memory (they travel to the next stages with the video, never through a file): encoding a
    720p frame as PNG costs more than finding and decoding it. `frame_index` is the frame's time times the
    nominal fps (exact for constant-frame-rate video).
    """
    if not all(0.0 <= p <= 1.0 for p in positions):
        raise ValueError(f"keyframe positions must lie in [0, 1], got {list(positions)}")
    targets = [p * video.duration_s for p in positions]
    frames = _images_at(uri, targets, None)
    out = []
    for i, ((t, array), position, target) in enumerate(zip(frames, positions, targets)):
        keyframe = Keyframe(
            index=i,
            position=position,
            target_time_s=target,
            time_s=t,
            frame_index=round(t * video.fps),
            path=keyframe_name(i),
            width=array.shape[1],
            height=array.shape[0],
        )
        out.append((keyframe, array))
    return out


def keyframe_name(index: int) -> str:
    """The media name of keyframe `index` in a `VideoContext`."""
    return f"kf_{index}"


class KeyframesStage(Stage[KeyframesRecord]):
    """The frames at 5 %, 50 % and 95 % of each video (configurable), kept in the video's media as arrays."""

    name = "keyframes"
    version = "2"  # 2: frames in memory, not PNG files
    record_type = KeyframesRecord
    requires = ("ingest",)
    reusable = False  # decoding three frames again is cheaper than storing them

    def settings(self):
        return self.config.keyframes

    def process(self, videos: list[VideoContext]) -> dict[str, KeyframesRecord | StageError]:
        cfg = self.config.keyframes
        out: dict[str, KeyframesRecord | StageError] = {}
        for ctx in videos:
            try:
                keyframes = []
                for kf, frame in extract_keyframes(ctx.video.uri, ctx.video, cfg.positions):
                    ctx.put(kf.path, frame)
                    keyframes.append(kf)
                out[ctx.video_id] = KeyframesRecord(video_id=ctx.video_id, keyframes=keyframes)
            except StageError as e:
                out[ctx.video_id] = e
        return out
