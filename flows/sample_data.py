"""Built-in sample media for the demo and the tests, generated from real photos that ship in installed packages.

Nothing is committed: the videos are made on demand (a few seconds) from insightface's ``t1.jpg`` group photo
(six people around a card table) and scikit-image's ``astronaut`` portrait. Each good video has a sidecar
``<name>.txt`` caption written from looking at the images, so the sidecar caption path runs end to end with
captions that are true. `make_bad_videos` makes one file per way ingest must refuse a file, plus a 4K video
that must pass.

    python -m flows.sample_data OUT_DIR [--bad]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from collections.abc import Callable, Iterable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from tasks.base import atomic_path, atomic_write_bytes
from tasks.clip import add_video_stream

Frame = np.ndarray | Image.Image | av.VideoFrame

CAPTIONS = {
    "group_pan": (
        "Six friends gather around a wooden poker table covered in colourful chips in a warm, lamp-lit room: "
        "on the left a woman with long blonde hair in a black top with cream lace holds up playing cards, "
        "a dark-haired woman in a black dress leans over a smiling dark-haired man in a dark grey shirt, "
        "a laughing man in a dark red shirt holds a blue chip, a tall dark-haired man in a grey shirt stands "
        "at the back, and on the right a blonde woman in a black sleeveless top holds her cards. "
        "The camera slowly pans and zooms in."
    ),
    "astronaut_zoom": (
        "A smiling woman astronaut with short light-brown hair, wearing an orange spacesuit with mission "
        "patches, poses in front of an American flag and a model of the space shuttle; a white helmet "
        "with a dark visor rests beside her. The camera slowly zooms in on her face."
    ),
    "two_people": (
        "On the left a woman with long strawberry-blonde hair in a black top with cream lace trim looks down at "
        "the playing cards in her hand; on the right a laughing dark-haired man in a dark red shirt holds up a "
        "blue poker chip. They sway gently against a plain beige wall."
    ),
}


# ---------------------------------------------------------------------------------------------- writer
def write_video(
    path: str | Path,
    frames: Iterable[Frame],
    fps: int | Fraction = 16,
    *,
    crf: int = 20,
    encoder: str | None = None,
    gop: int | None = None,
    preset: str | None = "veryfast",
    start_time_s: float = 0.0,
    container_format: str = "mp4",
    faststart: bool = False,
    rotation: int = 0,
    mirrored: bool = False,
    threads: int | None = None,
    bitexact: bool = False,
) -> Path:
    """Encode frames (HxWx3 uint8 RGB arrays, PIL images or PyAV frames) to a video file, atomically.

    `threads` pins the encoder's thread count (x264's output depends on it, and it defaults to the machine's
    cores); `bitexact` leaves the muxer's version string out, so the bytes do not depend on the FFmpeg build.

    `start_time_s` shifts every timestamp (the stream then starts later than 0, as in many real files);
    `gop` sets the keyframe interval (seek tests need several GOPs). `rotation` (degrees clockwise) and
    `mirrored` write a display matrix telling players to turn the frames, as phones do (mp4/mov only).
    """
    path = Path(path)
    rate = Fraction(fps)
    time_base = 1 / rate
    first_pts = round(start_time_s * rate)
    options = {"movflags": "+faststart"} if faststart and container_format == "mp4" else {}
    if bitexact:
        options["fflags"] = "+bitexact"
    with (
        atomic_path(path) as tmp,
        av.open(str(tmp), "w", format=container_format, container_options=options) as out,
    ):
        stream = None
        for i, frame in enumerate(frames):
            if isinstance(frame, av.VideoFrame):
                vf = frame
            else:
                arr = np.asarray(
                    frame.convert("RGB") if isinstance(frame, Image.Image) else frame, dtype=np.uint8
                )
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
            if stream is None:
                stream = add_video_stream(
                    out,
                    vf.width,
                    vf.height,
                    rate,
                    crf=crf,
                    encoder=encoder,
                    gop=gop,
                    preset=preset,
                    threads=threads,
                )
                if bitexact:
                    stream.codec_context.flags |= av.codec.context.Flags.bitexact
                stream.codec_context.time_base = time_base
                if rotation or mirrored:  # PyAV's angle is counter-clockwise
                    stream.set_display_rotation(-rotation, hflip=mirrored)
            vf.pts, vf.time_base = first_pts + i, time_base
            for packet in stream.encode(vf):
                out.mux(packet)
        if stream is None:
            raise ValueError(f"no frames to write to {path}")
        for packet in stream.encode():
            out.mux(packet)
    return path


# ---------------------------------------------------------------------------------------------- source photos
def group_photo() -> Image.Image:
    """insightface's t1.jpg: six people at a card table (1280x886)."""
    # find_spec locates the package without importing it (importing insightface costs about a second).
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the sample videos need insightface (pip install insightface)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "images" / "t1.jpg"
    return Image.open(path).convert("RGB")


