"""Keyframes are frame-exact: each test video shows its frame index as a grey level, read back from the images."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from flows.sample_data import orientation_chart, write_rotated_video, write_video
from schemas.config import CurateConfig
from schemas.records import SourceFile, VideoRecord
from tasks.base import StageError, VideoContext
from tasks.ingest import content_id, probe
from tasks.keyframes import KeyframesStage, extract_keyframes, keyframe_name, sample_frames
from tasks.runner import run_stage

FPS = 20
N = 60  # 3 s
W, H = 64, 48


def level(i: int) -> int:
    return 8 + 4 * i  # distinct grey per frame (< 256 for i < 62); RGB->YUV->RGB shifts it by up to 2


def index_of(image: Image.Image | np.ndarray) -> int:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return round((np.asarray(image.convert("L"), dtype=np.float64).mean() - 8) / 4)


def decoded_frames(uri: str) -> list[np.ndarray]:
    """Every frame of the file, decoded in order from the start (the reference for frame-exact seeking)."""
    with av.open(uri) as c:
        return [np.asarray(f.to_image()) for f in c.decode(c.streams.video[0])]


def grey_frames(n: int = N):
    return (np.full((H, W, 3), level(i), np.uint8) for i in range(n))


# The test clips are tiny (fast to encode and decode) and under ingest's default min_side_px: probe them anyway.
INGEST = CurateConfig.model_validate({"ingest": {"min_side_px": 16}}).ingest


def probe_video(uri: str) -> VideoRecord:
    return probe(uri, content_id(uri, Path(uri).stat().st_size), INGEST)


def expected_index(t: float, fps: float = FPS, n: int = N) -> int:
    """The frame shown at time t: the first frame starting at or after t (the last frame past the end)."""
    return min(n - 1, math.ceil(t * fps - 1e-9))


def make(tmp_path: Path, name: str, **kw) -> tuple[str, VideoRecord]:
    # crf=0 is lossless: the grey levels survive encoding exactly; gop=8 gives several keyframes to seek to.
    path = write_video(tmp_path / name, grey_frames(), FPS, crf=0, gop=8, **kw)
    uri = str(path)
    return uri, probe_video(uri)


# Close targets (decoded forward from the previous one), far ones (a seek), repeats, and past the end.
TIMES = [0.0, 0.049, 0.05, 0.051, 0.43, 1.0, 1.5, 1.52, 2.2, 2.85, 2.949, 2.95, 3.0, 7.0, 1.5, 0.0]
TIMES += [float(t) for t in np.linspace(0.01, 2.99, 23)]


@pytest.mark.parametrize(
    "name, kw",
    [
        ("cfr.mp4", {}),
        ("offset.mp4", {"start_time_s": 1.5}),
        ("offset.ts", {"start_time_s": 2.0, "container_format": "mpegts"}),
        ("offset.mkv", {"start_time_s": 0.75, "container_format": "matroska"}),
    ],
)
def test_frames_exact_at_any_time(tmp_path, name, kw):
    uri, video = make(tmp_path, name, **kw)
    assert video.num_frames == N and video.duration_s == pytest.approx(N / FPS)
    if "start_time_s" in kw:
        with av.open(uri) as c:
            s = c.streams.video[0]
            assert s.start_time * s.time_base == pytest.approx(kw["start_time_s"])
    images = sample_frames(uri, TIMES, None)
    assert [index_of(im) for im in images] == [expected_index(t) for t in TIMES]


def test_variable_frame_rate(tmp_path):
    """Irregular frame durations: the chosen frame is the one on screen at the target time, not t*fps."""
    durations_ms = [30, 70, 50, 110, 40, 90, 60, 50] * 4
    starts = np.concatenate([[0], np.cumsum(durations_ms)[:-1]])
    path = tmp_path / "vfr.mkv"
    with av.open(str(path), "w", format="matroska") as out:
        stream = out.add_stream("libx264", rate=20, options={"crf": "0"})
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.codec_context.gop_size = 6
        for i, pts in enumerate(starts):
            frame = av.VideoFrame.from_ndarray(np.full((H, W, 3), level(i), np.uint8), format="rgb24")
            frame.pts, frame.time_base = int(pts), Fraction(1, 1000)
            for p in stream.encode(frame):
                out.mux(p)
        for p in stream.encode():
            out.mux(p)
    times = [0.0, 0.031, 0.1, 0.5, 0.95, 1.3, 1.9]
    got = [index_of(im) for im in sample_frames(str(path), times)]
    want = [min(len(starts) - 1, int(np.searchsorted(starts, t * 1000 - 1e-6))) for t in times]
    assert got == want


def test_extract_keyframes_gives_frame_exact_arrays(tmp_path):
    uri, video = make(tmp_path, "cfr.mp4", start_time_s=0.4)
    out = extract_keyframes(uri, video, [0.05, 0.5, 0.95])
    reference = decoded_frames(uri)
    assert [k.index for k, _ in out] == [0, 1, 2]
    for (k, frame), pos in zip(out, [0.05, 0.5, 0.95]):
        assert k.position == pos and k.target_time_s == pytest.approx(pos * N / FPS)
        assert k.path == keyframe_name(k.index) == f"kf_{k.index}"
        assert isinstance(frame, np.ndarray) and frame.dtype == np.uint8
        assert frame.shape == (H, W, 3) == (k.height, k.width, 3)
        assert index_of(frame) == k.frame_index == expected_index(k.target_time_s)
        # Exactly the pixels of that frame as a decoder reading the file from the start gives them.
        np.testing.assert_array_equal(frame, reference[k.frame_index])
        assert -1e-6 <= k.time_s - k.target_time_s < 1 / FPS
    with pytest.raises(ValueError, match="positions"):
        extract_keyframes(uri, video, [1.5])


def test_sample_frames_sizes_and_order(tmp_path):
    path = write_video(
        tmp_path / "big.mp4",
        (np.full((120, 200, 3), level(i), np.uint8) for i in range(N)),
        FPS,
        crf=0,
        gop=8,
    )
    times = [2.5, 0.1, 1.0, 0.1]
    small = sample_frames(str(path), times, max_side=50)
    assert len(small) == 4 and all(im.size == (50, 30) for im in small)
    assert [index_of(im) for im in small] == [expected_index(t) for t in times]
    full = sample_frames(str(path), [1.0], max_side=None)
    assert full[0].size == (200, 120) and full[0].mode == "RGB"


def _context(video: VideoRecord) -> VideoContext:
    source = SourceFile(uri=video.uri, size=video.size_bytes, version="test", video_id=video.video_id)
    return VideoContext(source=source, video=video, records={"ingest": video})


def test_stage_records_and_decode_errors(tmp_path):
    uri, video = make(tmp_path, "cfr.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 50)
    bad_video = video.model_copy(update={"video_id": "vbad", "uri": str(bad)})
    # Keyframes are arrays in memory now: there is no image format to choose, and a stale setting is refused.
    with pytest.raises(ValidationError, match="image_format"):
        CurateConfig.model_validate({"keyframes": {"image_format": "jpg"}})
    stage = KeyframesStage(CurateConfig())
    ctxs = [_context(v) for v in (video, bad_video)]
    result = stage.process(ctxs)
    rec = result[video.video_id]
    assert [k.frame_index for k in rec.keyframes] == [expected_index(p * N / FPS) for p in (0.05, 0.5, 0.95)]
    reference = decoded_frames(uri)
    for k in rec.keyframes:
        frame = ctxs[0].media[k.path]  # a raw RGB array (never encoded: JPEG would shift the grey levels)
        assert isinstance(frame, np.ndarray) and frame.shape == (H, W, 3) and frame.dtype == np.uint8
        np.testing.assert_array_equal(frame, reference[k.frame_index])
        assert ctxs[0].rgb(k.path) is frame
    err = result["vbad"]
    assert isinstance(err, StageError) and err.reason == "decode_error"
    assert not any(name.startswith("kf_") for name in ctxs[1].media)
    assert stage.fingerprint({"ingest": "a"}) != stage.fingerprint({"ingest": "b"})


def test_stage_through_the_runner_is_recomputed_not_reused(tmp_path):
    """Raw frames are cheaper to decode again than to store: a resumed run redoes keyframes (reusable=False)."""
    uri, video = make(tmp_path, "cfr.mp4")
    ctx = _context(video)
    stage = KeyframesStage(CurateConfig())
    first = run_stage(stage, [ctx])
    assert (first.processed, first.reused, first.ok) == (1, 0, 1) and ctx.failure is None
    rec = ctx.record("keyframes")
    assert {k.path: ctx.media_stage[k.path] for k in rec.keyframes} == dict.fromkeys(
        [keyframe_name(i) for i in range(3)], "keyframes"
    )
    # A resumed run has the record (from the ledger) but not the frames: the stage makes both again.
    del ctx.media[keyframe_name(1)]
    again = run_stage(stage, [ctx])
    assert (again.processed, again.reused) == (1, 0)
    np.testing.assert_array_equal(
        ctx.rgb(keyframe_name(1)), decoded_frames(uri)[rec.keyframes[1].frame_index]
    )


def quadrant_colours(image: Image.Image) -> np.ndarray:
    """Mean colour of the middle of each quadrant (TL, TR, BL, BR), away from the edges that scaling blurs."""
    a = np.asarray(image.convert("RGB"), dtype=np.float64)
    h, w = a.shape[0] // 4, a.shape[1] // 4
    centres = [(h, w), (h, 3 * w), (3 * h, w), (3 * h, 3 * w)]
    return np.array(
        [a[y - h // 2 : y + h // 2, x - w // 2 : x + w // 2].mean(axis=(0, 1)) for y, x in centres]
    )


@pytest.mark.parametrize("rotation, mirrored", [(90, False), (180, False), (270, False), (90, True)])
def test_rotated_video_gives_upright_images(tmp_path, rotation, mirrored):
    """Phone video (frames stored sideways + display matrix): keyframes and sampled frames come out upright."""
    chart = orientation_chart(48, 64)  # portrait: white top-left, red top-right, green/blue below
    want = quadrant_colours(Image.fromarray(chart))
    path = write_rotated_video(
        tmp_path / "phone.mp4", (chart for _ in range(N)), FPS, rotation=rotation, mirrored=mirrored, crf=0
    )
    uri = str(path)
    video = probe_video(uri)
    kfs = extract_keyframes(uri, video, [0.05, 0.5, 0.95])
    for k, frame in kfs:
        image = Image.fromarray(frame)
        assert image.size == (k.width, k.height) == (video.width, video.height) == (48, 64)
        assert np.abs(quadrant_colours(image) - want).max() < 8
    small = sample_frames(uri, [0.2, 1.0], max_side=32)
    assert all(im.size == (24, 32) for im in small)
    assert all(np.abs(quadrant_colours(im) - want).max() < 12 for im in small)
