"""Ingest: discovery, content ids, probing, refusal reasons, sidecar captions, dedup and resume."""

from __future__ import annotations

import json
import re
import shutil
from fractions import Fraction
from pathlib import Path

import av
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.sample_data import make_bad_videos, write_rotated_video, write_video
from schemas.config import CurateConfig, IngestConfig
from schemas.records import VideoRecord
from tasks.base import StageError, VideoContext, WorkDir
from tasks.ingest import (
    IngestStage,
    SidecarTableError,
    content_id,
    discover,
    ingest_batch,
    load_sidecar_table,
    probe,
    sidecar_caption,
)
from tasks.pipeline import ingest_fingerprint

EXTS = IngestConfig().extensions


def frames(n: int, w: int = 64, h: int = 48, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(n))


def small_video(path: Path, n: int = 20, seed: int = 0, **kw) -> Path:
    return write_video(path, frames(n, seed=seed), 16, **kw)


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, Path]:
    return make_bad_videos(tmp_path_factory.mktemp("bad"))


# ---------------------------------------------------------------------------------------------- discover
def test_discover_dir_glob_url_and_single_file(tmp_path):
    small_video(tmp_path / "b.mp4")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    small_video(tmp_path / "sub" / "deeper" / "a.MOV", seed=1)
    small_video(tmp_path / "sub" / ".tmp-partial.mp4", seed=2)  # hidden: an unfinished write
    (tmp_path / ".cache").mkdir()
    small_video(tmp_path / ".cache" / "c.mp4", seed=3)  # inside a hidden directory
    (tmp_path / "b.txt").write_text("a caption, not a video")
    want = sorted([str(tmp_path / "b.mp4"), str(tmp_path / "sub" / "deeper" / "a.MOV")])

    assert discover(str(tmp_path), EXTS) == want
    assert discover(f"file://{tmp_path}", EXTS) == want
    assert discover(str(tmp_path / "**" / "*.MOV"), EXTS) == [str(tmp_path / "sub" / "deeper" / "a.MOV")]
    assert discover(str(tmp_path / "*.mp4"), EXTS) == [str(tmp_path / "b.mp4")]
    assert discover(str(tmp_path / "b.mp4"), EXTS) == [str(tmp_path / "b.mp4")]
    assert discover(str(tmp_path), [".mkv"]) == []
    with pytest.raises(FileNotFoundError):
        discover(str(tmp_path / "missing"), EXTS)


def test_remote_fsspec_url_end_to_end(tmp_path):
    """A non-local fsspec filesystem (memory://): discovered, hashed and probed through file objects."""
    local = small_video(tmp_path / "a.mp4")
    fs = fsspec.filesystem("memory")
    fs.pipe("/remote_vids/x/a.mp4", local.read_bytes())
    fs.pipe("/remote_vids/x/a.txt", b"A remote caption.")
    try:
        uris = discover("memory://remote_vids", EXTS)
        assert uris == [fs.unstrip_protocol("/remote_vids/x/a.mp4")]  # memory:///remote_vids/x/a.mp4
        assert content_id(uris[0]) == content_id(str(local))
        cfg = IngestConfig()
        rec = probe(uris[0], content_id(uris[0]), cfg)
        assert (rec.width, rec.height, rec.num_frames, rec.uri) == (64, 48, 20, uris[0])
        assert sidecar_caption(uris[0], cfg, None) == "A remote caption."
    finally:
        fs.rm("/remote_vids", recursive=True)


