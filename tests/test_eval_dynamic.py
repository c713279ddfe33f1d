"""Dynamic degree (VBench's rule): the threshold and counting rule on given flow fields, frame sampling at ~8 fps,
and the RAFT plumbing on a static and a moving synthetic clip (random weights: only the wiring is checked)."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.evaluation.dynamic import (
    dynamic_degree,
    flow_frames,
    motion_threshold,
    sample_stride,
    top_magnitude,
    video_dynamic,
)


def _flows(n: int, size: int = 256, moving: int = 0, patch: float = 1.0, speed: float = 10.0) -> np.ndarray:
    """n flow fields; the first `moving` have a patch (share `patch` of the pixels) moving `speed` px right."""
    f = np.zeros((n, 2, size, size), np.float32)
    rows = max(1, round(size * patch))
    f[:moving, 0, :rows, :] = speed
    return f


def test_threshold_scales_with_the_short_side():
    assert motion_threshold(256, 256) == 6.0
    assert motion_threshold(480, 832) == pytest.approx(11.25)


def test_top_five_percent_sees_a_small_moving_subject():
    # 2 % of the pixels move 20 px: the mean flow is 0.4 px, the top 5 % mean is (2 * 20) / 5 = 8 px > 6
    f = _flows(1, moving=1, patch=0.02, speed=20.0)[0]
    assert float(np.hypot(f[0], f[1]).mean()) < 0.5
    assert top_magnitude(f) == pytest.approx(8.0, rel=0.05)
    assert dynamic_degree(f[None], num_frames=2).dynamic


def test_a_quarter_of_the_frames_must_move():
    # 16 frames -> 15 pairs; VBench needs round(4 * 16 / 16) = 4 moving pairs
    static = dynamic_degree(_flows(15), num_frames=16)
    assert not static.dynamic and static.moving_pairs == 0 and static.needed_pairs == 4
    three = dynamic_degree(_flows(15, moving=3), num_frames=16)
    four = dynamic_degree(_flows(15, moving=4), num_frames=16)
    assert not three.dynamic and four.dynamic
    slow = dynamic_degree(_flows(15, moving=15, speed=5.9), num_frames=16)  # under 6 px at 256 px
    assert not slow.dynamic


def test_frames_are_sampled_at_about_eight_fps():
    assert (
        sample_stride(24) == 3 and sample_stride(30) == 4 and sample_stride(16) == 2 and sample_stride(8) == 1
    )
    frames = np.zeros((48, 4, 4, 3), np.uint8)
    assert len(flow_frames(frames, fps=24)) == 16


def test_raft_plumbing_on_static_and_moving_clips():
    from models.base import ModelSpec
    from models.optical_flow import OPTICAL_FLOW

    raft = OPTICAL_FLOW.get(
        ModelSpec(backend="raft-small", device="cpu", random_init=True, options={"num_flow_updates": 2})
    )
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 255, (96, 160, 3), dtype=np.uint8)
    static = np.stack([texture[:, :128]] * 8)
    moving = np.stack([texture[:, 4 * i : 4 * i + 128] for i in range(8)])
    for clip in (static, moving):
        result = video_dynamic(raft, clip, fps=16.0)  # stride 2: 4 frames, 3 pairs
        assert len(result.magnitudes) == 3 and result.needed_pairs == 1
        assert result.threshold == pytest.approx(6.0 * 96 / 256)
        assert all(np.isfinite(result.magnitudes))
    with pytest.raises(ValueError, match="two frames"):
        video_dynamic(raft, static[:1], fps=16.0)
