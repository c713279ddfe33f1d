"""Ingest: discovery (and its protections against junk in a crawled folder), content ids, probing, refusal
reasons, sidecar captions (tables and bounded `<stem>.txt` files), and the ingest stage over discovered files.

Duplicates across a run, renames and reuse of earlier records are the run engine's job (claims, ledger) and
are tested with it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
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
from schemas.records import FailureRecord, SourceFile, VideoRecord
from tasks.base import StageError, VideoContext
from tasks.discovery import InputError, Skip, discover
from tasks.ingest import (
    IngestStage,
    SidecarTableError,
    content_id,
    load_sidecar_table,
    probe,
    read_sidecar,
    sidecar_caption,
)
from tasks.pipeline import stage_fingerprints
from tasks.runner import run_stage
from tests.subject_fixtures import ingest_contexts

REPO = Path(__file__).resolve().parents[1]
EXTS = IngestConfig().extensions
# The test videos are 64x48 (fast to encode): under the default min_side_px (64), tested on its own below.
ICFG = IngestConfig(min_side_px=16)
CFG = CurateConfig.model_validate({"ingest": {"min_side_px": 16}})


def frames(n: int, w: int = 64, h: int = 48, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(n))


def small_video(path: Path, n: int = 20, seed: int = 0, **kw) -> Path:
    return write_video(path, frames(n, seed=seed), 16, **kw)


def size(path: Path | str) -> int:
    return os.path.getsize(path)


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, Path]:
    return make_bad_videos(tmp_path_factory.mktemp("bad"))


def found(source: Path | str, exts=EXTS) -> list:
    return list(discover(str(source), exts))


def files(items: list) -> list[str]:
    return [f.uri for f in items if isinstance(f, SourceFile)]


def failures(items: list) -> dict[str, str]:
    return {f.uri: f.error_class for f in items if isinstance(f, FailureRecord)}


def skips(items: list) -> list[tuple[str, str]]:
    return [(s.uri, s.reason) for s in items if isinstance(s, Skip)]


def run_python(code: str, *args: str, timeout: float = 60) -> object:
    """Run `code` in a fresh interpreter (repo importable) and return the JSON it prints last.

    A child process can be killed when it blocks (a FIFO opened for reading blocks forever), a thread cannot.
    """
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"blocked: no answer within {timeout} s")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


DISCOVER = """
import json, os, sys
from schemas.records import FailureRecord, SourceFile
from tasks.discovery import discover
if len(sys.argv) > 2:  # run as this unprivileged uid (the interpreter is loaded: root-only paths are fine)
    os.setgroups([])
    os.setgid(int(sys.argv[2]))
    os.setuid(int(sys.argv[2]))
out = []
for f in discover(sys.argv[1], [".mp4"]):
    if isinstance(f, SourceFile):
        out.append(["file", f.uri, None])
    elif isinstance(f, FailureRecord):
        out.append(["failure", f.uri, f.error_class])
    else:
        out.append(["skip", f.uri, f.reason])