# ---------------------------------------------------------------------------------------------- content id
def test_content_id_stable_and_content_derived(tmp_path):
    a = small_video(tmp_path / "a.mp4")
    vid = content_id(str(a))
    assert re.fullmatch(r"v[0-9a-f]{20}", vid)
    shutil.copyfile(a, tmp_path / "copy.mp4")
    a.rename(tmp_path / "renamed.mkv")
    assert content_id(str(tmp_path / "renamed.mkv")) == vid == content_id(str(tmp_path / "copy.mp4"))
    data = bytearray((tmp_path / "copy.mp4").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "changed.mp4").write_bytes(bytes(data))
    assert content_id(str(tmp_path / "changed.mp4")) != vid

    # Large file: only 3 MiB are read, but a change inside a sampled window or in the size is seen.
    big = bytearray(np.random.default_rng(0).integers(0, 255, 9 << 20, dtype=np.uint8).tobytes())
    (tmp_path / "big.bin").write_bytes(bytes(big))
    big_id = content_id(str(tmp_path / "big.bin"))
    big[len(big) // 2] ^= 1
    (tmp_path / "big2.bin").write_bytes(bytes(big))
    (tmp_path / "big3.bin").write_bytes(bytes(big[:-1]))
    assert len({big_id, content_id(str(tmp_path / "big2.bin")), content_id(str(tmp_path / "big3.bin"))}) == 3


# ---------------------------------------------------------------------------------------------- probe
def test_probe_fields(tmp_path):
    path = write_video(tmp_path / "v.mp4", frames(30, 96, 54), Fraction(30000, 1001))
    rec = probe(str(path), "vid", IngestConfig())
    assert (rec.width, rec.height, rec.num_frames, rec.codec) == (96, 54, 30, "h264")
    assert rec.fps == pytest.approx(29.97, abs=1e-3)
    assert rec.duration_s == pytest.approx(30 * 1001 / 30000, abs=1e-3)
    assert "mp4" in rec.container.split(",") and rec.size_bytes == path.stat().st_size
    assert rec.has_audio is False and rec.video_id == "vid"

    mkv = write_video(tmp_path / "v.mkv", frames(24), 24, container_format="matroska", start_time_s=0.5)
    rec = probe(str(mkv), "vid", IngestConfig())
    # Matroska has no per-stream duration: found by demuxing the last GOP, start offset excluded.
    assert (
        rec.duration_s == pytest.approx(1.0, abs=2e-3) and rec.num_frames == 24
    )  # mkv: 1 ms ticks and rec.container.startswith("matroska")

    assert (rec.rotation, rec.mirrored) == (0, False)


@pytest.mark.parametrize(
    "rotation, mirrored", [(90, False), (180, False), (270, False), (90, True), (0, True)]
)
def test_probe_reports_display_size_and_orientation(tmp_path, rotation, mirrored):
    """Phone video: landscape frames plus a display matrix. The record gives the size a player shows."""
    upright = (np.zeros((64, 48, 3), np.uint8) for _ in range(20))  # portrait, 48 wide
    path = write_rotated_video(tmp_path / "phone.mp4", upright, rotation=rotation, mirrored=mirrored)
    with av.open(str(path)) as c:
        stored = c.streams.video[0].codec_context
        assert (stored.width, stored.height) == ((64, 48) if rotation in (90, 270) else (48, 64))
    rec = probe(str(path), "vid", IngestConfig())
    assert (rec.width, rec.height, rec.rotation, rec.mirrored) == (48, 64, rotation, mirrored)
    assert VideoRecord.model_validate_json(rec.model_dump_json()) == rec


def test_rotate_tag_of_old_remuxes(tmp_path):
    """Old FFmpeg wrote a clockwise ``rotate`` stream tag (no display matrix) when remuxing phone video to mkv."""
    path = tmp_path / "old.mkv"
    with av.open(str(path), "w", format="matroska") as out:
        stream = out.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.metadata["rotate"] = "270"
        for img in frames(20):
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    rec = probe(str(path), "vid", IngestConfig())
    assert (rec.width, rec.height, rec.rotation, rec.mirrored) == (48, 64, 270, False)


def test_probe_has_audio(tmp_path):
    path = tmp_path / "av.mp4"
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=16)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        a = out.add_stream("aac", rate=16000, layout="mono")
        for _i, img in enumerate(frames(20)):
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for k in range(20):
            af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            af.sample_rate, af.pts = 16000, k * 1024
            for p in a.encode(af):
                out.mux(p)
        for s in (v, a):
            for p in s.encode():
                out.mux(p)
    assert probe(str(path), "vid", IngestConfig()).has_audio is True


