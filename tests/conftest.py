"""Shared fixtures: a Prefect test harness for flow tests, offline model hubs, sample videos."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# No network here and none wanted in tests: fail fast instead of waiting on a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# Prefect keeps its database and settings under PREFECT_HOME: never touch the developer's own.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory):
    """One temporary Prefect API for the whole session (starting one takes ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def sample_videos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from flows.sample_data import make_sample_videos

    return make_sample_videos(tmp_path_factory.mktemp("sample_videos"))
