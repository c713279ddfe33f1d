"""Dynamic degree, as VBench computes it: is there enough motion in the video to call it dynamic?

Frames are taken at about 8 fps (every round(fps / 8)-th frame), RAFT estimates the optical flow between
consecutive taken frames, and each pair is summarised by the mean magnitude of its largest 5 % flow vectors (so
a small moving subject counts, not just camera-wide motion). A pair moves when that exceeds
6 * min(H, W) / 256 pixels (6 px at 256 px, scaled with the resolution); the video is dynamic when at least
round(4 * frames / 16) pairs move: a quarter of the sampled frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def sample_stride(fps: float, target_fps: float = 8.0) -> int:
    return max(1, round(fps / target_fps))


def top_magnitude(flow: np.ndarray, fraction: float = 0.05) -> float:
    """Mean magnitude of the largest `fraction` of the flow vectors of one (2, H, W) field."""
    rad = np.sqrt(flow[0].astype(np.float64) ** 2 + flow[1].astype(np.float64) ** 2).ravel()
    k = max(1, int(rad.size * fraction))
    return float(np.partition(rad, rad.size - k)[rad.size - k :].mean())


def motion_threshold(height: int, width: int) -> float:
    return 6.0 * min(height, width) / 256.0


@dataclass
class DynamicResult:
    dynamic: bool
    moving_pairs: int
    needed_pairs: int
    threshold: float
    magnitudes: list[float]


def dynamic_degree(flows: np.ndarray, num_frames: int | None = None) -> DynamicResult:
    """VBench's rule on flow fields (N, 2, H, W) between consecutive sampled frames.

    num_frames: how many frames were sampled (default N + 1); VBench asks for round(4 * frames / 16) moving
    pairs, at least one.
    """
    flows = np.asarray(flows)
    if flows.ndim != 4 or flows.shape[1] != 2:
        raise ValueError(f"expected flow fields (N, 2, H, W), got {flows.shape}")
    h, w = flows.shape[2:]
    thr = motion_threshold(h, w)
    mags = [top_magnitude(f) for f in flows]
    frames = num_frames if num_frames is not None else len(flows) + 1
    needed = max(1, round(4 * frames / 16))
    moving = sum(m > thr for m in mags)
    return DynamicResult(moving >= needed, moving, needed, thr, mags)


def flow_frames(frames: np.ndarray, fps: float, target_fps: float = 8.0) -> np.ndarray:
    """The frames VBench feeds to RAFT: every round(fps / target_fps)-th frame."""
    return frames[:: sample_stride(fps, target_fps)]


def video_dynamic(flow_model, frames: np.ndarray, fps: float, target_fps: float = 8.0) -> DynamicResult:
    """Dynamic degree of a (T, H, W, 3) uint8 video with an OPTICAL_FLOW adapter."""
    taken = flow_frames(frames, fps, target_fps)
    if len(taken) < 2:
        raise ValueError(f"dynamic degree needs two frames at {target_fps} fps, the video gives {len(taken)}")
    flows = flow_model(taken[:-1], taken[1:])
    return dynamic_degree(flows, len(taken))