def astronaut_photo() -> Image.Image:
    """scikit-image's astronaut: one person, one face (512x512)."""
    import skimage.data

    return Image.fromarray(skimage.data.astronaut())


def _ease(t: float) -> float:
    return 0.5 - 0.5 * math.cos(math.pi * t)  # smooth start and stop, like a camera operator


def camera_move(
    image: Image.Image,
    start: tuple[float, float, float, float],
    end: tuple[float, float, float, float],
    size: tuple[int, int],
    num_frames: int,
) -> Iterable[Image.Image]:
    """Frames of a pan/zoom: the crop box moves from `start` to `end`, each crop resized to `size`."""
    for i in range(num_frames):
        t = _ease(i / max(1, num_frames - 1))
        box = tuple(a + (b - a) * t for a, b in zip(start, end))
        yield image.resize(size, Image.BICUBIC, box=box)


def _two_people_frames(num_frames: int, size: tuple[int, int] = (640, 360)) -> Iterable[Image.Image]:
    """Two persons cut from the group photo, side by side on a plain wall, swaying a little."""
    photo = group_photo()
    left = photo.crop((0, 225, 262, 585))  # the woman with cards at the photo's left edge
    right = photo.crop((688, 275, 893, 635))  # the laughing man in the red shirt
    w = size[0]
    for i in range(num_frames):
        phase = 2 * math.pi * i / num_frames
        canvas = Image.new("RGB", size, (182, 150, 112))  # the photo's warm wall colour
        canvas.paste(left, (40 + round(8 * math.sin(phase)), 0))
        canvas.paste(right, (w - 40 - right.width + round(8 * math.sin(phase + 1.0)), 0))
        yield canvas


