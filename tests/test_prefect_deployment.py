"""The deployment as it runs on a cluster: `prefect server start`, a process work pool, `prefect deploy`, a worker,
and `prefect deployment run curate/raw-videos --watch` — all real, on loopback, with a temporary PREFECT_HOME."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import webdataset as wds

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect(env: dict, *args: str, timeout: float = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "prefect"
    proc = subprocess.run(
        [str(exe), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError("prefect server did not become healthy")


def test_deployment_run_writes_shards(tmp_path: Path):
    """With the deployment's own defaults (built-in sample videos, offline profile); only the output moves."""
    out = tmp_path / "curated"
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PWD": str(REPO),
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    exe = str(Path(sys.executable).parent / "prefect")
    server = subprocess.Popen(
        [exe, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=(logs / "server.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    worker = None
    try:
        _wait_healthy(api, server)
        _prefect(env, "work-pool", "create", "lumosx-process", "--type", "process")
        _prefect(env, "--no-prompt", "deploy", "--all")
        worker = subprocess.Popen(
            [exe, "worker", "start", "--pool", "lumosx-process"],
            env=env,
            cwd=REPO,
            stdout=(logs / "worker.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        run = _prefect(
            env,
            "deployment",
            "run",
            "curate/raw-videos",
            "--param",
            f"output={out}",
            "--watch",
            "--watch-timeout",
            "900",
            timeout=960,
        )
        assert "Completed" in run.stdout, run.stdout + (logs / "worker.log").read_text()[-4000:]
    finally:
        for p in (worker, server):
            if p is not None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
    shards = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    assert shards, "the deployment run wrote no shard"
    samples = list(wds.WebDataset(shards, shardshuffle=False))
    assert len(samples) == 3  # the three built-in sample videos
    assert all("mp4" in s and "meta.json" in s for s in samples)
    shutil.rmtree(tmp_path / "prefect-home", ignore_errors=True)
