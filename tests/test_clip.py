"""The stored clip: copied when already fit for training, else an H.264 mp4 that decodes at the right size."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import fsspec
import numpy as np
import pytest
from av.sidedata.sidedata import Type
from PIL import Image

from flows.sample_data import orientation_chart, write_rotated_video, write_video
from schemas.config import ClipConfig, IngestConfig
from tasks.clip import fit_within, make_clip, write_clip
from tasks.ingest import Orientation, probe

# Short, small test videos: below ingest's default limits on frames, duration and side length (64 px).
LENIENT = IngestConfig(min_frames=1, min_duration_s=0, min_side_px=16)


def frames(n: int, w: int, h: int):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    return (np.roll(base, 2 * i, axis=1) for i in range(n))


def decode(path: Path) -> tuple[str, list[tuple[int, int]], int, bool]:
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        sizes = [(f.width, f.height) for f in c.decode(stream)]
        return stream.codec_context.name, sizes, len(c.streams.audio), bool(c.streams.audio)


def source(path: Path, n: int = 20, w: int = 96, h: int = 64, **kw):
    write_video(path, frames(n, w, h), 16, **kw)
    return probe(str(path), "vid", LENIENT)


def test_fit_within():
    assert fit_within(3840, 2160, 1280) == (1280, 720)
    assert fit_within(2160, 3840, 1280) == (720, 1280)
    assert fit_within(1000, 563, 640) == (640, 360)
    assert fit_within(640, 360, 1280) == (640, 360)


def test_h264_mp4_is_copied_byte_for_byte(tmp_path):
    video = source(tmp_path / "src.mp4")
    info = write_clip(
        video.uri, video, ClipConfig(), tmp_path / "out" / "mp4"
    )  # no extension, as in a sample dir
    assert info.mode == "copy" and not info.reencoded
    assert (tmp_path / "out" / "mp4").read_bytes() == (tmp_path / "src.mp4").read_bytes()
    assert (info.width, info.height, info.size_bytes) == (96, 64, (tmp_path / "src.mp4").stat().st_size)


def test_make_clip_returns_what_write_clip_writes(tmp_path):
    video = source(tmp_path / "src.mp4")
    data, info = make_clip(video.uri, video, ClipConfig())
    assert info.mode == "copy" and info.size_bytes == len(data)
    assert data == (tmp_path / "src.mp4").read_bytes()
    data, info = make_clip(video.uri, video, ClipConfig(max_side=48))
    assert (info.mode, info.width, info.height, info.size_bytes) == ("transcode", 48, 32, len(data))
    assert write_clip(video.uri, video, ClipConfig(max_side=48), tmp_path / "clip.mp4") == info
    assert (tmp_path / "clip.mp4").read_bytes() == data


REPRODUCE = """
import hashlib, json, os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one CPU: x264 would pick fewer threads by itself
from schemas.config import ClipConfig, IngestConfig
from tasks.clip import make_clip
from tasks.ingest import probe
video = probe(sys.argv[1], "vid", IngestConfig())
data, _ = make_clip(video.uri, video, ClipConfig(reencode="always"))
print(json.dumps([hashlib.sha256(data).hexdigest(), len(os.sched_getaffinity(0))]))
"""


def test_transcoded_clip_is_reproducible(tmp_path):
    """The same source gives the same clip bytes, on any machine: shards are reproducible.

    x264's output depends on its thread count, which by default follows the CPUs it may use; the clip pins it
    (`clip.encoder_threads`), so a process limited to one CPU makes the same bytes as this one.
    """
    base = np.random.default_rng(0).integers(0, 255, (360, 640, 3), dtype=np.uint8)
    write_video(tmp_path / "src.mp4", (np.roll(base, 4 * i, axis=1) for i in range(32)), 16)
    video = probe(str(tmp_path / "src.mp4"), "vid", IngestConfig())
    cfg = ClipConfig(reencode="always")
    first, info = make_clip(video.uri, video, cfg)
    second, info2 = make_clip(video.uri, video, cfg)
    assert info.mode == "transcode" and info == info2
    assert first == second

    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs to show the bytes do not follow the CPU count")
    proc = subprocess.run(
        [sys.executable, "-c", REPRODUCE, video.uri],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    digest, cpus = json.loads(proc.stdout.strip().splitlines()[-1])
    assert cpus == 1 and digest == hashlib.sha256(first).hexdigest()


@pytest.mark.parametrize(
    "name, cfg, want",
    [
        ("src.mp4", ClipConfig(reencode="always"), (96, 64)),  # forced
        ("src.mkv", ClipConfig(), (96, 64)),  # H.264, but not in mp4/mov
        ("src.mp4", ClipConfig(max_side=48), (48, 32)),  # too large
    ],
)
def test_transcode_decodes_at_the_right_size(tmp_path, monkeypatch, name, cfg, want):
    fmt = "matroska" if name.endswith(".mkv") else "mp4"
    video = source(tmp_path / name, container_format=fmt)
    scratch = tmp_path / "scratch"  # where make_clip's encoder writes its temporary mp4
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "clip"
    info = write_clip(video.uri, video, cfg, out)
    assert info.mode == "transcode" and info.reencoded and (info.width, info.height) == want
    codec, sizes, _, has_audio = decode(out)
    assert codec == "h264" and sizes == [want] * 20 and not has_audio
    assert info.fps == 16 and info.size_bytes == out.stat().st_size
    data = out.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # faststart: readable while streaming from a tar
    assert not list(tmp_path.glob(".tmp-*")) and not list(scratch.iterdir())  # no temporary file left


def test_4k_is_downscaled(tmp_path):
    x = np.linspace(0, 255, 3840, dtype=np.float32)
    smooth = np.broadcast_to(x[None, :, None], (2160, 3840, 3)).astype(
        np.uint8
    )  # cheap to encode, unlike noise
    write_video(
        tmp_path / "uhd.mp4", (np.roll(smooth, 16 * i, axis=1) for i in range(4)), 16, preset="ultrafast"
    )
    video = probe(str(tmp_path / "uhd.mp4"), "vid", LENIENT)
    assert (video.width, video.height) == (3840, 2160)
    info = write_clip(video.uri, video, ClipConfig(), tmp_path / "clip.mp4")
    assert (info.mode, info.width, info.height) == ("transcode", 1280, 720)
    assert decode(tmp_path / "clip.mp4")[1] == [(1280, 720)] * 4


def test_audio_dropped_and_mpeg4_fallback(tmp_path, monkeypatch):
    path = tmp_path / "av.mp4"
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=16)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        a = out.add_stream("aac", rate=16000, layout="mono")
        for img in frames(20, 64, 48):
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for k in range(20):
            af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            af.sample_rate, af.pts = 16000, k * 1024
            for p in a.encode(af):
                out.mux(p)
        for s in (v, a):
            for p in s.encode():
                out.mux(p)
    video = probe(str(path), "vid", IngestConfig(min_side_px=16))  # 64x48
    assert video.has_audio
    monkeypatch.setattr("tasks.clip.pick_encoder", lambda: "mpeg4")  # FFmpeg builds without libx264
    info = write_clip(video.uri, video, ClipConfig(reencode="always"), tmp_path / "clip.mp4")
    codec, sizes, n_audio, _ = decode(tmp_path / "clip.mp4")
    assert (info.codec, codec, n_audio) == ("mpeg4", "mpeg4", 0) and sizes == [(64, 48)] * 20


def test_remote_source(tmp_path):
    """Sources behind an fsspec URL are copied and transcoded through file objects."""
    local = source(tmp_path / "src.mp4")
    fs = fsspec.filesystem("memory")
    fs.pipe("/clip_src/a.mp4", (tmp_path / "src.mp4").read_bytes())
    uri = fs.unstrip_protocol("/clip_src/a.mp4")
    try:
        video = local.model_copy(update={"uri": uri})
        assert write_clip(uri, video, ClipConfig(), tmp_path / "copy.mp4").mode == "copy"
        assert (tmp_path / "copy.mp4").read_bytes() == (tmp_path / "src.mp4").read_bytes()
        info = write_clip(uri, video, ClipConfig(max_side=48), tmp_path / "small.mp4")
        assert info.mode == "transcode" and decode(tmp_path / "small.mp4")[1] == [(48, 32)] * 20
    finally:
        fs.rm("/clip_src", recursive=True)


# ---------------------------------------------------------------------------------------------- rotation
DISPLAYMATRIX = Type.DISPLAYMATRIX
ORIENTATIONS = [Orientation(r, m) for r in (0, 90, 180, 270) for m in (False, True)]


@pytest.mark.parametrize("orientation", ORIENTATIONS, ids=str)
def test_filters_turn_like_pil(orientation):
    """The FFmpeg filters used on clips turn frames exactly as the PIL transposes used on keyframes."""
    image = np.random.default_rng(1).integers(0, 255, (6, 10, 3), dtype=np.uint8)
    graph = av.filter.Graph()
    nodes = [graph.add_buffer(width=10, height=6, format="rgb24", time_base=Fraction(1, 16))]
    nodes += [graph.add(name, args) for name, args in orientation.filters()]
    nodes.append(graph.add("buffersink"))
    graph.link_nodes(*nodes).configure()
    graph.push(av.VideoFrame.from_ndarray(image, format="rgb24"))
    turned = graph.pull().to_ndarray(format="rgb24")
    want = np.asarray(orientation.apply(Image.fromarray(image)))
    assert turned.shape == want.shape and (turned == want).all()
    assert want.shape[1::-1] == orientation.display_size(10, 6)


def quadrant_colours(frame: np.ndarray) -> np.ndarray:
    """Mean colour of the middle of each quadrant (TL, TR, BL, BR), away from the edges that scaling blurs."""
    h, w = frame.shape[0] // 4, frame.shape[1] // 4
    centres = [(h, w), (h, 3 * w), (3 * h, w), (3 * h, 3 * w)]
    return np.array(
        [frame[y - h // 2 : y + h // 2, x - w // 2 : x + w // 2].mean(axis=(0, 1)) for y, x in centres]
    )


CHART = quadrant_colours(orientation_chart(48, 64))


@pytest.mark.parametrize("rotation, mirrored", [(90, False), (180, False), (270, True)])
def test_rotated_source_is_transcoded_upright(tmp_path, rotation, mirrored):
    """A phone video is never copied (the trainer's decoder ignores display matrices): its pixels are turned."""
    path = write_rotated_video(
        tmp_path / "phone.mp4",
        (orientation_chart(48, 64) for _ in range(8)),
        rotation=rotation,
        mirrored=mirrored,
        crf=0,
    )
    video = probe(str(path), "vid", LENIENT)
    assert (video.width, video.height, video.rotation, video.mirrored) == (48, 64, rotation, mirrored)
    for cfg, size in [(ClipConfig(), (48, 64)), (ClipConfig(max_side=32), (24, 32))]:
        out = tmp_path / f"clip{cfg.max_side}.mp4"
        info = write_clip(video.uri, video, cfg, out)
        assert (info.mode, info.width, info.height) == ("transcode", *size)
        with av.open(str(out)) as c:
            decoded = list(c.decode(c.streams.video[0]))
        assert len(decoded) == 8 and all((f.width, f.height) == size for f in decoded)
        assert not any(f.side_data.get(DISPLAYMATRIX) for f in decoded)  # no display matrix left
        assert np.abs(quadrant_colours(decoded[4].to_ndarray(format="rgb24")) - CHART).max() < 12


def test_stale_record_of_rotated_source_is_not_copied(tmp_path):
    """A record probed before ingest read orientations says rotation 0 and the coded size: the file decides."""
    path = write_rotated_video(tmp_path / "phone.mp4", (orientation_chart(48, 64) for _ in range(8)), crf=0)
    video = probe(str(path), "vid", LENIENT)
    stale = video.model_copy(update={"rotation": 0, "width": 64, "height": 48})
    info = write_clip(stale.uri, stale, ClipConfig(), tmp_path / "clip.mp4")
    assert (info.mode, info.width, info.height) == ("transcode", 48, 64)
    with av.open(str(tmp_path / "clip.mp4")) as c:
        frame = next(c.decode(c.streams.video[0]))
    assert np.abs(quadrant_colours(frame.to_ndarray(format="rgb24")) - CHART).max() < 12
