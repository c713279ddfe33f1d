"""Keyframe extraction (seek + decode one GOP per frame) vs decoding the whole video.

    .venv/bin/python benchmarks/bench_keyframes.py [--seconds 60]

The test video is a 1280x720 H.264 pan over the group photo, x264 defaults (keyframe every 250 frames, ~10 s
at 24 fps, like many web videos), made once and cached in the temp directory. Timings are the best of 3 runs.
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


def test_video(seconds: int) -> Path:
    from flows.sample_data import camera_move, group_photo, write_video

    path = Path(tempfile.gettempdir()) / "lumosx_bench" / f"pan_720p_{seconds}s.mp4"
    if not path.is_file():
        n = seconds * FPS
        print(f"making {path} ({n} frames, once) ...", flush=True)
        frames = camera_move(group_photo(), (0, 0, 1280, 720), (200, 100, 1000, 550), (1280, 720), n)
        write_video(path, frames, FPS, preset="veryfast", crf=23)
    return path


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(seconds: int = 60, repeats: int = 3) -> dict:
    import av

    from schemas.config import IngestConfig
    from tasks.ingest import content_id, probe
    from tasks.keyframes import extract_keyframes, sample_frames

    path = test_video(seconds)
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
        "video": f"{video.width}x{video.height} {video.codec} {video.duration_s:.0f} s, {video.num_frames} frames",
        "keyframes_3_png_s": round(extract_s, 3),
        "seek_decode_3_frames_s": round(seek_s, 3),
        "decode_whole_video_s": round(full_s, 3),
        "speedup_vs_whole_decode": round(full_s / extract_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="length of the test video")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = run(args.seconds, args.repeats)
    print(json.dumps(result, indent=1))
    print(
        f"keyframes (3 frames, PNG written): {result['keyframes_3_png_s']:.3f} s | "
        f"whole-video decode: {result['decode_whole_video_s']:.3f} s | "
        f"ratio: {result['speedup_vs_whole_decode']}x"
    )


if __name__ == "__main__":
    main()