EXPECTED = {
    "empty": "empty_file",
    "truncated": "corrupt",
    "no_frames": "corrupt",
    "text": "not_a_video",
    "audio_only": "no_video_stream",
    "one_frame": "too_short",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_files_fail_with_their_reason(bad, name):
    with pytest.raises(StageError) as err:
        probe(str(bad[name]), "vid", IngestConfig())
    assert err.value.reason == EXPECTED[name], str(err.value)
    assert str(bad[name]) in str(err.value)


def test_limits(bad, tmp_path):
    rec = probe(str(bad["uhd_4k"]), "vid", IngestConfig())
    assert (rec.width, rec.height, rec.num_frames) == (3840, 2160, 20)
    with pytest.raises(StageError, match="max_pixels") as err:
        probe(str(bad["uhd_4k"]), "vid", IngestConfig(max_pixels=1920 * 1080))
    assert err.value.reason == "too_large"
    path = small_video(tmp_path / "v.mp4")  # 1.25 s
    with pytest.raises(StageError) as err:
        probe(str(path), "vid", IngestConfig(max_duration_s=1.0))
    assert err.value.reason == "too_long"
    with pytest.raises(StageError) as err:
        probe(str(path), "vid", IngestConfig(min_duration_s=2.0))
    assert err.value.reason == "too_short"
    with pytest.raises(StageError) as err:
        probe(str(path), "vid", IngestConfig(min_frames=21))
    assert err.value.reason == "too_short"


# ---------------------------------------------------------------------------------------------- sidecars
def test_sidecar_tables(tmp_path):
    csv = tmp_path / "panda.csv"
    csv.write_text(
        'videoID,url,timestamp,caption\nabc123,https://youtu.be/abc123,"[0, 5]",A man walks a dog.\n'
    )
    assert load_sidecar_table(str(csv)) == {
        "abc123": "A man walks a dog.",
        "https://youtu.be/abc123": "A man walks a dog.",
    }
    pq.write_table(
        pa.table({"uri": ["/data/x.mp4", "/data/y.mp4"], "caption": ["X.", None]}), tmp_path / "t.parquet"
    )
    assert load_sidecar_table(str(tmp_path / "t.parquet")) == {"/data/x.mp4": "X."}
    (tmp_path / "t.jsonl").write_text(
        json.dumps({"filename": "z.mp4", "text": " Z. "})
        + "\n"
        + json.dumps({"filename": "w.mp4", "text": "W."})
    )
    table = load_sidecar_table(str(tmp_path / "t.jsonl"))
    assert table == {"z.mp4": "Z.", "w.mp4": "W."}

    (tmp_path / "bad.csv").write_text("name,label\na,b\n")
    with pytest.raises(SidecarTableError, match="key column"):
        load_sidecar_table(str(tmp_path / "bad.csv"))
    with pytest.raises(SidecarTableError, match="format"):
        load_sidecar_table(str(tmp_path / "t.xlsx"))

    cfg = IngestConfig()
    (tmp_path / "v.txt").write_text("From the txt file.\n")
    # Matched by full uri, file name or stem; the table wins over the .txt file.
    assert sidecar_caption("/elsewhere/z.mp4", cfg, table) == "Z."
    assert sidecar_caption(str(tmp_path / "abc123.mp4"), cfg, {"abc123": "Panda."}) == "Panda."
    assert sidecar_caption(str(tmp_path / "v.mp4"), cfg, table) == "From the txt file."
    assert sidecar_caption(str(tmp_path / "v.mp4"), IngestConfig(sidecar_txt=False), table) is None


# ---------------------------------------------------------------------------------------------- ingest_batch
def test_ingest_batch_dedup_failures_resume_and_rename(tmp_path, bad, monkeypatch):
    vids = tmp_path / "vids"
    vids.mkdir()
    a = small_video(vids / "a.mp4")
    (vids / "a.txt").write_text("Random noise.")
    shutil.copyfile(a, vids / "a_copy.mp4")
    shutil.copyfile(bad["one_frame"], vids / "short.mp4")
    uris = discover(str(vids), EXTS) + [str(vids / "gone.mp4")]
    cfg = CurateConfig()
    work = WorkDir(tmp_path / "work")

    records, failures = ingest_batch(uris, cfg, work)
    assert [r.uri for r in records] == [str(a)] and records[0].sidecar_caption == "Random noise."
    by_class = {f.error_class: f for f in failures}
    assert set(by_class) == {"duplicate", "too_short", "unreadable"}
    assert (
        by_class["duplicate"].uri == str(vids / "a_copy.mp4")
        and by_class["duplicate"].video_id == records[0].video_id
    )
    assert re.fullmatch(r"u[0-9a-f]{20}", by_class["unreadable"].video_id)
    saved = work.load("ingest", records[0].video_id)
    assert saved["fingerprint"] == ingest_fingerprint(cfg) == IngestStage(cfg, work).fingerprint({})
    assert saved["record"] == records[0].model_dump(mode="json")
    assert work.load("ingest", by_class["too_short"].video_id)["status"] == "failed"
    assert {f.error_class for f in work.iter_failures()} == {
        "too_short",
        "unreadable",
    }  # duplicates: not saved

    # Resume: nothing is probed again; the copy is still a duplicate, earlier failures come back as they were.
    def no_probe(*args, **kwargs):
        raise AssertionError("probed again")

    monkeypatch.setattr("tasks.ingest.probe", no_probe)
    records2, failures2 = ingest_batch(uris, cfg, work)
    assert records2 == records
    assert sorted(f.error_class for f in failures2) == sorted(f.error_class for f in failures)

    # Rename: same id, new uri and new sidecar caption, still no probing.
    a.rename(vids / "moved.mp4")
    (vids / "moved.txt").write_text("Moved noise.")
    records3, _ = ingest_batch([str(vids / "moved.mp4")], cfg, work)
    assert records3[0].video_id == records[0].video_id
    assert (records3[0].uri, records3[0].sidecar_caption) == (str(vids / "moved.mp4"), "Moved noise.")
    assert work.load("ingest", records[0].video_id)["record"]["uri"] == str(vids / "moved.mp4")

    # A new ingest configuration is a new fingerprint: probed again.
    monkeypatch.undo()
    cfg2 = CurateConfig.model_validate({"ingest": {"min_frames": 25}})
    records4, failures4 = ingest_batch([str(vids / "moved.mp4")], cfg2, work)
    assert records4 == [] and failures4[0].error_class == "too_short"


def test_ingest_stage_reprobes(tmp_path):
    path = small_video(tmp_path / "a.mp4")
    cfg = CurateConfig()
    work = WorkDir(tmp_path / "work")
    (rec,), _ = ingest_batch([str(path)], cfg, work)
    stage = IngestStage(cfg, work)
    out = stage.process([VideoContext(video=rec, work=work, fingerprints={})])
    assert out[rec.video_id] == rec
    path.write_bytes(b"")
    out = stage.process([VideoContext(video=rec, work=work, fingerprints={})])
    assert isinstance(out[rec.video_id], StageError) and out[rec.video_id].reason == "empty_file"
