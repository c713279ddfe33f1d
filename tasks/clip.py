"""The video clip stored in each sample: the source's bytes when they are already fit for training, else H.264.

Training decodes frames only, so the stored clip is video-only whenever we re-encode: audio would add bytes to
every shard and nothing to the model. A source that is already H.264/yuv420p in mp4/mov and small enough is
copied byte for byte (no generation loss, no CPU spent); everything else (VP9/AV1 webm, 4K, 10-bit, mkv, avi,
and phone video that players must rotate) is transcoded once here so the trainer can rely on one codec, one
container, a bounded frame size and upright frames with no display matrix to honour.
"""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import fsspec

from schemas.config import ClipConfig
from schemas.records import Record, VideoRecord
from tasks.base import StageError, atomic_write_bytes
from tasks.discovery import is_local, local_path
from tasks.ingest import Orientation, frame_orientation, open_media

# Pixel formats every H.264 decoder (and every training data loader) handles; 10-bit or 4:4:4 sources are
# re-encoded even when their codec is H.264.
_COPYABLE_PIX_FMTS = frozenset({"yuv420p", "yuvj420p"})


class ClipInfo(Record):
    """What `make_clip` made."""

    mode: Literal["copy", "transcode"]
    codec: str
    width: int
    height: int
    fps: float
    size_bytes: int

    @property
    def reencoded(self) -> bool:
        return self.mode == "transcode"


def pick_encoder() -> str:
    """libx264 when the FFmpeg bundled with PyAV has it (the PyPI wheels do); else FFmpeg's native mpeg4."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def fit_within(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Scale (width, height) so the longer side is at most `max_side`; both even (4:2:0 chroma needs it)."""
    scale = min(1.0, max_side / max(width, height))
    w = max(2, round(width * scale / 2) * 2)
    h = max(2, round(height * scale / 2) * 2)
    return w, h


def add_video_stream(
    out: av.container.OutputContainer,
    width: int,
    height: int,
    rate: Fraction,
    *,
    crf: int = 20,
    encoder: str | None = None,
    gop: int | None = None,
    preset: str | None = None,
    threads: int | None = None,
) -> av.VideoStream:
    """Add a yuv420p video stream to `out`: H.264 at constant quality `crf`, or mpeg4 at a matching bitrate."""
    encoder = encoder or pick_encoder()
    options: dict[str, str] = {}
    if encoder == "libx264":
        options["crf"] = str(crf)
        if preset:
            options["preset"] = preset
        if threads:
            # x264's output depends on its thread count, which defaults to the machine's cores: pin it so
            # the same input gives the same bytes on every machine.
            options["threads"] = str(threads)
    stream = out.add_stream(encoder, rate=rate, options=options)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    if encoder != "libx264":
        # mpeg4 has no CRF; ~0.2 bit per pixel keeps natural video close to visually lossless.
        stream.bit_rate = int(0.2 * width * height * float(rate))
    if gop is not None:
        stream.codec_context.gop_size = gop
    return stream


def make_clip(uri: str, video: VideoRecord, cfg: ClipConfig) -> tuple[bytes, ClipInfo]:
    """The mp4 bytes of the clip stored for `video`, and what they are.

    The stored clip is always upright: a source with a display rotation or mirror is transcoded with the turn
    applied to the pixels (and no display matrix written), never copied. Width and height are the stored size.
    """
    if cfg.reencode == "auto" and _copyable(uri, video, cfg):
        if is_local(uri):
            with open(local_path(uri), "rb") as f:
                data = f.read()
        else:
            with fsspec.open(uri, "rb") as f:
                data = f.read()
        info = ClipInfo(
            mode="copy",
            codec=video.codec,
            width=video.width,
            height=video.height,
            fps=video.fps,
            size_bytes=len(data),
        )
        return data, info
    encoder = pick_encoder()
    # FFmpeg's faststart rewrites its output file by name: encode into a private temporary file, read it back.
    fd, tmp = tempfile.mkstemp(prefix="lumosx-clip-", suffix=".mp4")
    os.close(fd)
    try:
        try:
            fps, w, h = _transcode(uri, Path(tmp), cfg.max_side, cfg.crf, encoder, cfg.encoder_threads)
        except av.error.FFmpegError as e:
            raise StageError("decode_error", f"cannot transcode {uri}: {e}") from e
        data = Path(tmp).read_bytes()
    finally:
        os.unlink(tmp)
    info = ClipInfo(
        mode="transcode",
        codec="h264" if encoder == "libx264" else encoder,
        width=w,
        height=h,
        fps=fps,
        size_bytes=len(data),
    )
    return data, info


