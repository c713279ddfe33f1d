"""Keyframe extraction (seek + decode one GOP per frame) vs decoding the whole video.

    .venv/bin/python benchmarks/bench_keyframes.py [--seconds 90] [--gop-s 5]

The test video is a 1280x720 H.264 (x264 veryfast, B-frames) pan over the group photo at 24 fps with a keyframe
every 5 s (streaming encodes use 2-5 s; x264's default of 250 frames is ~10 s), made once and cached in the temp
directory. Extraction costs about one GOP per frame, whatever the length, so the ratio grows with the duration
and shrinks with the GOP. Timings are the best of 3 runs (the whole-video decode: 1 run).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FPS = 24
POSITIONS = [0.05, 0.5, 0.95]


def test_video(seconds: int, gop_s: float) -> Path:
    import numpy as np

    from flows.sample_data import group_photo, write_video

    path = Path(tempfile.gettempdir()) / "lumosx_bench" / f"pan_720p_{seconds}s_gop{gop_s:g}s.mp4"
    if not path.is_file():
        n = seconds * FPS
        print(f"making {path} ({n} frames, once) ...", flush=True)
        # A diagonal pan: crops of one upscaled photo (free to make, so encoding dominates the one-off cost).
        photo = np.asarray(group_photo().resize((1600, 1000)))
        frames = (photo[i * 280 // n :][:720, i * 320 // n :][:, :1280] for i in range(n))
        write_video(path, frames, FPS, preset="veryfast", crf=23, gop=int(gop_s * FPS))
    return path


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(seconds: int = 90, gop_s: float = 5.0, repeats: int = 3) -> dict:
    import av

    from schemas.config import IngestConfig
    from tasks.ingest import content_id, probe
    from tasks.keyframes import extract_keyframes, sample_frames

    path = test_video(seconds, gop_s)
    uri = str(path)
    video = probe(uri, content_id(uri), IngestConfig())
    times = [p * video.duration_s for p in POSITIONS]

    def decode_all() -> None:
        with av.open(uri) as c:
            stream = c.streams.video[0]
            stream.thread_type = "AUTO"  # the same decoder threading the keyframe code uses
            for _ in c.decode(stream):
                pass

    with tempfile.TemporaryDirectory() as out:
        extract_s = _best_of(lambda: extract_keyframes(uri, video, POSITIONS, Path(out), "png"), repeats)
    seek_s = _best_of(lambda: sample_frames(uri, times), repeats)
    full_s = _best_of(decode_all, 1 if seconds > 30 else repeats)
    return {
        "video": f"{video.width}x{video.height} {video.codec} {video.duration_s:.0f} s, {video.num_frames} frames, "
        f"keyframe every {gop_s:g} s",
        "keyframes_3_png_s": round(extract_s, 3),
        "seek_decode_3_frames_s": round(seek_s, 3),
        "decode_whole_video_s": round(full_s, 3),
        "speedup_vs_whole_decode": round(full_s / extract_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=90, help="length of the test video")
    parser.add_argument("--gop-s", type=float, default=5.0, help="keyframe interval of the test video")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = run(args.seconds, args.gop_s, args.repeats)
    print(json.dumps(result, indent=1))
    print(
        f"keyframes (3 frames, PNG written): {result['keyframes_3_png_s']:.3f} s | "
        f"whole-video decode: {result['decode_whole_video_s']:.3f} s | "
        f"ratio: {result['speedup_vs_whole_decode']}x"
    )


if __name__ == "__main__":
    main()
