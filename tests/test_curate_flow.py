"""The curate flow end to end on the built-in sample videos with the offline profile (real detectors).

One run on the in-process executor (`local`) and one on a local Ray (the default): both make the same shards, byte
for byte, and the flow's report and artifacts describe the run.
"""

from __future__ import annotations

import hashlib
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
def videos(tmp_path_factory, sample_videos) -> tuple[Path, list[Path]]:
    from flows.sample_data import make_bad_videos

    root = tmp_path_factory.mktemp("curate")
    videos = root / "videos"
    videos.mkdir()
    for v in sample_videos:
        (videos / v.name).write_bytes(v.read_bytes())
        (videos / v.with_suffix(".txt").name).write_text(v.with_suffix(".txt").read_text())
    bad = make_bad_videos(videos / "bad")
    return videos, list(bad.values())


@pytest.fixture(scope="module")
def curated(videos, prefect_harness) -> tuple[Path, dict]:
    """One offline run on the in-process executor over the sample videos plus every kind of broken file."""
    from flows.curate import curate

    out = videos[0].parent / "out"
    report = curate(
        input=str(videos[0]), output=str(out), profile="offline", progress=False, executor="local"
    )
    return out, report


def test_shards_read_back_with_plain_webdataset(curated):
    out, report = curated
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
        assert meta["random_weights"] is False
    manifest = pq.read_table(out / "manifest.parquet")
    assert manifest.num_rows == len(samples)
    assert sorted(manifest.column("key").to_pylist()) == sorted(s["__key__"] for s in samples)
    index = json.loads((out / "index.json").read_text())
    assert sum(e["count"] for e in index["shards"]) == len(samples)
    for e in index["shards"]:
        assert hashlib.sha256((out / "shards" / e["url"]).read_bytes()).hexdigest() == e["sha256"]


def test_face_images_contain_a_face_by_an_independent_detector(curated):
    """Faces are found with dlib in the offline profile; MTCNN (different weights and method) must agree."""
    from facenet_pytorch import MTCNN

    out, _ = curated
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
    out, _ = curated
    metas = [json.loads(s["meta.json"]) for s in _read_samples(out)]
    group = [m for m in metas if "group" in Path(m["video"]["uri"]).name]
    assert group, "the group-photo sample video produced no sample"
    assert len(group[0]["persons"]) >= 5


def test_bad_files_are_failures_with_reasons(curated, videos):
    out, report = curated
    failures = pq.read_table(out / "failures.parquet").to_pylist()
    failed = {Path(f["uri"]).name: f for f in failures}
    expected = {
        "empty": "empty_file",
        "truncated": "corrupt",
        "no_frames": "corrupt",
        "text": "not_a_video",
        "audio_only": "no_video_stream",
        "one_frame": "too_short",
    }
    for path in videos[1]:
        if "4k" in path.name.lower():
            continue  # a 4K video is valid input: it is downscaled, or fails later for content reasons
        assert path.name in failed, f"{path.name} is not in the failures table"
        assert failed[path.name]["error_class"] == expected[path.stem] and failed[path.name]["message"]
    assert report["videos_failed"] == len({f["uri"] for f in failures})
    assert report["samples"] + report["videos_failed"] == report["videos_found"]


def test_the_report_is_honest_and_published(curated):
    out, report = curated
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["samples"] == report["samples"] and on_disk["executor"] == "local"
    assert report["overhead"] >= 1.0 - 1e-6  # the run can be no faster than its stages' busy time
    assert report["work_seconds"] <= report["wall_seconds"]
    assert report["stages"]["faces"]["processed"] == report["stages"]["faces"]["ok"] + sum(
        report["stages"]["faces"]["failed"].values()
    )
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.curate import _slug

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"curate-report-{_slug(str(out))}"]))
        )
    assert arts and f"{report['samples']} samples" in arts[0].data


def test_rerun_resumes_everything_without_starting_anything(curated, videos):
    from flows.curate import curate

    out, report = curated
    again = curate(input=str(videos[0]), output=str(out), profile="offline", progress=False, executor="ray")
    assert again["samples"] == report["samples"] and again["samples_written_this_run"] == 0
    assert again["executor"] is None, "a rerun with nothing to do must not start Ray or load a model"
    assert all(s["processed"] == 0 for s in again["stages"].values())
    assert again["videos_failed"] == report["videos_failed"]


def test_ray_and_the_in_process_executor_make_the_same_shards(curated, videos, tmp_path):
    from flows.curate import curate

    out, report = curated
    ray_out = tmp_path / "ray"
    ray_report = curate(
        input=str(videos[0]), output=str(ray_out), profile="offline", progress=False, executor="ray"
    )
    assert ray_report["executor"] == "ray" and ray_report["samples"] == report["samples"]
    names = sorted(p.name for p in (out / "shards").iterdir())
    assert names == sorted(p.name for p in (ray_out / "shards").iterdir())
    for name in names:
        assert (out / "shards" / name).read_bytes() == (ray_out / "shards" / name).read_bytes(), name
    assert (out / "index.json").read_bytes() == (ray_out / "index.json").read_bytes()
    assert ray_report["stages"]["faces"]["replicas"] >= 1 and "placement" in ray_report["startup"]


def test_sigkill_midway_then_resume_gives_same_samples(curated, videos, tmp_path):
    """Kill -9 the CLI in the middle of a run, start it again: same keys as the uninterrupted run, no dupes."""
    out_ref, _ = curated
    out = tmp_path / "out"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "ph"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        str(videos[0]),
        str(out),
        "--profile",
        "offline",
        "--no-progress",
        "--executor",
        "local",
        "--set",
        "run.batch_size=1",
        "--set",
        "shards.maxcount=1",
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 600
    # Kill once a shard is committed (its ledger part written) but the run is not over: mid-pipeline.
    while time.monotonic() < deadline and proc.poll() is None:
        if list((out / "work" / "ledger").glob("*.parquet")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log = tmp_path / "rerun.log"  # a file, not a pipe: a killed run's orphaned server would hold a pipe open
    with log.open("w") as fh:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=900)
    assert done.returncode in range(0, 64), log.read_text()[-3000:]
    ref = sorted(s["__key__"] for s in _read_samples(out_ref))
    got = [s["__key__"] for s in _read_samples(out)]
    assert sorted(got) == ref and len(got) == len(set(got))
    index = json.loads((out / "index.json").read_text())
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(e["url"] for e in index["shards"])
    report = json.loads((out / "report.json").read_text())
    assert report["videos_done_before"] >= 1, "the rerun redid work the killed run had committed"


def test_storage_credentials_come_from_a_prefect_secret_block(prefect_harness):
    from prefect.blocks.system import Secret

    from flows.curate import _storage_options

    Secret(value='{"key": "AKIAEXAMPLE", "secret": "not-in-the-config"}').save(
        "lumosx-test-storage", overwrite=True
    )
    assert _storage_options("lumosx-test-storage") == {"key": "AKIAEXAMPLE", "secret": "not-in-the-config"}
    assert _storage_options(None) is None
