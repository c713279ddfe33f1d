"""Stage runner: resume by fingerprint, failures become rows, one bad video never sinks its batch."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from schemas.config import CurateConfig, load_config
from schemas.records import CaptionRecord, VideoRecord
from tasks.base import Stage, StageError, TransientError, VideoContext, WorkDir
from tasks.runner import run_stage_batch


class EchoStage(Stage[CaptionRecord]):
    name = "echo"
    record_type = CaptionRecord
    calls: list[list[str]] = []

    def process(self, videos: list[VideoContext]):
        EchoStage.calls.append([v.video_id for v in videos])
        out = {}
        for v in videos:
            if v.video_id == "bad":
                out[v.video_id] = StageError("too_dull", "nothing happens in this video")
            elif v.video_id == "crash":
                raise ValueError("decoder exploded")
            else:
                out[v.video_id] = CaptionRecord(
                    video_id=v.video_id, caption=f"about {v.video_id}", source="model"
                )
        return out


class FlakyStage(EchoStage):
    name = "flaky"

    def process(self, videos):
        raise TransientError("storage hiccup")


def _ingest(work: WorkDir, ids: list[str]) -> None:
    for vid in ids:
        work.save_ok(
            "ingest",
            vid,
            "fp-ingest",
            VideoRecord(
                video_id=vid,
                uri=f"/videos/{vid}.mp4",
                size_bytes=1,
                container="mp4",
                codec="h264",
                width=64,
                height=64,
                fps=16.0,
                duration_s=2.0,
                num_frames=32,
            ),
        )


@pytest.fixture
def work(tmp_path: Path) -> WorkDir:
    w = WorkDir(tmp_path / "work")
    _ingest(w, ["a", "b", "bad", "crash"])
    EchoStage.calls = []
    return w


def test_records_failures_and_isolation(work: WorkDir):
    stage = EchoStage(CurateConfig(), work)
    out = run_stage_batch(stage, ["a", "b", "bad", "crash"], {"echo": "fp1"})
    assert sorted(out.ok) == ["a", "b"]
    assert out.failed == {"too_dull": 1, "ValueError": 1}
    # The crash made the runner retry the batch one video at a time.
    assert EchoStage.calls[0] == ["a", "b", "bad", "crash"] and ["crash"] in EchoStage.calls
    failures = {f.video_id: f for f in work.iter_failures()}
    assert failures["bad"].error_class == "too_dull" and failures["crash"].error_class == "ValueError"
    assert "decoder exploded" in failures["crash"].message


def test_resume_skips_finished_and_failed(work: WorkDir):
    stage = EchoStage(CurateConfig(), work)
    run_stage_batch(stage, ["a", "b", "bad"], {"echo": "fp1"})
    EchoStage.calls = []
    out = run_stage_batch(stage, ["a", "b", "bad"], {"echo": "fp1"})
    assert EchoStage.calls == [] and out.skipped == 3 and sorted(out.ok) == ["a", "b"]
    assert out.failed == {"too_dull": 1}
    # A new fingerprint (config changed) redoes the work.
    out = run_stage_batch(stage, ["a", "b", "bad"], {"echo": "fp2"})
    assert EchoStage.calls == [["a", "b", "bad"]] and out.skipped == 0
    # retry_failed reruns only the failed one.
    EchoStage.calls = []
    run_stage_batch(stage, ["a", "b", "bad"], {"echo": "fp2"}, retry_failed=True)
    assert EchoStage.calls == [["bad"]]


def test_transient_errors_propagate_for_prefect_retry(work: WorkDir):
    with pytest.raises(TransientError):
        run_stage_batch(FlakyStage(CurateConfig(), work), ["a"], {"flaky": "fp"})
    assert work.load("flaky", "a") is None, "a transient error must not be recorded as a failure"


def test_unsafe_ids_are_refused(work: WorkDir):
    with pytest.raises(ValueError):
        work.media("../../etc")
    with pytest.raises(ValueError):
        work.abs("../outside.txt")


@pytest.mark.parametrize("profile", ["paper", "offline", "test"])
def test_profiles_load(profile: str):
    cfg = load_config(profile)
    assert cfg.profile == profile
    if profile == "test":
        assert "persons" in cfg.random_weight_stages()
    if profile == "paper":
        assert cfg.random_weight_stages() == []


def test_overrides_and_unknown_keys():
    cfg = load_config("offline", {"faces": {"min_size_px": 48}})
    assert cfg.faces.min_size_px == 48
    with pytest.raises(ValidationError, match="min_size"):
        load_config("offline", {"faces": {"min_size": 48}})


class ConcurrencyProbe(EchoStage):
    """Records whether two batches were ever inside process() with the same model at once."""

    name = "probe"
    active = 0
    overlap = False

    def model_specs(self):
        from models.base import ModelSpec

        return [ModelSpec(backend="dlib")]

    def process(self, videos):
        import time as _time

        ConcurrencyProbe.active += 1
        ConcurrencyProbe.overlap |= ConcurrencyProbe.active > 1
        _time.sleep(0.05)
        ConcurrencyProbe.active -= 1
        return super().process(videos)


def test_batches_never_share_a_model_instance_concurrently(work: WorkDir):
    from concurrent.futures import ThreadPoolExecutor

    stage = ConcurrencyProbe(CurateConfig(), work)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda v: run_stage_batch(stage, [v], {"probe": "fp"}), ["a", "b", "bad", "a"]))
    assert not ConcurrencyProbe.overlap, "two threads ran the same model at once"
    assert sum(len(o.ok) for o in outs) == 3
