"""The curate flow end to end on the built-in sample videos with the offline profile (real detectors)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _read_samples(out: Path) -> list[dict]:
    shards = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    return list(wds.WebDataset(shards, shardshuffle=False)) if shards else []


@pytest.fixture(scope="module")
def curated(tmp_path_factory, prefect_harness, sample_videos) -> tuple[Path, dict, list[Path]]:
    """One offline run over the sample videos plus every kind of broken file."""
    from flows.curate import curate
    from flows.sample_data import make_bad_videos

    root = tmp_path_factory.mktemp("curate")
    videos = root / "videos"
    videos.mkdir()
    for v in sample_videos:
        (videos / v.name).write_bytes(v.read_bytes())
        if v.with_suffix(".txt").exists():
            (videos / v.with_suffix(".txt").name).write_text(v.with_suffix(".txt").read_text())
    bad = make_bad_videos(videos / "bad")
    report = curate(input=str(videos), output=str(root / "out"), profile="offline", progress=False)
    return root / "out", report, list(bad.values())


def test_shards_read_back_with_plain_webdataset(curated):
    out, report, _ = curated
    samples = _read_samples(out)
    assert len(samples) == report["samples"] >= 2
    for s in samples:
        assert "." not in s["__key__"]
        assert s["mp4"][4:8] == b"ftyp", "clip must be mp4 bytes"
        assert s["caption.txt"].decode().strip()
        faces = [k for k in s if k.startswith("face_") and k.endswith(".png")]
        assert faces, f"{s['__key__']} has no face image"
        meta = json.loads(s["meta.json"])
        assert meta["schema_version"] == 1 and meta["key"] == s["__key__"]
        assert {p["face"] for p in meta["persons"]} == set(faces)
        assert len(meta["keyframes"]) == 3
    manifest = pq.read_table(out / "manifest.parquet")
    assert manifest.num_rows == len(samples)
    assert sorted(manifest.column("key").to_pylist()) == sorted(s["__key__"] for s in samples)
    index = json.loads((out / "index.json").read_text())
    assert sum(e["count"] for e in index["shards"]) == len(samples)


def test_face_images_contain_a_face_by_an_independent_detector(curated):
    """Faces are found with dlib in the offline profile; MTCNN (different weights and method) must agree."""
    from facenet_pytorch import MTCNN

    out, _, _ = curated
    mtcnn = MTCNN(keep_all=True, device="cpu", min_face_size=12)
    checked = 0
    for s in _read_samples(out):
        for k, v in s.items():
            if k.startswith("face_") and k.endswith(".png"):
                img = Image.open(io.BytesIO(v)).convert("RGB")
                # Pad: a tight crop leaves MTCNN's pyramid little context.
                canvas = Image.new("RGB", (img.width * 2, img.height * 2), (128, 128, 128))
                canvas.paste(img, (img.width // 2, img.height // 2))
                boxes, probs = mtcnn.detect(canvas)
                assert boxes is not None and np.max(probs) > 0.8, f"no face in {s['__key__']}/{k}"
                checked += 1
    assert checked >= 3


def test_group_photo_yields_at_least_five_persons_with_a_face(curated):
    out, _, _ = curated
    metas = [json.loads(s["meta.json"]) for s in _read_samples(out)]
    group = [m for m in metas if "group" in Path(m["video"]["uri"]).name]
    assert group, "the group-photo sample video produced no sample"
    assert len(group[0]["persons"]) >= 5


def test_bad_files_are_failures_with_reasons(curated):
    out, report, bad = curated
    failures = pq.read_table(out / "failures.parquet").to_pylist()
    failed_uris = {Path(f["uri"]).name: f for f in failures}
    for path in bad:
        if "4k" in path.name.lower():
            continue  # a 4K video is valid input: it is downscaled, or fails later for content reasons
        assert path.name in failed_uris, f"{path.name} is not in the failures table"
        f = failed_uris[path.name]
        assert f["error_class"] and f["message"] and f["stage"]
    assert report["videos_failed"] == len({f["uri"] for f in failures})


def test_rerun_resumes_everything(curated, tmp_path):
    from flows.curate import curate

    out, report, _ = curated
    videos = out.parent / "videos"
    again = curate(input=str(videos), output=str(out), profile="offline", progress=False)
    assert again["samples"] == report["samples"]
    assert again["samples_written_this_run"] == 0
    for name, s in again["stages"].items():
        assert s["processed"] == 0 or name == "ingest", f"{name} redid work on a rerun"


def test_sigkill_midway_then_resume_gives_same_samples(curated, tmp_path):
    """Kill -9 the CLI in the middle of a run, start it again: same keys as the uninterrupted run, no dupes."""
    out_ref, _, _ = curated
    videos = out_ref.parent / "videos"
    out = tmp_path / "out"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "ph"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        str(videos),
        str(out),
        "--profile",
        "offline",
        "--no-progress",
        "--set",
        "run.batch_size=1",
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 600
    # Kill once some, but not all, videos have their faces found: mid-pipeline, files being written.
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((out / "work" / "records" / "faces").glob("*.json"))) >= 1:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # Output to a file, not a pipe: a crashed run's orphaned Prefect server would hold a pipe open forever.
    log = tmp_path / "rerun.log"
    with log.open("w") as fh:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=900)
    assert done.returncode in range(0, 126), log.read_text()[-3000:]
    ref = sorted(s["__key__"] for s in _read_samples(out_ref))
    got = [s["__key__"] for s in _read_samples(out)]
    assert sorted(got) == ref and len(got) == len(set(got))
    index = json.loads((out / "index.json").read_text())
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(e["url"] for e in index["shards"])


def test_bounded_window_of_batches_gives_the_same_samples(curated, tmp_path):
    """One batch in flight at a time (the window that bounds a million-video run) changes nothing but speed."""
    from flows.curate import curate

    out_ref, report_ref, _ = curated
    report = curate(
        input=str(out_ref.parent / "videos"),
        output=str(tmp_path / "out"),
        profile="offline",
        overrides={"run": {"batch_size": 1, "max_batches_in_flight": 1}},
        progress=False,
    )
    assert report["samples"] == report_ref["samples"]
    assert sorted(s["__key__"] for s in _read_samples(tmp_path / "out")) == sorted(
        s["__key__"] for s in _read_samples(out_ref)
    )
