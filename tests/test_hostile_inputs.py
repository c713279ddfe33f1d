"""A folder of real-world junk next to good videos, curated once with the offline profile from the command line.

The run must finish; every good video becomes a sample; every bad file is a failure row with its reason or a
documented skip; nothing from outside the input tree enters the output; captions are bounded; index.json matches
the tars; the exit code is the number of failed videos. The same folder through the in-process executor gives the
same shard bytes (and so two clean runs are byte-identical).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.sample_data import astronaut_photo, camera_move, make_bad_videos, write_rotated_video, write_video

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

OUTSIDE_MARKER = "LUMOSX-OUTSIDE-THE-INPUT-7f3a9c"


def astronaut(n: int, size=(480, 360), start=(0, 64, 512, 448)):
    return [np.asarray(f) for f in camera_move(astronaut_photo(), start, (96, 40, 416, 280), size, n)]


def write_vfr(path: Path, frames: list[np.ndarray]) -> Path:
    """Variable frame rate: gaps of 40, 80 and 120 ms between frames (a screen recording, a phone in low light)."""
    gaps = [40, 80, 40, 120, 40]
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        pts = 0
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts, vf.time_base = pts, Fraction(1, 1000)
            pts += gaps[i % len(gaps)]
            for p in stream.encode(vf):
                out.mux(p)
        for p in stream.encode():
            out.mux(p)
    return path


def caption(
    path: Path, text: str = "A smiling woman astronaut in an orange spacesuit with a white helmet"
) -> None:
    path.with_suffix(".txt").write_text(text + "\n")


@pytest.fixture(scope="module")
def junk(tmp_path_factory, sample_videos) -> dict:
    root = tmp_path_factory.mktemp("hostile")
    inp = root / "in"
    inp.mkdir()
    outside = root / "outside"
    outside.mkdir()
    good: list[Path] = []
    for v in sample_videos:
        shutil.copy(v, inp / v.name)
        shutil.copy(v.with_suffix(".txt"), inp / v.with_suffix(".txt").name)
        good.append(inp / v.name)
    # Good videos with awkward names, deep folders, variable frame rate, a phone's rotation, 4K.
    for i, name in enumerate(["with space.mp4", "ünïcødé_名前.mp4", "new\nline.mp4"]):
        good.append(write_video(inp / name, astronaut(20 + i), 16))
        caption(inp / name)
    deep = inp / "a" / "b" / "c"
    deep.mkdir(parents=True)
    good.append(write_video(deep / "deep.mp4", astronaut(24), 16))
    caption(deep / "deep.mp4")
    good.append(write_vfr(inp / "vfr.mp4", astronaut(25)))
    caption(inp / "vfr.mp4")
    upright = astronaut(21, size=(360, 480), start=(64, 0, 448, 512))
    good.append(
        write_rotated_video(inp / "phone_portrait.mov", upright, 16, rotation=90, container_format="mov")
    )
    caption(inp / "phone_portrait.mov")
    (inp / "dir.mp4").mkdir()  # a folder named like a video: walked, not read
    bad_dir = make_bad_videos(inp / "dir.mp4")
    four_k = bad_dir.pop("uhd_4k")
    caption(four_k, "Six people around a card table, a woman in a black top holding playing cards")
    good.append(four_k)

    expected: dict[str, str] = {
        str(bad_dir["empty"]): "empty_file",
        str(bad_dir["truncated"]): "corrupt",
        str(bad_dir["no_frames"]): "corrupt",
        str(bad_dir["text"]): "not_a_video",
        str(bad_dir["audio_only"]): "no_video_stream",
        str(bad_dir["one_frame"]): "too_short",
    }
    # 8K frames: over max_pixels.
    eight_k = write_video(
        inp / "eight_k.mp4", [np.zeros((4320, 7680, 3), np.uint8)] * 16, 16, preset="ultrafast"
    )
    expected[str(eight_k)] = "too_large"
    # Frames OpenCV's HOG crashes the process on (20x14 ... 320x48): too small, or no face, never a crash.
    for w, h in [(20, 14), (64, 64), (96, 96), (64, 128), (160, 90), (320, 48)]:
        p = write_video(inp / f"small_{w}x{h}.mp4", [np.full((h, w, 3), 90 + w % 50, np.uint8)] * 20, 16)
        caption(p, "a grey wall")
        expected[str(p)] = "too_small" if min(w, h) < 64 else "no_face"
    # Links: a loop, a dangling link, a link out of the input tree, a symlinked duplicate, a folder loop.
    os.symlink(inp / "loop_b.mp4", inp / "loop_a.mp4")
    os.symlink(inp / "loop_a.mp4", inp / "loop_b.mp4")
    expected[str(inp / "loop_a.mp4")] = expected[str(inp / "loop_b.mp4")] = "symlink_loop"
    os.symlink(inp / "gone.mp4", inp / "dangling.mp4")
    expected[str(inp / "dangling.mp4")] = "broken_symlink"
    secret_video = write_video(outside / "secret.mp4", astronaut(20), 16)
    (outside / "secret.txt").write_text(OUTSIDE_MARKER)
    os.symlink(secret_video, inp / "outside.mp4")
    expected[str(inp / "outside.mp4")] = "outside_input"
    os.symlink(inp / "astronaut_zoom.mp4", inp / "zz_link_to_astronaut.mp4")
    expected[str(inp / "zz_link_to_astronaut.mp4")] = "duplicate"
    os.symlink("..", deep / "up")
    # A FIFO named like a video: open() would block forever.
    os.mkfifo(inp / "fifo.mp4")
    expected[str(inp / "fifo.mp4")] = "not_a_file"
    # Sidecars: a link to a file outside the input (and to /etc/passwd), a huge one, a binary one, a too-long one.
    for name, sidecar in [
        ("passwd_sidecar", "/etc/passwd"),
        ("outside_sidecar", str(outside / "secret.txt")),
    ]:
        p = write_video(inp / f"{name}.mp4", astronaut(22 + len(name) % 5, start=(8, 64, 504, 448)), 16)
        os.symlink(sidecar, p.with_suffix(".txt"))
        expected[str(p)] = "bad_sidecar"
    p = write_video(inp / "huge_sidecar.mp4", astronaut(27), 16)
    p.with_suffix(".txt").write_bytes(b"a man " * (20 * 2**20 // 6))
    expected[str(p)] = "bad_sidecar"
    p = write_video(inp / "binary_sidecar.mp4", astronaut(28), 16)
    p.with_suffix(".txt").write_bytes(os.urandom(4096) + b"\x00" * 64)
    expected[str(p)] = "bad_sidecar"
    p = write_video(inp / "long_caption.mp4", astronaut(29), 16)
    p.with_suffix(".txt").write_text("a woman astronaut smiling " * 200)
    expected[str(p)] = "caption_too_long"
    # Hidden files: skipped with a note.
    shutil.copy(inp / "astronaut_zoom.mp4", inp / "..name.mp4")
    shutil.copy(inp / "astronaut_zoom.mp4", inp / "._mac.mp4")
    return {"root": root, "in": inp, "good": [str(g) for g in good], "expected": expected}


@pytest.fixture(scope="module")
def cli_run(junk) -> dict:
    out = junk["root"] / "out"
    env = {
        **os.environ,
        "PREFECT_HOME": str(junk["root"] / "ph"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        str(junk["in"]),
        str(out),
        "--profile",
        "offline",
        "--no-progress",
    ]
    log = junk["root"] / "cli.log"
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=1500)
    return {
        "out": out,
        "rc": proc.returncode,
        "log": log.read_text(),
        "report": json.loads((out / "report.json").read_text()),
    }


def test_the_run_finishes_and_every_good_video_is_a_sample(cli_run, junk):
    report = cli_run["report"]
    assert report["executor"] == "ray" and not report["aborted"], cli_run["log"][-3000:]
    manifest = pq.read_table(cli_run["out"] / "manifest.parquet").to_pylist()
    assert sorted(r["uri"] for r in manifest) == sorted(junk["good"])


def test_every_bad_file_is_a_failure_row_with_its_reason(cli_run, junk):
    failures = pq.read_table(cli_run["out"] / "failures.parquet").to_pylist()
    got = {f["uri"]: f["error_class"] for f in failures}
    assert got == junk["expected"]
    assert all(f["message"] for f in failures)
    report = cli_run["report"]
    assert report["samples"] + report["videos_failed"] == report["videos_found"]
    assert set(report["skipped"]) == {"hidden", "symlink_loop"}
    assert {Path(u).name for u in report["skipped"]["hidden"]["examples"]} == {"..name.mp4", "._mac.mp4"}


def test_the_exit_code_is_the_number_of_failed_videos(cli_run, junk):
    assert cli_run["rc"] == len(junk["expected"]) == cli_run["report"]["videos_failed"]


def test_nothing_from_outside_the_input_enters_the_output(cli_run):
    passwd = Path("/etc/passwd").read_bytes().splitlines()[0]
    for path in cli_run["out"].rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert OUTSIDE_MARKER.encode() not in data, path
            assert passwd not in data, path
    manifest = pq.read_table(cli_run["out"] / "manifest.parquet").to_pylist()
    assert not any("outside" in r["uri"] or "secret" in r["uri"] for r in manifest)


def test_captions_are_bounded_and_the_index_matches_the_tars(cli_run):
    from schemas.config import load_config

    limit = load_config("offline").caption.max_chars
    manifest = pq.read_table(cli_run["out"] / "manifest.parquet").to_pylist()
    assert all(0 < len(r["caption"]) <= limit for r in manifest)
    index = json.loads((cli_run["out"] / "index.json").read_text())
    tars = sorted(p.name for p in (cli_run["out"] / "shards").iterdir())
    assert tars == sorted(e["url"] for e in index["shards"])
    for e in index["shards"]:
        data = (cli_run["out"] / "shards" / e["url"]).read_bytes()
        assert len(data) == e["num_bytes"] and hashlib.sha256(data).hexdigest() == e["sha256"]


def test_the_in_process_executor_makes_the_same_bytes(cli_run, junk):
    from schemas.config import load_config
    from tasks.engine import Curation

    out = junk["root"] / "out-local"
    with Curation(load_config("offline"), str(junk["in"]), str(out), executor="local") as c:
        for part in c.partitions():
            c.run_partition(part)
        report = c.finalize()
    assert report["samples"] == cli_run["report"]["samples"]
    names = sorted(p.name for p in (cli_run["out"] / "shards").iterdir())
    assert names == sorted(p.name for p in (out / "shards").iterdir())
    for name in names:
        assert (out / "shards" / name).read_bytes() == (cli_run["out"] / "shards" / name).read_bytes(), name
    assert (out / "index.json").read_bytes() == (cli_run["out"] / "index.json").read_bytes()
