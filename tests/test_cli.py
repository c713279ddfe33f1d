"""The command line: mistakes answered in one line and well under two seconds with a code a script can tell apart
from "videos failed"; one run per output; a full disk stops the run without blaming a video, and a plain rerun
finishes the job once there is room."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flows.preflight import EX_CANTCREAT, EX_CONFIG, EX_IOERR, EX_NOINPUT, EX_TEMPFAIL, EX_USAGE

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict | None = None, timeout: float = 900) -> tuple[int, str, float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


def local_run(videos: Path, out: Path, *extra: str) -> list[str]:
    """The command line of an offline, in-process run (quick to start, same data as Ray)."""
    return [sys.executable, "-m", "flows.cli", "run", str(videos), str(out), "--profile", "offline",
            "--no-progress", "--executor", "local", *extra]  # fmt: skip


def run_env(tmp_path: Path) -> dict:
    return {**os.environ, "PREFECT_HOME": str(tmp_path / "ph"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


@pytest.fixture()
def videos(tmp_path: Path, sample_videos) -> Path:
    d = tmp_path / "videos"
    d.mkdir()
    for v in sample_videos:
        shutil.copy(v, d / v.name)
        shutil.copy(v.with_suffix(".txt"), d / v.with_suffix(".txt").name)
    return d


@pytest.mark.parametrize(
    "args, code, says",
    [
        (["run", "{in}", "{out}", "--profile", "nope"], EX_CONFIG, "no profile 'nope'"),
        (
            ["run", "{in}", "{out}", "--profile", "offline", "--set", "faces.min_sise_px=3"],
            EX_CONFIG,
            "did you mean faces.min_size_px",
        ),
        (
            ["run", "{in}", "{out}", "--profile", "offline", "--set", "run.batch_size=many"],
            EX_CONFIG,
            "run.batch_size",
        ),
        (
            ["run", "{in}", "{out}", "--profile", "offline", "--set", "no_equals_sign"],
            EX_USAGE,
            "key.path=value",
        ),
        (["run", "{missing}", "{out}", "--profile", "offline"], EX_NOINPUT, "does not exist"),
        (["run", "{in}", "{file}", "--profile", "offline"], EX_CANTCREAT, "is a file"),
        (["run", "{in}"], EX_USAGE, "the following arguments are required"),
        (["frobnicate"], EX_USAGE, "invalid choice"),
        (["run", "{in}", "{out}"], EX_CONFIG, "needs model weights this machine does not have"),
    ],
)
def test_bad_arguments_get_one_line_fast_and_nothing_is_written(tmp_path, videos, args, code, says):
    (tmp_path / "a_file").write_text("not a directory")
    fill = {
        "in": str(videos),
        "out": str(tmp_path / "out"),
        "missing": str(tmp_path / "nowhere"),
        "file": str(tmp_path / "a_file"),
    }
    rc, text, seconds = cli(*[a.format(**fill) for a in args], env={"HF_HUB_OFFLINE": "1"})
    assert rc == code, text
    assert says in text
    assert len(text.strip().splitlines()) == 1, text
    assert seconds < 2.0, f"{seconds:.2f} s"
    assert not (tmp_path / "out").exists(), "a refused run wrote something"


@pytest.mark.slow
def test_a_second_run_on_one_output_is_refused_at_once_and_a_killed_owner_frees_it(tmp_path, videos):
    out = tmp_path / "out"
    env, cmd = run_env(tmp_path), local_run(videos, out)
    procs = [
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    t0 = time.monotonic()
    refused = None
    while refused is None and time.monotonic() - t0 < 30:
        refused = next((p for p in procs if p.poll() is not None), None)
        time.sleep(0.02)
    assert refused is not None, "neither run was refused"
    assert time.monotonic() - t0 < 2.0 + 0.5  # both started together; the loser answered in under two seconds
    text = refused.stdout.read()
    assert refused.returncode == EX_TEMPFAIL, text
    owner = next(p for p in procs if p is not refused)
    assert f"pid {owner.pid}" in text and "in use by another curate run" in text
    time.sleep(1.0)
    os.killpg(owner.pid, signal.SIGKILL)  # the owner dies without releasing anything
    owner.wait()
    rc, text, _ = cli(*cmd[3:], env={"PREFECT_HOME": str(tmp_path / "ph")})
    assert rc == 0, text  # the kernel released the dead owner's lock: the rerun takes over
    assert json.loads((out / "report.json").read_text())["samples"] == 3


DISK_FULL = textwrap.dedent(
    """
    set -u
    mount -t tmpfs -o size={size}k tmpfs "{mnt}" || exit 97
    mkdir -p "{mnt}/tmp"
    export TMPDIR="{mnt}/tmp"
    cd "{repo}"
    {py} -m flows.cli run "{inp}" "{mnt}/out" --profile offline --executor local --no-progress \\
        --set shards.maxcount=1 --set run.batch_size=1 > "{logs}/first.log" 2>&1
    echo $? > "{logs}/first.rc"
    {py} -c "
    import json, pyarrow.parquet as pq, pathlib
    rows = []
    for p in sorted(pathlib.Path('{mnt}/out/work/ledger').glob('*.parquet')):
        rows += pq.read_table(p, columns=['uri', 'outcome', 'error_class']).to_pylist()
    print(json.dumps(rows))
    " > "{logs}/ledger.json"
    mount -o remount,size=200m "{mnt}"
    {py} -m flows.cli run "{inp}" "{mnt}/out" --profile offline --executor local --no-progress \\
        --set shards.maxcount=1 --set run.batch_size=1 > "{logs}/second.log" 2>&1
    echo $? > "{logs}/second.rc"
    cp "{mnt}/out/report.json" "{logs}/report.json"
    """
)


@pytest.mark.slow
def test_a_full_disk_blames_no_video_and_a_rerun_finishes(tmp_path, videos):
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to make a small filesystem")
    probe = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs tmpfs {tmp_path}"], capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip(f"the kernel forbids mounting in a user namespace: {probe.stderr.decode().strip()}")
    mnt, logs = tmp_path / "small", tmp_path / "logs"
    mnt.mkdir()
    logs.mkdir()
    # Room for about one sample (clip + face crops, and its ledger part), not for three.
    script = DISK_FULL.format(size=420, mnt=mnt, repo=REPO, py=sys.executable, inp=videos, logs=logs)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "ph"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    done = subprocess.run(
        ["unshare", "-Urm", "bash", "-c", script], env=env, timeout=1200, capture_output=True
    )
    assert done.returncode != 97, done.stderr.decode()
    first = (logs / "first.log").read_text()
    assert int((logs / "first.rc").read_text()) == EX_IOERR, first[-3000:]
    assert "No space left on device" in first and "run again" in first
    rows = json.loads((logs / "ledger.json").read_text())
    assert not [r for r in rows if r["outcome"] != "sample"], "a good video was recorded as failed"
    assert len(rows) < 3, "the run went on writing after the disk was full"
    assert int((logs / "second.rc").read_text()) == 0, (logs / "second.log").read_text()[-3000:]
    report = json.loads((logs / "report.json").read_text())
    assert report["samples"] == 3 and report["videos_failed"] == 0


@pytest.mark.slow
def test_sigterm_stops_a_run_promptly_and_the_rerun_resumes(tmp_path, videos):
    out = tmp_path / "out"
    env = run_env(tmp_path)
    cmd = local_run(videos, out, "--set", "run.batch_size=1", "--set", "shards.maxcount=1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while (
        time.monotonic() < deadline and proc.poll() is None and not list((out / "work" / "ledger").glob("*"))
    ):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    proc.wait(timeout=60)
    assert time.monotonic() - t0 < 20 and proc.returncode != 0
    rc, text, _ = cli(*cmd[3:], env={"PREFECT_HOME": str(tmp_path / "ph")})
    assert rc == 0, text  # the lock died with the stopped run; the rerun finishes the job
    report = json.loads((out / "report.json").read_text())
    assert report["samples"] == 3 and report["videos_done_before"] >= 1