# ---------------------------------------------------------------------------------------------- sample sets
def make_sample_videos(out_dir: str | Path, *, seconds: float = 3.0, fps: int = 16) -> list[Path]:
    """Three short videos of people with sidecar captions: group pan (6 faces), astronaut zoom, two people."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = round(seconds * fps)
    makers: dict[str, Callable[[], Iterable[Frame]]] = {
        "group_pan": lambda: camera_move(
            group_photo(), (0, 50, 1280, 770), (60, 40, 1220, 692.5), (640, 360), n
        ),
        "astronaut_zoom": lambda: camera_move(
            astronaut_photo(), (0, 64, 512, 448), (96, 40, 416, 280), (480, 360), n
        ),
        "two_people": lambda: _two_people_frames(n),
    }
    paths = []
    for name, frames in makers.items():
        # Byte-reproducible on any machine: the same content ids (sample keys) everywhere. One encoder thread and
        # no version strings; PIL's resampling and x264 are deterministic for a given build of each.
        path = write_video(
            out_dir / f"{name}.mp4", frames(), fps, encoder="libx264", threads=1, bitexact=True
        )
        atomic_write_bytes(out_dir / f"{name}.txt", (CAPTIONS[name] + "\n").encode())
        paths.append(path)
    return paths


def _synthetic_frames(num_frames: int, width: int = 160, height: int = 120) -> Iterable[np.ndarray]:
    """A moving gradient: cheap to make, not trivially compressible (so truncating the file cuts frames)."""
    y, x = np.mgrid[0:height, 0:width]
    for i in range(num_frames):
        r = (x * 255 // width + 4 * i) % 256
        g = (y * 255 // height + 2 * i) % 256
        b = ((x + y + 8 * i) % 64) * 4
        yield np.stack([r, g, b], axis=-1).astype(np.uint8)


def orientation_chart(width: int, height: int) -> np.ndarray:
    """An upright picture that looks different under every turn and mirror: four quadrants, white top-left, red
    top-right, green bottom-left, blue bottom-right (HxWx3 uint8)."""
    chart = np.empty((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    chart[:h, :w], chart[:h, w:] = (235, 235, 235), (200, 40, 40)
    chart[h:, :w], chart[h:, w:] = (40, 200, 40), (40, 40, 200)
    return chart


def write_rotated_video(
    path: str | Path,
    upright: Iterable[np.ndarray],
    fps: int | Fraction = 16,
    *,
    rotation: int = 90,
    mirrored: bool = False,
    **kw,
) -> Path:
    """A phone-style video of `upright` frames (HxWx3 arrays): each stored turned back (mirrored, then `rotation`
    degrees counter-clockwise) with a display matrix that tells players to show it upright again."""
    if rotation % 90:
        raise ValueError(f"rotation must be a multiple of 90 degrees, got {rotation}")
    # np.rot90 turns counter-clockwise (rows top to bottom); the display matrix mirrors after rotating.
    stored = (np.rot90(np.fliplr(f) if mirrored else f, k=rotation // 90) for f in upright)
    return write_video(path, stored, fps, rotation=rotation % 360, mirrored=mirrored, **kw)


def _write_audio_only(path: Path, seconds: float = 1.0, rate: int = 44100) -> Path:
    """An AAC sine tone in an mp4 container (a music file named .mp4)."""
    with atomic_path(path) as tmp, av.open(str(tmp), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=rate, layout="mono")
        samples = 1024  # the AAC frame size
        for i in range(int(seconds * rate / samples)):
            t = (np.arange(samples) + i * samples) / rate
            frame = av.AudioFrame.from_ndarray(
                (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None], format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = rate, i * samples
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def make_bad_videos(out_dir: str | Path) -> dict[str, Path]:
    """One file per way ingest must refuse a video, plus a short 4K video that must pass.

    empty (0 bytes), truncated (first half of an mp4: no moov atom), no_frames (header intact, frame data cut
    off), text (a text file named .mp4), audio_only (AAC in mp4), one_frame, uhd_4k (3840x2160, 20 frames).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        name: out_dir / f"{name}.mp4"
        for name in ("empty", "truncated", "no_frames", "text", "audio_only", "one_frame", "uhd_4k")
    }

    atomic_write_bytes(paths["empty"], b"")
    atomic_write_bytes(paths["text"], b"This is not a video. It is a text file with a video's name.\n" * 20)

    # Without faststart the index (moov) is written last: the first half of the file has none.
    good = write_video(out_dir / ".good.mp4", _synthetic_frames(48), 16)
    data = good.read_bytes()
    atomic_write_bytes(paths["truncated"], data[: len(data) // 2])
    # With faststart the index comes first: cutting right after it leaves a file that opens but has no frames.
    good = write_video(out_dir / ".good.mp4", _synthetic_frames(48), 16, faststart=True)
    data = good.read_bytes()
    mdat = data.index(b"mdat") - 4
    atomic_write_bytes(paths["no_frames"], data[: mdat + 8 + 16])
    good.unlink()

    _write_audio_only(paths["audio_only"])
    write_video(paths["one_frame"], _synthetic_frames(1), 16)

    # 4K: the upscaled photo, held still. Converted to YUV once (a 4K RGB->YUV conversion costs ~0.2 s), and
    # static frames cost x264 almost nothing after the first: about a second in all.
    photo = np.asarray(group_photo().resize((3840, 2160), Image.BILINEAR))
    still = av.VideoFrame.from_ndarray(photo, format="rgb24").reformat(format="yuv420p")
    write_video(paths["uhd_4k"], (still for _ in range(20)), 24, preset="ultrafast")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--bad", action="store_true", help="also write files ingest must refuse (in OUT_DIR/bad)"
    )
    args = parser.parse_args(argv)
    for path in make_sample_videos(args.out_dir):
        print(path)
    if args.bad:
        for name, path in make_bad_videos(args.out_dir / "bad").items():
            print(f"{path}  ({name})")


if __name__ == "__main__":
    main()
