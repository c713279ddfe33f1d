"""The visual QA gallery and the console of the CLI, checked the way a user meets them.

One demo run (offline profile, local executor) feeds every test here: its stdout is the JSON summary and nothing
else, its stderr (a pipe) carries log lines without colour codes, a `--quiet` rerun prints only the JSON, and the
gallery it wrote opens in headless Chromium with every sample, every image loaded and no console error. A
synthetic subject-consistent output checks what the demo's identity-only samples do not have (cut-outs, masks,
objects, background plates, random-weight banners, paging, failures).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench_gallery import write_synthetic_output
from benchmarks.browser import Browser, find_chromium
from tasks.gallery import build_gallery, qa_notes

REPO = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
DOCS_SHOT = os.environ.get("LUMOSX_GALLERY_SCREENSHOT")  # set to refresh docs/gallery.png from this test

needs_chromium = pytest.mark.skipif(
    find_chromium() is None, reason="Debian's chromium is not installed (apt-get install -y chromium)"
)


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory, prefect_harness) -> tuple[Path, subprocess.CompletedProcess, dict]:
    from prefect.settings import PREFECT_API_URL

    tmp = tmp_path_factory.mktemp("demo")
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),  # the session's server: no temporary server per run
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONPATH": str(REPO),
        # a level in the environment (another test's in-process CLI call leaves one): --log-level must win over it
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
    }
    env.pop("NO_COLOR", None)
    env.pop("PREFECT_LOGGING_COLORS", None)
    out = tmp / "out"
    proc = _cli("demo", str(out), "--executor", "local", "--log-level", "INFO", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, env


def test_stdout_is_the_json_summary_and_stderr_has_no_colour_codes(demo):
    out, proc, _ = demo
    summary = json.loads(proc.stdout)  # the whole of stdout: one JSON document
    assert summary["samples"] == 3 and summary["videos_failed"] == 0
    assert summary["gallery"] == str(out / "gallery" / "index.html")
    assert "INFO" in proc.stderr  # --log-level INFO: Prefect's and our log lines are there...
    assert not ANSI.search(proc.stderr), ANSI.findall(proc.stderr)[:5]  # ...without escape codes in a pipe
    assert "Traceback" not in proc.stderr
    assert "gallery: file://" in proc.stderr


def test_samples_and_manifest_record_the_weights_that_made_them(demo):
    import pyarrow.parquet as pq

    from tasks.gallery import iter_shard_samples

    out, _, _ = demo
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(rows) == 3
    for row in rows:
        models = dict(row["models"])
        assert (
            models["faces"].startswith("dlib-hog@pkg:dlib") and "face-recognition-models==" in models["faces"]
        )
        assert models["persons"].startswith("opencv-hog-default-people@pkg:opencv-python")
    with open(next((out / "shards").glob("*.tar")), "rb") as f:
        metas = [json.loads(s.members["meta.json"]) for s in iter_shard_samples(f, "s")]
    assert all(
        m["revision"] and m["revision"].startswith("pkg:") for meta in metas for m in meta["models"].values()
    )
    html = (out / "gallery" / "index.html").read_text()
    assert "pkg:dlib-bin==" in html  # the gallery shows them


def test_the_run_report_artifact_links_the_gallery(demo):
    from prefect.artifacts import Artifact

    from flows.curate import _slug

    out, _, _ = demo
    report = Artifact.get(f"curate-report-{_slug(str(out))}")
    assert report is not None and str(out) in report.data
    assert (out / "gallery" / "index.html").resolve().as_uri() in report.data
    assert json.loads((out / "report.json").read_text())["gallery"] == str(out / "gallery" / "index.html")


def test_quiet_prints_the_json_summary_only(demo):
    out, _, env = demo
    proc = _cli(
        "demo", str(out), "--executor", "local", "--quiet", env=env
    )  # a rerun: resumes, nothing to do
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["samples"] == 3
    assert proc.stderr.strip() == ""


def test_gallery_subcommand_and_its_errors(demo, tmp_path):
    out, _, env = demo
    proc = _cli("gallery", str(out), "--quiet", "--dest", str(tmp_path / "g"), env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["samples"] == 3 and proc.stderr == ""
    # Expected errors: one line, a sysexits code, no traceback.
    proc = _cli("gallery", str(tmp_path / "nope"), env=env)
    assert proc.returncode == 66 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    not_ours = tmp_path / "mine"
    not_ours.mkdir()
    (not_ours / "notes.txt").write_text("keep me")
    proc = _cli("gallery", str(out), "--dest", str(not_ours), env=env)
    assert proc.returncode == 73 and "not a gallery" in proc.stderr and "Traceback" not in proc.stderr
    assert (not_ours / "notes.txt").read_text() == "keep me"


@needs_chromium
def test_demo_gallery_renders_in_headless_chromium(demo, tmp_path):
    out, _, _ = demo
    index = out / "gallery" / "index.html"
    html = index.read_text()
    assert "http://" not in html and "https://" not in html  # nothing external: opens offline
    with Browser(1280, 2400) as browser:
        page = browser.open(
            index.as_uri(),
            values={
                "samples": "document.querySelectorAll('section.sample[id]').length",
                "keyframes": "document.querySelectorAll('figure.kf img').length",
                "faces": "document.querySelectorAll('figure.face img').length",
                "person_boxes": "document.querySelectorAll('g.pbox rect').length",
                "images": "document.images.length",
                "loaded": "Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length",
                "status": "Object.assign({}, document.getElementById('img-status').dataset)",
                "random_banner": "!!document.getElementById('random-banner')",
            },
            screenshot=True,
        )
        failures = browser.open((out / "gallery" / "failures.html").as_uri())
    (tmp_path / "gallery.png").write_bytes(page.screenshot)
    if DOCS_SHOT:  # the README's picture: 256 colours keep it small in the repository
        import io

        from PIL import Image

        Image.open(io.BytesIO(page.screenshot)).quantize(256).save(DOCS_SHOT, optimize=True)
    v = page.values
    assert page.console_errors == [] and failures.console_errors == []
    assert v["samples"] == 3
    assert v["keyframes"] == 9  # three keyframes per sample
    assert v["faces"] == 1 + 6 + 2  # astronaut, group of six, two people
    assert v["person_boxes"] >= 9
    assert v["images"] == v["keyframes"] + v["faces"]
    assert v["loaded"] == v["images"]  # every image loaded, none broken
    assert v["status"]["failed"] == "0" and v["status"]["loaded"] == str(v["images"])
    assert not v["random_banner"]  # the offline demo uses real weights
    assert page.screenshot[:8] == b"\x89PNG\r\n\x1a\n" and len(page.screenshot) > 50_000
    # A geometry finding is on the page: in group_pan, HOG's box of person 0 on keyframe 1 misses its face.
    assert "person 0: face box (x 11-74, y 122-185) is not inside its person box on keyframe 1" in html


def test_synthetic_subject_samples_pages_banner_and_failures(tmp_path):
    out = write_synthetic_output(tmp_path / "out", samples=7, per_shard=4, failures=5)
    summary = build_gallery(str(out), page_size=3)
    assert (summary.samples, summary.pages, summary.failures) == (7, 3, 5)
    assert summary.random_weight_samples == 1 and summary.broken_samples == 0
    gallery = out / "gallery"
    pages = sorted(p.name for p in gallery.glob("*.html"))
    assert pages == ["failures.html", "index.html", "page-0002.html", "page-0003.html"]
    index = (gallery / "index.html").read_text()
    assert 'id="random-banner"' in index and index.count('class="sample random"') == 1
    assert index.count('<section class="sample') == 3  # a page of three samples
    # Every label of the caption is highlighted in its owner's colour; cut-outs, objects and the plate are shown.
    assert index.count("<mark ") == 3 * 6
    assert (
        'alt="red jacket"' in index and 'alt="yellow umbrella"' in index and 'alt="background plate"' in index
    )
    assert 'href="page-0002.html"' in index and 'href="failures.html"' in index
    last = (gallery / "page-0003.html").read_text()
    assert "rel=next" not in last and last.count('<section class="sample') == 1
    failures = (gallery / "failures.html").read_text()
    assert failures.count('class="failure"') == 5 and "broken_0003.mp4" in failures
    assert all(f'id="r-{r}"' in failures for r in ("no_face", "decode_error", "no_caption"))
    for src in re.findall(r'src="([^"]+)"', index + last):  # every referenced thumbnail exists
        assert (gallery / src).is_file(), src
    # A rebuild replaces the gallery; a directory that is not one is never deleted.
    assert build_gallery(str(out), page_size=50).pages == 1
    assert not (gallery / "page-0002.html").exists()


def test_gallery_of_shards_only_and_a_broken_sample(tmp_path):
    out = write_synthetic_output(tmp_path / "out", samples=2, per_shard=2, failures=0)
    shard = next((out / "shards").glob("*.tar"))
    summary = build_gallery(shards=[str(shard)], dest=tmp_path / "g")
    assert summary.samples == 2 and summary.failures == 0
    import tarfile

    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        info = tarfile.TarInfo("vbroken.meta.json")
        info.size = 3
        import io

        tar.addfile(info, io.BytesIO(b"{x]"))
    summary = build_gallery(shards=[str(bad)], dest=tmp_path / "g2")
    assert summary.broken_samples == 1
    assert "meta.json unreadable" in (tmp_path / "g2" / "index.html").read_text()


def test_qa_notes_flag_a_face_outside_its_person():
    from benchmarks.bench_gallery import synthetic_meta

    meta = synthetic_meta("vk", 1)
    assert qa_notes(meta) == []
    p = meta.persons[0]
    p.boxes[1] = p.boxes[1].model_copy(update={"x1": p.face_box.x0 - 20})
    (note,) = qa_notes(meta)
    assert note.startswith("person 0: face box") and "keyframe 1" in note


def test_failures_page_shows_a_frame_when_the_file_still_decodes(tmp_path):
    from datetime import UTC, datetime

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flows.sample_data import write_video
    from schemas.sample import FAILURES_SCHEMA

    out = write_synthetic_output(tmp_path / "out", samples=1, failures=0)
    good = write_video(tmp_path / "no_face.mp4", [np.full((64, 96, 3), 200, np.uint8)] * 4, 4)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)  # opening it would block forever: never touched
    link = tmp_path / "link.mp4"
    link.symlink_to(good)  # a link (maybe out of the input tree): never read
    rows = [
        {
            "video_id": n,
            "uri": str(p),
            "stage": s,
            "error_class": r,
            "message": "m",
            "time": datetime.now(UTC),
        }
        for n, p, s, r in (
            ("a", good, "faces", "no_face"),
            ("b", text, "ingest", "decode_error"),
            ("c", fifo, "ingest", "not_a_file"),
            ("d", link, "ingest", "outside_input"),
            ("e", link, "ingest", "decode_error"),
        )
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=FAILURES_SCHEMA), out / "failures.parquet")
    build_gallery(str(out))
    page = (out / "gallery" / "failures.html").read_text()
    assert page.count('class="failure"') == 5
    # A frame of the video; "(no frame)" for the text file; the FIFO and the links are never opened.
    assert page.count("<img ") == 1 and page.count("(no frame)") == 1
    (src,) = re.findall(r'src="([^"]+)"', page)
    assert (out / "gallery" / src).is_file()