def write_clip(uri: str, video: VideoRecord, cfg: ClipConfig, out_path: Path) -> ClipInfo:
    """`make_clip`, written to `out_path` (export and benchmarks): atomically, its folder made if missing."""
    data, info = make_clip(uri, video, cfg)
    atomic_write_bytes(Path(out_path), data)
    return info


def _copyable(uri: str, video: VideoRecord, cfg: ClipConfig) -> bool:
    if video.codec != "h264" or max(video.width, video.height) > cfg.max_side:
        return False
    if not {"mp4", "mov"} & set(video.container.split(",")) or video.rotation or video.mirrored:
        return False
    # The pixel format is not in the VideoRecord; reading it costs one header parse. The orientation is checked
    # on the file too (one frame decoded): a record made before ingest read orientations says 0 for every video.
    try:
        with open_media(uri) as container:
            stream = container.streams.video[0]
            if stream.codec_context.pix_fmt not in _COPYABLE_PIX_FMTS:
                return False
            frame = next(container.decode(stream), None)
            return frame is not None and frame_orientation(stream, frame).upright
    except av.error.FFmpegError:
        return False  # the transcode attempt reports what is wrong with the file


def _transcode(
    uri: str, out_path: Path, max_side: int, crf: int, encoder: str, threads: int | None = None
) -> tuple[float, int, int]:
    """Decode every frame, turn it upright, scale it to fit `max_side`, encode video-only mp4.

    Returns the output frame rate, width and height.
    """
    with open_media(uri) as src:
        tmp = out_path
        ins = src.streams.video[0]
        ins.thread_type = "AUTO"
        rate = ins.average_rate or ins.guessed_rate or Fraction(25)
        # Keep the source's timestamps (shifted to start at 0) so variable-frame-rate timing survives.
        time_base = ins.time_base or 1 / rate
        # faststart puts the index first: readers streaming the clip out of a tar need no seek to the end.
        with av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as dst:
            outs: av.VideoStream | None = None
            scaler: _UprightScaler | None = None
            first_pts: int | None = None
            last_pts = -1
            for i, frame in enumerate(src.decode(ins)):
                if outs is None:
                    # The first frame's display matrix and size set up the output; the encoder writes none.
                    scaler = _UprightScaler(
                        frame_orientation(ins, frame), frame.width, frame.height, max_side, time_base
                    )
                    outs = add_video_stream(
                        dst, scaler.width, scaler.height, rate, crf=crf, encoder=encoder, threads=threads
                    )
                    outs.codec_context.time_base = time_base
                pts = frame.pts if frame.pts is not None else round(i / rate / time_base)
                first_pts = pts if first_pts is None else first_pts
                pts = max(pts - first_pts, last_pts + 1)  # strictly increasing, even for broken sources
                last_pts = pts
                out_frame = scaler(frame)
                out_frame.pts, out_frame.time_base = pts, time_base
                for packet in outs.encode(out_frame):
                    dst.mux(packet)
            if outs is None or scaler is None:
                raise StageError("decode_error", f"{uri}: no frame could be decoded")
            for packet in outs.encode():
                dst.mux(packet)
    return float(rate), scaler.width, scaler.height


class _UprightScaler:
    """Scale a decoded frame to the output size and turn it upright (an FFmpeg filter graph; none if upright)."""

    def __init__(
        self, orientation: Orientation, width: int, height: int, max_side: int, time_base: Fraction
    ) -> None:
        display_w, display_h = orientation.display_size(width, height)
        self.width, self.height = fit_within(display_w, display_h, max_side)
        # Scale first, in the coded orientation: the turn then moves the fewest pixels.
        self.coded_size = orientation.display_size(self.width, self.height)
        self.graph: av.filter.Graph | None = None
        if not orientation.upright:
            graph = av.filter.Graph()
            w, h = self.coded_size
            nodes = [graph.add_buffer(width=w, height=h, format="yuv420p", time_base=time_base)]
            nodes += [graph.add(name, args) for name, args in orientation.filters()]
            nodes.append(graph.add("buffersink"))
            graph.link_nodes(*nodes).configure()
            self.graph = graph

    def __call__(self, frame: av.VideoFrame) -> av.VideoFrame:
        w, h = self.coded_size
        # AREA averages source pixels: the right filter for downscaling (no aliasing on 4K sources).
        scaled = frame.reformat(width=w, height=h, format="yuv420p", interpolation="AREA")
        if self.graph is None:
            return scaled
        self.graph.push(scaled)
        return self.graph.pull()  # transpose/flip filters give exactly one frame per frame