print(json.dumps(out))
"""


# ---------------------------------------------------------------------------------------------- discover
def test_discover_dir_glob_url_and_single_file(tmp_path):
    small_video(tmp_path / "b.mp4")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    small_video(tmp_path / "sub" / "deeper" / "a.MOV", seed=1)  # extensions match case-insensitively
    small_video(tmp_path / "sub" / ".tmp-partial.mp4", seed=2)  # hidden: an unfinished write
    (tmp_path / ".cache").mkdir()
    small_video(tmp_path / ".cache" / "c.mp4", seed=3)  # inside a hidden directory
    (tmp_path / "b.txt").write_text("a caption, not a video")
    want = sorted([str(tmp_path / "b.mp4"), str(tmp_path / "sub" / "deeper" / "a.MOV")])

    items = found(tmp_path)
    assert files(items) == want
    assert failures(items) == {}
    assert skips(items) == [
        (str(tmp_path / ".cache"), "hidden"),
        (str(tmp_path / "sub" / ".tmp-partial.mp4"), "hidden"),
    ]
    b = next(f for f in items if isinstance(f, SourceFile) and f.uri == str(tmp_path / "b.mp4"))
    st = (tmp_path / "b.mp4").stat()
    assert (b.size, b.version) == (st.st_size, f"{st.st_size}:{st.st_mtime_ns}")
    assert b.sidecar == os.path.realpath(tmp_path / "b.txt")
    assert b.sidecar_problem is None and b.video_id is None

    assert files(found(f"file://{tmp_path}")) == want
    assert files(found(tmp_path / "**" / "*.MOV")) == [str(tmp_path / "sub" / "deeper" / "a.MOV")]
    assert files(found(tmp_path / "*.mp4")) == [str(tmp_path / "b.mp4")]
    single = found(tmp_path / "b.mp4")
    assert files(single) == [str(tmp_path / "b.mp4")]
    assert single[0].sidecar == os.path.realpath(tmp_path / "b.txt")
    assert files(found(tmp_path, [".mkv"])) == []
    assert files(found(tmp_path, ["MOV"])) == [str(tmp_path / "sub" / "deeper" / "a.MOV")]  # no dot, any case
    with pytest.raises(InputError):
        found(tmp_path / "missing")


def test_remote_fsspec_url_end_to_end(tmp_path):
    """A non-local fsspec filesystem (memory://): discovered, hashed and probed through file objects."""
    local = small_video(tmp_path / "a.mp4")
    fs = fsspec.filesystem("memory")
    fs.pipe("/remote_vids/x/a.mp4", local.read_bytes())
    fs.pipe("/remote_vids/x/a.txt", b"A remote caption.")
    fs.pipe("/remote_vids/x/.hidden.mp4", local.read_bytes())
    try:
        items = found("memory://remote_vids")
        uri = fs.unstrip_protocol("/remote_vids/x/a.mp4")  # memory:///remote_vids/x/a.mp4
        assert files(items) == [uri]
        assert skips(items) == [(fs.unstrip_protocol("/remote_vids/x/.hidden.mp4"), "hidden")]
        (src,) = [f for f in items if isinstance(f, SourceFile)]
        assert src.size == size(local) and src.sidecar == fs.unstrip_protocol("/remote_vids/x/a.txt")
        assert content_id(uri, src.size) == content_id(str(local), size(local))
        rec = probe(uri, content_id(uri, src.size), ICFG)
        assert (rec.width, rec.height, rec.num_frames, rec.uri) == (64, 48, 20, uri)
        assert sidecar_caption(src, ICFG, None) == "A remote caption."

        ctx = VideoContext(source=src)  # the stage, through fsspec too
        run_stage(IngestStage(CFG), [ctx])
        assert ctx.failure is None, ctx.failure
        assert (ctx.video.uri, ctx.video.video_id, ctx.video.sidecar_caption) == (
            uri,
            content_id(str(local), size(local)),
            "A remote caption.",
        )
    finally:
        fs.rm("/remote_vids", recursive=True)


def test_symlinks_keep_their_own_path(tmp_path):
    """A symlink to a video inside the input is discovered under the link's path, not resolved."""
    small_video(tmp_path / "real.mp4")
    (tmp_path / "alias.mp4").symlink_to("real.mp4")
    (tmp_path / "linked_dir").symlink_to(tmp_path / "sub", target_is_directory=True)
    (tmp_path / "sub").mkdir()
    small_video(tmp_path / "sub" / "x.mp4", seed=1)
    items = found(tmp_path)
    # sub/ is reached through linked_dir/ first (sorted): the second way into it is not walked again.
    assert files(items) == [
        str(tmp_path / "alias.mp4"),
        str(tmp_path / "linked_dir" / "x.mp4"),
        str(tmp_path / "real.mp4"),
    ]
    assert skips(items) == [(str(tmp_path / "sub"), "symlink_loop")]


def test_symlink_loops(tmp_path):
    (tmp_path / "a.mp4").symlink_to("b.mp4")
    (tmp_path / "b.mp4").symlink_to("a.mp4")
    small_video(tmp_path / "z.mp4")  # after the loop: discovery goes on
    (tmp_path / "dir").mkdir()
    small_video(tmp_path / "dir" / "inside.mp4", seed=1)
    (tmp_path / "dir" / "loop").symlink_to("..", target_is_directory=True)
    items = found(tmp_path)
    assert failures(items) == {
        str(tmp_path / "a.mp4"): "symlink_loop",
        str(tmp_path / "b.mp4"): "symlink_loop",
    }
    loop_row = next(f for f in items if isinstance(f, FailureRecord) and f.uri == str(tmp_path / "a.mp4"))
    assert loop_row.stage == "discover" and str(tmp_path / "a.mp4") in loop_row.message
    assert loop_row.video_id == SourceFile(uri=loop_row.uri, size=0, version="").uri_key
    # The folder loop is walked once: every video found once, the loop noted.
    assert files(items) == [str(tmp_path / "dir" / "inside.mp4"), str(tmp_path / "z.mp4")]
    assert skips(items) == [(str(tmp_path / "dir" / "loop"), "symlink_loop")]


def test_dangling_symlink_names_the_link(tmp_path):
    (tmp_path / "gone.mp4").symlink_to(tmp_path / "nowhere" / "missing.mp4")
    small_video(tmp_path / "ok.mp4")
    items = found(tmp_path)
    assert failures(items) == {str(tmp_path / "gone.mp4"): "broken_symlink"}
    assert files(items) == [str(tmp_path / "ok.mp4")]


def test_symlink_out_of_the_input_is_refused(tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "input").mkdir()
    small_video(tmp_path / "outside" / "secret.mp4")
    (tmp_path / "input" / "link.mp4").symlink_to(tmp_path / "outside" / "secret.mp4")
    (tmp_path / "input" / "dirlink").symlink_to(tmp_path / "outside", target_is_directory=True)
    small_video(tmp_path / "input" / "ok.mp4", seed=1)
    items = found(tmp_path / "input")
    assert failures(items) == {
        str(tmp_path / "input" / "link.mp4"): "outside_input",
        str(tmp_path / "input" / "dirlink" / "secret.mp4"): "outside_input",
    }
    assert files(items) == [str(tmp_path / "input" / "ok.mp4")]


def test_fifo_named_like_a_video_never_blocks(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this OS")
    fifo = tmp_path / "x.mp4"
    os.mkfifo(fifo)
    small_video(tmp_path / "y.mp4")
    # In a child process: if anything opened the FIFO for reading without O_NONBLOCK, it would hang there.
    assert run_python(DISCOVER, str(tmp_path)) == [
        ["failure", str(fifo), "not_a_file"],
        ["file", str(tmp_path / "y.mp4"), None],
    ]
    code = """
import json, sys
from schemas.config import CurateConfig
from schemas.records import SourceFile
from tasks.base import StageError, VideoContext
from tasks.ingest import IngestStage, content_id
from tasks.runner import run_stage
try:
    content_id(sys.argv[1], 1000)
    reason = None
except StageError as e:
    reason = e.reason
# A FIFO swapped in after discovery: the ingest stage refuses it the same way.
ctx = VideoContext(source=SourceFile(uri=sys.argv[1], size=1000, version="1000:0"))
run_stage(IngestStage(CurateConfig()), [ctx])
print(json.dumps([reason, ctx.failure.error_class, ctx.failure.stage]))
"""
    assert run_python(code, str(fifo)) == ["not_a_file", "not_a_file", "ingest"]


def test_hidden_files_are_skipped(tmp_path):
    for name in ("..name.mp4", "._mac.mp4", ".x.MP4"):
        (tmp_path / name).write_bytes(b"\0" * 16)
    (tmp_path / ".hidden_dir").mkdir()
    (tmp_path / ".notes").write_text("not a video: not even noted")
    small_video(tmp_path / "v.mp4")
    items = found(tmp_path)
    assert skips(items) == [
        (str(tmp_path / "..name.mp4"), "hidden"),
        (str(tmp_path / "._mac.mp4"), "hidden"),
        (str(tmp_path / ".hidden_dir"), "hidden"),
        (str(tmp_path / ".x.MP4"), "hidden"),
    ]
    assert files(items) == [str(tmp_path / "v.mp4")] and failures(items) == {}


@pytest.fixture
def shared_dir():
    """A temporary folder another user can enter (pytest's tmp_path is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="lumosx-ingest-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for p in [path, *path.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
        shutil.rmtree(path)


def test_unreadable_folder_is_skipped(shared_dir):
    (shared_dir / "locked").mkdir()
    small_video(shared_dir / "locked" / "v.mp4")
    small_video(shared_dir / "ok.mp4", seed=1)
    for p in (shared_dir / "ok.mp4", shared_dir / "locked" / "v.mp4"):
        p.chmod(0o644)
    (shared_dir / "locked").chmod(0)
    want = [
        ["skip", str(shared_dir / "locked"), "unreadable_dir"],
        ["file", str(shared_dir / "ok.mp4"), None],
    ]
    if not os.access(shared_dir / "locked", os.R_OK):
        assert run_python(DISCOVER, str(shared_dir)) == want
        return
    # chmod does not restrict this user (root): discover as the unprivileged user nobody instead.
    if os.geteuid() != 0:
        pytest.skip("chmod 000 does not stop this user from listing a folder")
    assert run_python(DISCOVER, str(shared_dir), "65534") == want


def test_sidecar_symlink_out_of_the_input_leaks_nothing(tmp_path):
    passwd = Path("/etc/passwd")
    if not passwd.is_file():
        pytest.skip("no /etc/passwd here")
    small_video(tmp_path / "v.mp4")
    (tmp_path / "v.txt").symlink_to(passwd)
    (src,) = found(tmp_path)
    assert isinstance(src, SourceFile) and src.sidecar is None and src.sidecar_problem
    (ctx,) = ingest_contexts([tmp_path], CFG)
    assert ctx.failure is not None
    assert (ctx.failure.stage, ctx.failure.error_class) == ("ingest", "bad_sidecar")
    assert ctx.video is None and "ingest" not in ctx.records
    dumped = "".join(
        [
            ctx.failure.model_dump_json(),
            ctx.source.model_dump_json(),
            json.dumps([str(ctx.output), list(ctx.media), list(ctx.records)]),
        ]
    )
    for line in passwd.read_text().splitlines():
        if line.strip():
            assert line not in dumped
    assert "root:" not in dumped

    # A symlink swapped in after discovery located the sidecar: read_sidecar does not follow it either.
    st = (tmp_path / "v.mp4").stat()
    swapped = SourceFile(
        uri=str(tmp_path / "v.mp4"),
        size=st.st_size,
        version="x",
        sidecar=str(tmp_path / "v.txt"),
        sidecar_version="y",
    )
    with pytest.raises(StageError) as err:
        read_sidecar(swapped, ICFG)
    assert err.value.reason == "bad_sidecar" and "root:" not in str(err.value)


def test_broken_and_non_file_sidecars(tmp_path):
    small_video(tmp_path / "a.mp4")
    (tmp_path / "a.txt").symlink_to(tmp_path / "missing.txt")
    small_video(tmp_path / "b.mp4", seed=1)
    (tmp_path / "b.txt").mkdir()
    items = found(tmp_path)
    assert all(isinstance(f, SourceFile) and f.sidecar is None and f.sidecar_problem for f in items), items
    ctxs = ingest_contexts([tmp_path], CFG)
    assert [c.failure.error_class for c in ctxs] == ["bad_sidecar", "bad_sidecar"]


def test_huge_sidecar_is_refused_without_reading_it(tmp_path, monkeypatch):
    small_video(tmp_path / "v.mp4")
    (tmp_path / "v.txt").write_bytes(b"a" * (20 << 20))
    (src,) = found(tmp_path)
    reads: list[tuple[int, int]] = []
    real_read = os.read

    def spy(fd, n):
        data = real_read(fd, n)
        reads.append((n, len(data)))
        return data

    monkeypatch.setattr(os, "read", spy)
    with pytest.raises(StageError, match="max_sidecar_bytes") as err:
        read_sidecar(src, ICFG)
    monkeypatch.undo()
    assert err.value.reason == "bad_sidecar"
    limit = ICFG.max_sidecar_bytes
    assert reads and sum(n for n, _ in reads) <= limit + 1 and sum(got for _, got in reads) <= limit + 1

    (ctx,) = ingest_contexts([tmp_path], CFG)
    assert ctx.failure is not None and ctx.failure.error_class == "bad_sidecar"
    # Exactly at the limit is fine.
    (tmp_path / "v.txt").write_bytes(b"a" * limit)
    (ctx,) = ingest_contexts([tmp_path], CFG)
    assert ctx.failure is None and ctx.video.sidecar_caption == "a" * limit


@pytest.mark.parametrize(
    "data, want",
    [
        (np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes() + b"\0\0", "bad_sidecar"),
        (b"A caption\x00with\x01control bytes", "bad_sidecar"),  # valid UTF-8, but binary
        (b"\xff\xfeA\x00 \x00c\x00", "bad_sidecar"),  # UTF-16: not UTF-8
        ("\ufeffA caption with a BOM.\r\n".encode(), "A caption with a BOM."),
        ("Ünïcode, tabs\tand\nnew lines.\n".encode(), "Ünïcode, tabs\tand\nnew lines."),
        (b" \n\t", None),  # blank: no caption
    ],
    ids=["random-bytes", "nul-in-utf8", "utf16", "utf8-bom", "unicode", "blank"],
)
def test_sidecar_text_rules(tmp_path, data, want):
    small_video(tmp_path / "v.mp4")
    (tmp_path / "v.txt").write_bytes(data)
    (ctx,) = ingest_contexts([tmp_path], CFG)
    if want == "bad_sidecar":
        assert ctx.failure is not None and ctx.failure.error_class == "bad_sidecar"
    else:
        assert ctx.failure is None, ctx.failure
        assert ctx.video.sidecar_caption == want


def test_tiny_video_is_too_small(tmp_path):
    write_video(tmp_path / "tiny.mp4", frames(20, 48, 32), 16)
    write_video(tmp_path / "ok.mp4", frames(20, 64, 64), 16)  # exactly min_side_px: accepted
    tiny, ok = ingest_contexts([tmp_path / "tiny.mp4", tmp_path / "ok.mp4"], CurateConfig())
    assert tiny.failure is not None
    assert (tiny.failure.stage, tiny.failure.error_class) == ("ingest", "too_small")
    assert "48x32" in tiny.failure.message and "min_side_px=64" in tiny.failure.message
    assert tiny.failure.video_id == content_id(str(tmp_path / "tiny.mp4"), size(tmp_path / "tiny.mp4"))
    assert ok.failure is None and (ok.video.width, ok.video.height) == (64, 64)
    with pytest.raises(StageError) as err:
        probe(str(tmp_path / "tiny.mp4"), "vid", IngestConfig())
    assert err.value.reason == "too_small"
    assert probe(str(tmp_path / "tiny.mp4"), "vid", IngestConfig(min_side_px=32)).height == 32


# ---------------------------------------------------------------------------------------------- content id
def test_content_id_stable_and_content_derived(tmp_path):
    a = small_video(tmp_path / "a.mp4")
    vid = content_id(str(a), size(a))
    assert re.fullmatch(r"v[0-9a-f]{20}", vid)
    shutil.copyfile(a, tmp_path / "copy.mp4")
    a.rename(tmp_path / "renamed.mkv")
    renamed, copy = tmp_path / "renamed.mkv", tmp_path / "copy.mp4"
    assert content_id(str(renamed), size(renamed)) == vid == content_id(str(copy), size(copy))
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "changed.mp4").write_bytes(bytes(data))
    assert content_id(str(tmp_path / "changed.mp4"), size(tmp_path / "changed.mp4")) != vid

    # Large file: only 3 MiB are read, but a change inside a sampled window or in the size is seen.
    big = bytearray(np.random.default_rng(0).integers(0, 255, 9 << 20, dtype=np.uint8).tobytes())
    (tmp_path / "big.bin").write_bytes(bytes(big))
    big_id = content_id(str(tmp_path / "big.bin"), len(big))
    big[len(big) // 2] ^= 1
    (tmp_path / "big2.bin").write_bytes(bytes(big))
    (tmp_path / "big3.bin").write_bytes(bytes(big[:-1]))
    ids = {
        big_id,
        content_id(str(tmp_path / "big2.bin"), len(big)),
        content_id(str(tmp_path / "big3.bin"), len(big) - 1),
    }
    assert len(ids) == 3

    with pytest.raises(FileNotFoundError):
        content_id(str(tmp_path / "missing.mp4"), 10)
    (tmp_path / "adir.mp4").mkdir()
    with pytest.raises(StageError) as err:
        content_id(str(tmp_path / "adir.mp4"), 10)
    assert err.value.reason == "not_a_file"


# ---------------------------------------------------------------------------------------------- probe
def test_probe_fields(tmp_path):
    path = write_video(tmp_path / "v.mp4", frames(30, 96, 54), Fraction(30000, 1001))
    rec = probe(str(path), "vid", ICFG)
    assert (rec.width, rec.height, rec.num_frames, rec.codec) == (96, 54, 30, "h264")
    assert rec.fps == pytest.approx(29.97, abs=1e-3)
    assert rec.duration_s == pytest.approx(30 * 1001 / 30000, abs=1e-3)
    assert "mp4" in rec.container.split(",") and rec.size_bytes == path.stat().st_size
    assert rec.has_audio is False and rec.video_id == "vid"

    mkv = write_video(tmp_path / "v.mkv", frames(24), 24, container_format="matroska", start_time_s=0.5)
    rec = probe(str(mkv), "vid", ICFG)
    # Matroska has no per-stream duration: found by demuxing the last GOP, start offset excluded (1 ms ticks).
    assert rec.duration_s == pytest.approx(1.0, abs=2e-3) and rec.num_frames == 24
    assert rec.container.startswith("matroska")

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
    rec = probe(str(path), "vid", ICFG)
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
    rec = probe(str(path), "vid", ICFG)
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
    assert probe(str(path), "vid", ICFG).has_audio is True


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


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_files_fail_the_ingest_stage(bad, name):
    """The same reasons when the stage runs over discovered files (an empty file fails before any read)."""
    (ctx,) = ingest_contexts([bad[name]], CurateConfig())
    assert ctx.failure is not None
    assert (ctx.failure.stage, ctx.failure.error_class) == ("ingest", EXPECTED[name])
    assert ctx.failure.uri == str(bad[name]) and ctx.video is None


def test_limits(bad, tmp_path):
    rec = probe(str(bad["uhd_4k"]), "vid", IngestConfig())
    assert (rec.width, rec.height, rec.num_frames) == (3840, 2160, 20)
    with pytest.raises(StageError, match="max_pixels") as err:
        probe(str(bad["uhd_4k"]), "vid", IngestConfig(max_pixels=1920 * 1080))
    assert err.value.reason == "too_large"
    path = small_video(tmp_path / "v.mp4")  # 1.25 s
    with pytest.raises(StageError) as err:
        probe(str(path), "vid", IngestConfig(min_side_px=16, max_duration_s=1.0))
    assert err.value.reason == "too_long"
    with pytest.raises(StageError) as err:
        probe(str(path), "vid", IngestConfig(min_side_px=16, min_duration_s=2.0))
    assert err.value.reason == "too_short"
    with pytest.raises(StageError) as err:
        probe(str(path), "vid", IngestConfig(min_side_px=16, min_frames=21))
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
    vids = tmp_path / "vids"
    vids.mkdir()
    for stem in ("v", "z"):
        (vids / f"{stem}.mp4").write_bytes(b"not probed here")
    (vids / "v.txt").write_text("From the txt file.\n")
    (vids / "z.txt").write_text("From z's txt file.\n")
    sources = {Path(f.uri).stem: f for f in found(vids)}
    assert set(sources) == {"v", "z"}

    def elsewhere(uri: str) -> SourceFile:
        return SourceFile(uri=uri, size=1, version="1:0")

    # Matched by full uri, file name or stem; the table wins over the .txt file.
    assert sidecar_caption(elsewhere("/elsewhere/z.mp4"), cfg, table) == "Z."
    assert sidecar_caption(elsewhere("/data/x.mp4"), cfg, {"/data/x.mp4": "X."}) == "X."
    assert sidecar_caption(elsewhere(str(tmp_path / "abc123.mp4")), cfg, {"abc123": "Panda."}) == "Panda."
    assert sidecar_caption(sources["z"], cfg, table) == "Z."
    assert sidecar_caption(sources["v"], cfg, table) == "From the txt file."
    assert sidecar_caption(sources["v"], cfg, None) == "From the txt file."
    assert sidecar_caption(sources["v"], IngestConfig(sidecar_txt=False), table) is None
    assert sidecar_caption(elsewhere("/elsewhere/q.mp4"), cfg, table) is None

    # The stage reads the table once and uses it in the same way.
    (tmp_path / "run").mkdir()
    small_video(tmp_path / "run" / "z.mp4")
    (tmp_path / "run" / "z.txt").write_text("From z's txt file.")
    table_cfg = {"min_side_px": 16, "sidecar_table": str(tmp_path / "t.jsonl")}
    cfg2 = CurateConfig.model_validate({"ingest": table_cfg})
    (ctx,) = ingest_contexts([tmp_path / "run"], cfg2)
    assert ctx.failure is None and ctx.video.sidecar_caption == "Z."


# ---------------------------------------------------------------------------------------------- the stage
def test_ingest_stage_records_failures_and_fingerprint(tmp_path, bad):
    vids = tmp_path / "vids"
    vids.mkdir()
    a = small_video(vids / "a.mp4")
    (vids / "a.txt").write_text("Random noise.")
    shutil.copyfile(bad["one_frame"], vids / "short.mp4")
    sources = [f for f in found(vids) if isinstance(f, SourceFile)]
    gone = SourceFile(uri=str(vids / "gone.mp4"), size=123, version="123:0")  # deleted after discovery
    items = [VideoContext(source=s) for s in [*sources, gone]]
    stats = run_stage(IngestStage(CFG), items)
    assert (stats.processed, stats.ok, dict(stats.failed)) == (3, 1, {"too_short": 1, "unreadable": 1})

    by_name = {Path(c.uri).name: c for c in items}
    ok = by_name["a.mp4"]
    assert ok.failure is None and ok.records["ingest"] is ok.video
    assert (ok.video.uri, ok.video.sidecar_caption) == (str(a), "Random noise.")
    assert ok.video.video_id == content_id(str(a), size(a)) == ok.source.video_id == ok.video_id
    assert (ok.video.width, ok.video.height, ok.video.num_frames) == (64, 48, 20)
    assert ok.video.size_bytes == size(a)

    short = by_name["short.mp4"].failure
    assert (short.stage, short.error_class, short.uri) == ("ingest", "too_short", str(vids / "short.mp4"))
    assert short.video_id == content_id(str(vids / "short.mp4"), size(vids / "short.mp4"))
    unreadable = by_name["gone.mp4"].failure
    assert (unreadable.error_class, unreadable.uri) == ("unreadable", gone.uri)
    assert re.fullmatch(r"u[0-9a-f]{20}", unreadable.video_id) and unreadable.video_id == gone.uri_key

    # A finished video is passed over by a second run (its record stands); failed ones stay failed.
    again = run_stage(IngestStage(CFG), items)
    assert (again.processed, again.reused) == (0, 1)

    assert stage_fingerprints(CFG)["ingest"] == IngestStage(CFG).fingerprint({})
    # A new ingest configuration is a new fingerprint, and the new limits apply.
    cfg2 = CurateConfig.model_validate({"ingest": {"min_side_px": 16, "min_frames": 25}})
    assert IngestStage(cfg2).fingerprint({}) != IngestStage(CFG).fingerprint({})
    (ctx,) = ingest_contexts([a], cfg2)
    assert ctx.video is None and ctx.failure.error_class == "too_short"


def test_copies_in_one_batch_keep_their_own_record(tmp_path):
    """Results are keyed by content id: the first of two copies in a batch keeps its own uri and caption."""
    a = small_video(tmp_path / "a.mp4")
    shutil.copyfile(a, tmp_path / "b.mp4")
    (tmp_path / "a.txt").write_text("Caption of a.")
    (tmp_path / "b.txt").write_text("Caption of b.")
    first, copy = ingest_contexts([tmp_path], CFG)
    assert first.video_id == copy.video_id == content_id(str(a), size(a))
    assert (first.video.uri, first.video.sidecar_caption) == (str(a), "Caption of a.")


def test_ingest_stage_reprobes(tmp_path):
    """A file whose id is already known (the ledger's) is still probed: an emptied file fails."""
    path = small_video(tmp_path / "a.mp4")
    (ctx,) = ingest_contexts([path], CFG)
    rec = ctx.video
    stage = IngestStage(CFG)
    known = ctx.source  # carries the content id now
    assert known.video_id == rec.video_id
    out = stage.process([VideoContext(source=known)])
    assert out[known.uri_key] == rec  # ingest results are per file (stage.result_key), not per content id
    path.write_bytes(b"")
    out = stage.process([VideoContext(source=known)])
    assert isinstance(out[known.uri_key], StageError) and out[known.uri_key].reason == "empty_file"
    # Discovered again, the file is 0 bytes: refused before a byte is read.
    (ctx,) = ingest_contexts([path], CFG)
    assert ctx.failure.error_class == "empty_file"
