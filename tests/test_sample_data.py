"""The built-in sample videos: made by the CLI, accepted by ingest with their captions, and showing real faces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flows.sample_data import CAPTIONS, main
from schemas.config import CurateConfig
from schemas.records import SourceFile
from tasks.discovery import discover
from tasks.keyframes import sample_frames
from tests.subject_fixtures import ingest_contexts


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("samples")
    main([str(out), "--bad"])
    return out


def test_cli_writes_samples_and_bad_files(out_dir, capsys):
    names = sorted(p.name for p in out_dir.iterdir() if p.is_file())
    assert names == sorted(f"{n}.{ext}" for n in CAPTIONS for ext in ("mp4", "txt"))
    bad = sorted(p.stem for p in (out_dir / "bad").iterdir())
    assert bad == sorted(["empty", "truncated", "no_frames", "text", "audio_only", "one_frame", "uhd_4k"])
    assert not list(out_dir.rglob(".*"))  # no temporary files left behind


def test_samples_pass_ingest_with_their_captions(out_dir):
    cfg = CurateConfig()
    pattern = out_dir / "*.mp4"  # not bad/, which the --bad run added
    found = list(discover(str(pattern), cfg.ingest.extensions))
    assert all(isinstance(f, SourceFile) for f in found), found
    assert sorted(f.uri for f in found) == sorted(str(out_dir / f"{n}.mp4") for n in CAPTIONS)
    items = ingest_contexts([pattern], cfg)
    assert [c.failure for c in items] == [None] * len(items)
    by_name = {Path(c.uri).stem: c.video for c in items}
    assert set(by_name) == set(CAPTIONS)
    for name, rec in by_name.items():
        assert rec.sidecar_caption == CAPTIONS[name] and rec.uri == str(out_dir / f"{name}.mp4")
        assert (rec.fps, rec.num_frames, rec.duration_s, rec.codec) == (16.0, 48, 3.0, "h264")
        assert rec.height == 360 and rec.width in (480, 640)


def test_samples_show_faces(out_dir):
    """The videos really contain people: OpenCV's Haar face detector (weights ship with opencv) finds them."""
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "CascadeClassifier"):
        pytest.skip("OpenCV 5 dropped CascadeClassifier")
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")

    def faces(name: str) -> list:
        (image,) = sample_frames(str(out_dir / f"{name}.mp4"), [1.5])
        grey = np.asarray(image.convert("L"))
        return list(cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24)))

    assert len(faces("group_pan")) >= 3  # six people; the tilted heads escape a frontal-face cascade
    assert len(faces("astronaut_zoom")) == 1
    two = faces("two_people")
    # The laughing man faces the camera on the right; the woman on the left looks down at her cards.
    assert len(two) >= 1 and all(x > 320 for x, _, _, _ in two)


def test_sample_videos_are_byte_identical_across_generations_and_core_counts(out_dir, tmp_path):
    """The demo's keys are content ids: the same videos must come out byte for byte on any machine.

    The second generation runs in a process limited to one CPU (x264's default thread count follows the cores,
    and its output follows the thread count): pinned encoder options make that irrelevant.
    """
    import hashlib
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    code = (
        "import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from flows.sample_data import make_sample_videos; make_sample_videos(sys.argv[1])"
    )
    env = {**os.environ, "PYTHONPATH": str(repo)}
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=repo, env=env, timeout=300)

    def digests(d: Path) -> dict[str, str]:
        return {n: hashlib.sha256((d / f"{n}.mp4").read_bytes()).hexdigest() for n in CAPTIONS}

    assert digests(tmp_path) == digests(out_dir)
    assert b"Lavf" not in (out_dir / "astronaut_zoom.mp4").read_bytes()  # no muxer version string
