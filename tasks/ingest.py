"""Ingest: give each discovered file a content-derived id, probe it with PyAV, attach its sidecar caption.

Ingest is the one stage whose input is a discovered file (`SourceFile`) rather than a video: it makes the
`VideoRecord` every later stage starts from. Ids come from the bytes (not the path), so a renamed or copied file
keeps its id, and two copies of one file are curated once (the driver turns the second into a `duplicate`).

Files are opened as untrusted input: only regular files (a FIFO named .mp4 would block an open() forever), and
a sidecar caption only if it is a bounded, UTF-8 text file inside the input tree (tasks/discovery.py located
it). Local files stay plain paths so PyAV reads them directly; remote ones are read through fsspec.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import posixpath
import re
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction

import av
import fsspec
import numpy as np
from av.sidedata.sidedata import Type as FrameSideData
from PIL import Image

from schemas.config import IngestConfig
from schemas.records import SourceFile, VideoRecord
from tasks.base import Stage, StageError, VideoContext, environment_fault
from tasks.discovery import is_local, local_path

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20  # bytes hashed at the start, middle and end of a file


# ---------------------------------------------------------------------------------------------- file access
def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(uri)


@contextmanager
def open_media(uri: str) -> Iterator[av.container.InputContainer]:
    """Open a video for reading: local paths directly (FFmpeg's own I/O), remote ones via a seekable fsspec file."""
    if is_local(uri):
        with av.open(local_path(uri), "r") as container:
            yield container
        return
    with fsspec.open(uri, "rb") as f, av.open(f, "r") as container:
        yield container


# ---------------------------------------------------------------------------------------------- orientation
@dataclass(frozen=True)
class Orientation:
    """How a decoded frame is turned to be shown upright: `rotation` degrees clockwise, then mirrored left-right.

    Phones store portrait video as landscape frames plus a display matrix that tells players to turn them; FFmpeg's
    decoders hand out the frames as stored. Every curation output (keyframes, sampled frames, stored clips) is
    turned upright here, so nothing downstream (the trainer's decoder included) has to know about it.
    """

    rotation: int = 0  # 0, 90, 180 or 270
    mirrored: bool = False

    @property
    def upright(self) -> bool:
        return self.rotation == 0 and not self.mirrored

    def display_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after turning; the same swap maps a display size back to the coded size."""
        return (height, width) if self.rotation in (90, 270) else (width, height)

    def apply(self, image: Image.Image) -> Image.Image:
        """The upright version of a decoded frame's image."""
        # PIL's ROTATE_<n> turn counter-clockwise: a clockwise turn by r is ROTATE_<360 - r>.
        ops = {
            90: Image.Transpose.ROTATE_270,
            180: Image.Transpose.ROTATE_180,
            270: Image.Transpose.ROTATE_90,
        }
        if self.rotation:
            image = image.transpose(ops[self.rotation])
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if self.mirrored else image

    def apply_array(self, frame: np.ndarray) -> np.ndarray:
        """`apply` for an HxWxC array (contiguous result)."""
        if self.upright:
            return frame
        frame = np.rot90(frame, k=-self.rotation // 90)  # np.rot90 turns counter-clockwise for k > 0
        return np.ascontiguousarray(frame[:, ::-1] if self.mirrored else frame)

    def filters(self) -> list[tuple[str, str | None]]:
        """The same turn as FFmpeg filters (name, args), applied to frames in a `av.filter.Graph`."""
        if self.rotation == 90:
            # clockwise then mirrored = transpose about the main diagonal = FFmpeg's "cclock_flip"
            return [("transpose", "cclock_flip" if self.mirrored else "clock")]
        if self.rotation == 270:
            return [("transpose", "clock_flip" if self.mirrored else "cclock")]
        if self.rotation == 180:
            return [("vflip", None)] if self.mirrored else [("hflip", None), ("vflip", None)]
        return [("hflip", None)] if self.mirrored else []


def frame_orientation(stream: av.VideoStream, frame: av.VideoFrame) -> Orientation:
    """The orientation a player would show `frame` of `stream` in.

    Read from the frame's display matrix (FFmpeg attaches the container's matrix, from mp4/mov ``tkhd`` or an
    H.264/HEVC orientation SEI, to every decoded frame), else from a ``rotate`` stream tag (old FFmpeg versions
    wrote that tag, clockwise degrees, when remuxing phone video to mkv). Angles that are not a multiple of 90
    degrees (never written by cameras) are rounded to the nearest one.
    """
    side = frame.side_data.get(FrameSideData.DISPLAYMATRIX)
    matrix = bytes(side) if side is not None else b""
    if len(matrix) >= 36:
        # The 3x3 matrix maps (x, y, 1) row vectors to display coordinates; entries 0, 1, 3, 4 are the 2x2
        # linear part (16.16 fixed point). A negative determinant means a mirror, which FFmpeg's
        # av_display_matrix_flip applies after the rotation by negating the first column: undo that, then read
        # the pure rotation's clockwise angle.
        a, b, _, c, d = struct.unpack("=5i", matrix[:20])  # native-endian int32, as FFmpeg stores it
        mirrored = a * d - b * c < 0
        if mirrored:
            a, c = -a, -c
        degrees = math.degrees(math.atan2(b, a))
    else:
        tag = {k.lower(): v for k, v in stream.metadata.items()}.get("rotate")
        try:
            degrees, mirrored = float(tag) if tag is not None else 0.0, False
        except ValueError:
            logger.warning("ignoring unreadable rotate tag %r on %s", tag, stream.container.name)
            degrees, mirrored = 0.0, False
    rotation = round(degrees / 90) % 4 * 90
    if abs((degrees - rotation + 180) % 360 - 180) > 1:
        logger.warning(
            "display rotation %.1f deg rounded to %d on %s", degrees, rotation, stream.container.name
        )
    return Orientation(rotation, mirrored)


# ---------------------------------------------------------------------------------------------- ids
def _read_regular(uri: str, chunks: list[tuple[int, int]]) -> list[bytes]:
    """Read (offset, length) chunks of `uri`, refusing anything but a regular file without blocking on it."""
    if is_local(uri):
        # O_NONBLOCK: a FIFO swapped in after discovery must not hang the worker; fstat then tells what it is.
        fd = os.open(local_path(uri), os.O_RDONLY | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StageError("not_a_file", f"{uri} is not a regular file")
            return [os.pread(fd, length, offset) for offset, length in chunks]
        finally:
            os.close(fd)
    fs, path = _fs(uri)
    out = []
    with fs.open(path, "rb") as f:
        for offset, length in chunks:
            f.seek(offset)
            out.append(f.read(length))
    return out


def content_id(uri: str, size: int) -> str:
    """Id from the bytes: blake2b over the size and 1 MiB at the start, middle and end of the file.

    Reads at most 3 MiB however large the file is (cheap on object stores), survives renames and copies, and
    changes when the content does (any re-encode changes the size or the sampled bytes). Rendered as
    ``v`` + 20 hex digits: a valid file name and WebDataset key (no dots).
    """
    h = hashlib.blake2b(digest_size=10)
    h.update(size.to_bytes(8, "little"))
    offsets = sorted({0, max(0, size // 2 - _CHUNK // 2), max(0, size - _CHUNK)})
    for chunk in _read_regular(uri, [(o, _CHUNK) for o in offsets]):
        h.update(chunk)
    return "v" + h.hexdigest()


# ---------------------------------------------------------------------------------------------- probe
# Leading bytes of containers FFmpeg reads. A file that starts like a video but does not open is "corrupt"
# (truncated download, missing moov atom); anything else is "not_a_video" (a text or image file named .mp4).
_ISO_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot")
_MAGICS = (
    b"\x1a\x45\xdf\xa3",
    b"RIFF",
    b"FLV",
    b"OggS",
    b"\x00\x00\x01\xba",
    b"\x00\x00\x01\xb3",
    b"\x30\x26\xb2\x75",
)


def _looks_like_video(head: bytes) -> bool:
    if head[4:8] in _ISO_BOXES or head.startswith(_MAGICS):
        return True
    # MPEG-TS: a 0x47 sync byte every 188 bytes.
    return len(head) >= 377 and head[0] == head[188] == head[376] == 0x47


def probe(uri: str, video_id: str, cfg: IngestConfig) -> VideoRecord:
    """Read what the file is (container, codec, display size and orientation, rate, duration, frames), check it.

    Raises `StageError` with reason ``empty_file``, ``not_a_video``, ``corrupt``, ``no_video_stream``,
    ``too_short``, ``too_long``, ``too_large`` or ``too_small``. Decodes one frame, so a file whose header opens but whose
    frames are missing or broken fails here rather than in every later stage; its display matrix gives the
    orientation, and width/height are the display (upright) size.
    """
    fs, path = _fs(uri)
    size = fs.size(path)
    if size == 0:
        raise StageError("empty_file", f"{uri} is empty (0 bytes)")
    try:
        with open_media(uri) as container:
            return _probe_open(container, uri, video_id, size, cfg)
    except av.error.FFmpegError as e:
        head = _read_regular(uri, [(0, 512)])[0]
        if _looks_like_video(head):
            raise StageError("corrupt", f"{uri} looks like a video but FFmpeg cannot read it: {e}") from e
        raise StageError("not_a_video", f"{uri} is not a video file FFmpeg can read: {e}") from e


def _probe_open(
    container: av.container.InputContainer, uri: str, video_id: str, size: int, cfg: IngestConfig
) -> VideoRecord:
    if not container.streams.video:
        kinds = ", ".join(sorted({s.type for s in container.streams})) or "none"
        raise StageError("no_video_stream", f"{uri} has no video stream (streams: {kinds})")
    stream = container.streams.video[0]
    cc = stream.codec_context
    width, height = cc.width, cc.height  # the coded size; turned to the display size once a frame is decoded
    if width * height > cfg.max_pixels:
        raise StageError("too_large", f"{uri}: {width}x{height} exceeds max_pixels={cfg.max_pixels}")
    if min(width, height) < cfg.min_side_px:
        raise StageError(
            "too_small", f"{uri}: {width}x{height} is under min_side_px={cfg.min_side_px} on a side"
        )
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise StageError("corrupt", f"{uri}: the video stream has no frame rate")
    fps = float(rate)
    duration = _duration_s(container, stream)
    num_frames = stream.frames or round(duration * fps)
    if num_frames < cfg.min_frames or duration < cfg.min_duration_s:
        raise StageError(
            "too_short",
            f"{uri}: {num_frames} frames / {duration:.2f} s "
            f"(need >= {cfg.min_frames} frames and >= {cfg.min_duration_s} s)",
        )
    if duration > cfg.max_duration_s:
        raise StageError("too_long", f"{uri}: {duration:.1f} s exceeds max_duration_s={cfg.max_duration_s}")
    orientation = frame_orientation(stream, _first_frame(container, stream, uri))
    width, height = orientation.display_size(width, height)
    return VideoRecord(
        video_id=video_id,
        uri=uri,
        size_bytes=size,
        container=container.format.name,
        codec=cc.name,
        width=width,
        height=height,
        fps=fps,
        duration_s=duration,
        num_frames=num_frames,
        has_audio=bool(container.streams.audio),
        rotation=orientation.rotation,
        mirrored=orientation.mirrored,
    )


def _duration_s(container: av.container.InputContainer, stream: av.VideoStream) -> float:
    """Duration of the video stream, from the first frame's start to the last frame's end.

    mp4/mov and MPEG-TS give it per stream. Matroska/WebM (most web downloads) do not, and their container
    duration may or may not include the start offset; there we demux the last GOP (seek near the end, read
    packets, no decoding) and take the end of the last packet.
    """
    tb = stream.time_base
    start = stream.start_time or 0
    if stream.duration and tb:
        return float(stream.duration * tb)
    if tb and container.duration:
        try:
            container.seek(start + int(container.duration / av.time_base / tb), stream=stream, backward=True)
            end = None
            for packet in container.demux(stream):
                if packet.pts is not None:
                    stop = packet.pts + (packet.duration or 0)
                    end = stop if end is None else max(end, stop)
            container.seek(start, stream=stream, backward=True)
            if end is not None:
                return float((end - start) * tb)
        except av.error.FFmpegError:
            logger.debug("tail scan failed on %s; using the container duration", container.name)
    if container.duration:
        return container.duration / av.time_base
    # No duration anywhere (raw streams): count packets, still no decoding.
    count = sum(1 for p in container.demux(stream) if p.size)
    container.seek(0)
    rate = stream.average_rate or stream.guessed_rate or Fraction(25)
    return count / float(rate)


def _first_frame(container: av.container.InputContainer, stream: av.VideoStream, uri: str) -> av.VideoFrame:
    try:
        for frame in container.decode(stream):
            return frame
    except av.error.FFmpegError as e:
        raise StageError("corrupt", f"{uri}: the first frame cannot be decoded: {e}") from e
    raise StageError("corrupt", f"{uri}: the video stream has no decodable frame (truncated file?)")


# ---------------------------------------------------------------------------------------------- sidecar captions
_KEY_COLUMNS = (
    "uri",
    "url",
    "path",
    "file",
    "filename",
    "file_name",
    "video",
    "videoID",
    "video_id",
    "key",
    "id",
)
_CAPTION_COLUMNS = ("caption", "text", "description", "prompt", "dense_caption")


class SidecarTableError(ValueError):
    """The sidecar caption table cannot be read or lacks a key or caption column."""


def load_sidecar_table(path: str) -> dict[str, str]:
    """Captions from a parquet / csv / jsonl table: key (uri, file name or stem) -> caption.

    Rows are indexed by every key column present (uri, url, path, file, filename, file_name, video, videoID,
    video_id, key, id; Panda-70M's csv has ``videoID`` and ``url``); the caption is the first of caption, text,
    description, prompt, dense_caption. Videos are matched by full uri, then file name, then file name without
    extension. Column names are matched case-insensitively.
    """
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    lower = path.lower()
    if lower.endswith(".parquet"):
        read = pq.read_table
    elif lower.endswith(".csv"):
        read = pacsv.read_csv
    elif lower.endswith((".jsonl", ".ndjson")):
        read = pajson.read_json
    else:
        raise SidecarTableError(f"{path}: unknown table format (use .parquet, .csv or .jsonl)")
    try:
        with fsspec.open(path, "rb") as f:
            table = read(f)
    except (OSError, ValueError) as e:  # pyarrow's parse errors are ValueErrors
        raise SidecarTableError(f"cannot read sidecar table {path}: {e}") from e
    names = {n.lower(): n for n in table.column_names}
    key_cols = [names[c.lower()] for c in _KEY_COLUMNS if c.lower() in names]
    cap_col = next((names[c.lower()] for c in _CAPTION_COLUMNS if c.lower() in names), None)
    if not key_cols or cap_col is None:
        raise SidecarTableError(
            f"{path}: need a key column (one of {', '.join(_KEY_COLUMNS)}) and a caption column "
            f"(one of {', '.join(_CAPTION_COLUMNS)}); found {table.column_names}"
        )
    captions = table.column(cap_col).to_pylist()
    out: dict[str, str] = {}
    # Every key column indexes the row: Panda-70M files may be named by videoID or looked up by url.
    for key_col in key_cols:
        for key, caption in zip(table.column(key_col).to_pylist(), captions):
            if key is None or caption is None:
                continue
            if not isinstance(caption, str):
                raise SidecarTableError(
                    f"{path}: caption for {key!r} is {type(caption).__name__}, not a string"
                )
            if caption.strip():
                out.setdefault(str(key), caption.strip())
    return out


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def read_sidecar(source: SourceFile, cfg: IngestConfig) -> str | None:
    """The text of the video's sidecar caption file, or None when it has none.

    Raises StageError("bad_sidecar") when the file is not one a caption can come from: outside the input tree
    or not a regular file (discovery said so), larger than `max_sidecar_bytes` (never read whole), not UTF-8, or
    binary (control characters). A sidecar is the user's statement of what the video shows: a bad one fails the
    video rather than being silently replaced by a model caption.
    """
    if source.sidecar_problem:
        raise StageError("bad_sidecar", f"{source.uri}: {source.sidecar_problem}")
    if source.sidecar is None:
        return None
    limit = cfg.max_sidecar_bytes
    try:
        if is_local(source.sidecar):
            # O_NOFOLLOW: discovery resolved the sidecar inside the input; a symlink swapped in since is refused.
            fd = os.open(local_path(source.sidecar), os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise StageError("bad_sidecar", f"{source.uri}: its caption file is not a regular file")
                data = os.read(fd, limit + 1)
            finally:
                os.close(fd)
        else:
            with fsspec.open(source.sidecar, "rb") as f:
                data = f.read(limit + 1)
    except OSError as e:
        if environment_fault(e):
            raise
        raise StageError("bad_sidecar", f"{source.uri}: its caption file cannot be read: {e}") from e
    if len(data) > limit:
        raise StageError(
            "bad_sidecar", f"{source.uri}: its caption file is larger than max_sidecar_bytes={limit}"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise StageError(
            "bad_sidecar", f"{source.uri}: its caption file is not UTF-8 text ({e.reason})"
        ) from e
    if _CONTROL.search(text):
        raise StageError("bad_sidecar", f"{source.uri}: its caption file holds binary data, not text")
    return text.strip() or None


def sidecar_caption(source: SourceFile, cfg: IngestConfig, table: dict[str, str] | None) -> str | None:
    """The table's caption for the video if it has one, else the text of ``<video>.txt`` next to it."""
    if table:
        name = posixpath.basename(source.uri)
        for key in (source.uri, name, posixpath.splitext(name)[0]):
            if key in table:
                return table[key]
    return read_sidecar(source, cfg) if cfg.sidecar_txt else None


# ---------------------------------------------------------------------------------------------- the stage
class IngestStage(Stage[VideoRecord]):
    """Discovered file -> content id, probe, sidecar caption -> `VideoRecord` (or the reason it is unusable)."""

    name = "ingest"
    version = "3"  # 3: too_small, bounded sidecars
    record_type = VideoRecord

    def __init__(self, config):
        super().__init__(config)
        self._table: dict[str, str] | None = None
        self._table_loaded = False

    def settings(self) -> IngestConfig:
        return self.config.ingest

    def setup(self) -> None:
        # A Panda-70M-sized table is read once per replica, not once per batch.
        if not self._table_loaded:
            path = self.config.ingest.sidecar_table
            self._table = load_sidecar_table(path) if path else None
            self._table_loaded = True

    def result_key(self, ctx: VideoContext) -> str:
        # Per file, not per content id: two copies of one file in a batch each get their own record (their own
        # uri and caption); the driver then rules the later one a duplicate.
        return ctx.source.uri_key

    def process(self, videos: list[VideoContext]) -> dict[str, VideoRecord | StageError]:
        self.setup()
        cfg = self.config.ingest
        out: dict[str, VideoRecord | StageError] = {}
        for ctx in videos:
            src, key = ctx.source, ctx.source.uri_key
            try:
                if src.size == 0:
                    raise StageError("empty_file", f"{src.uri} is empty (0 bytes)")
                if src.video_id is None:
                    # From here on the failure rows of this file carry its content id.
                    ctx.source = src = src.model_copy(update={"video_id": content_id(src.uri, src.size)})
                rec = probe(src.uri, ctx.video_id, cfg)
                out[key] = rec.model_copy(update={"sidecar_caption": sidecar_caption(src, cfg, self._table)})
            except StageError as e:
                out[key] = e
            except OSError as e:
                if environment_fault(e):
                    raise
                out[key] = StageError("unreadable", f"cannot read {src.uri}: {e.strerror or e}")
        return out
