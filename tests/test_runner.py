"""The stage runner: failures become rows, one bad video never sinks its batch, reuse, retries, environment faults."""

from __future__ import annotations

import errno
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from pydantic import ValidationError

from schemas.config import CurateConfig, load_config
from schemas.records import CaptionRecord, SourceFile, VideoRecord
from tasks.base import EnvironmentFault, Stage, StageError, TransientError, VideoContext
from tasks.runner import end_journeys, run_stage


def ctx(name: str) -> VideoContext:
    video = VideoRecord(
        video_id=name,
        uri=f"/v/{name}.mp4",
        size_bytes=1,
        container="mp4",
        codec="h264",
        width=64,
        height=64,
        fps=16.0,
        duration_s=1.0,
        num_frames=16,
    )
    return VideoContext(source=SourceFile(uri=video.uri, size=1, version="1", video_id=name), video=video)


class EchoStage(Stage[CaptionRecord]):
    """Captions every video with its id; 'bad' is a StageError, 'boom' raises (and sinks the batch call)."""

    name = "caption"
    record_type = CaptionRecord
    calls = 0

    def process(self, videos):
        type(self).calls += 1
        if any(v.video_id == "boom" for v in videos):
            raise ValueError("native library said no")
        out = {}
        for v in videos:
            if v.video_id == "bad":
                out[v.video_id] = StageError("no_person", "nobody in the frame")
            else:
                out[v.video_id] = CaptionRecord(video_id=v.video_id, caption=v.video_id, source="model")
        return out


def test_failures_are_rows_and_a_crash_is_isolated_to_its_video():
    items = [ctx("a"), ctx("bad"), ctx("boom"), ctx("c")]
    stats = run_stage(EchoStage(CurateConfig()), items)
    assert [c.records.get("caption").caption if c.failure is None else None for c in items] == [
        "a",
        None,
        None,
        "c",
    ]
    assert items[1].failure.error_class == "no_person" and items[1].failure.stage == "caption"
    assert items[2].failure.error_class == "ValueError" and "native library" in items[2].failure.message
    assert stats.processed == 4 and stats.ok == 2 and stats.failed == {"no_person": 1, "ValueError": 1}


def test_reused_and_ended_videos_are_not_processed():
    done, failed, alias, todo = ctx("done"), ctx("failed"), ctx("alias"), ctx("todo")
    done.records["caption"] = CaptionRecord(video_id="done", caption="from the ledger", source="model")
    failed.fail("ingest", "corrupt", "broken")
    alias.alias_of = "vsomething"
    EchoStage.calls = 0
    stats = run_stage(EchoStage(CurateConfig()), [done, failed, alias, todo])
    assert stats.reused == 1 and stats.processed == 1 and EchoStage.calls == 1
    assert done.records["caption"].caption == "from the ledger" and todo.records["caption"].caption == "todo"
    assert "caption" not in failed.records and "caption" not in alias.records


class FlakyStage(EchoStage):
    failures_left = 2

    def process(self, videos):
        if FlakyStage.failures_left:
            FlakyStage.failures_left -= 1
            raise TransientError("CUDA out of memory under contention")
        return super().process(videos)


def test_transient_errors_are_retried_then_isolated():
    FlakyStage.failures_left = 2
    items = [ctx("a"), ctx("b")]
    run_stage(FlakyStage(CurateConfig()), items, retries=2, backoff_s=0.0)
    assert all(c.failure is None for c in items)
    FlakyStage.failures_left = 99
    items = [ctx("a")]
    run_stage(FlakyStage(CurateConfig()), items, retries=1, backoff_s=0.0)
    assert (
        items[0].failure.error_class == "TransientError"
    )  # still failing after the retries: that video's row


class DiskFullStage(EchoStage):
    def process(self, videos):
        raise OSError(errno.ENOSPC, "No space left on device", "/tmp/clip.mp4")


def test_environment_faults_stop_the_run_and_blame_no_video():
    items = [ctx("a"), ctx("b")]
    with pytest.raises(EnvironmentFault, match="No space left"):
        run_stage(DiskFullStage(CurateConfig()), items)
    assert all(c.failure is None for c in items)


def test_media_are_attributed_to_the_stage_that_made_them():
    class Painter(EchoStage):
        def process(self, videos):
            for v in videos:
                v.put("face_0.png", b"png bytes")
            return super().process(videos)

    item = ctx("a")
    run_stage(Painter(CurateConfig()), [item])
    assert item.media_stage == {"face_0.png": "caption"}


def test_driver_verdicts_end_journeys():
    a, b, c = ctx("a"), ctx("b"), ctx("c")
    end_journeys([a, b, c], {b.uri: ("duplicate", "same bytes as a"), c.uri: ("alias", "vabc")})
    assert a.failure is None and b.failure.error_class == "duplicate" and c.alias_of == "vabc"


@pytest.mark.parametrize("profile", ["paper", "offline", "test"])
def test_profiles_load(profile: str):
    cfg = load_config(profile)
    assert cfg.profile == profile
    if profile == "test":
        assert "persons" in cfg.random_weight_stages()
    if profile == "paper":
        assert cfg.random_weight_stages() == []
        assert cfg.run.stages["background"].num_gpus == 1


def test_overrides_and_unknown_keys():
    cfg = load_config(
        "offline", {"faces": {"min_size_px": 48}, "run": {"stages": {"faces": {"num_cpus": 2}}}}
    )
    assert cfg.faces.min_size_px == 48 and cfg.run.stages["faces"].num_cpus == 2
    assert cfg.run.stages["persons"].num_cpus == 1  # the other stages keep their profile values
    with pytest.raises(ValidationError, match="min_size"):
        load_config("offline", {"faces": {"min_size": 48}})
    with pytest.raises(ValidationError, match="unknown stage"):
        load_config("offline", {"run": {"stages": {"facez": {"num_cpus": 2}}}})


def test_execution_settings_do_not_change_the_data_fingerprint():
    a = load_config("offline")
    b = load_config("offline", {"run": {"batch_size": 64, "partition_size": 10}, "shards": {"maxcount": 3}})
    c = load_config("offline", {"faces": {"min_size_px": 48}})
    assert a.data_fingerprint() == b.data_fingerprint() != c.data_fingerprint()


def test_the_local_executor_never_runs_one_model_from_two_threads():
    """Partitions run in parallel threads; dlib and OpenCV's HOG crash when one instance is called twice at once."""
    from tasks.execution import Batch, LocalExecutor
    from tasks.output import OutputDir
    from tasks.pipeline import Pipeline

    active = {"n": 0, "overlap": False}
    guard = threading.Lock()

    class Probe(EchoStage):
        def process(self, videos):
            with guard:
                active["n"] += 1
                active["overlap"] |= active["n"] > 1
            time.sleep(0.05)
            with guard:
                active["n"] -= 1
            return super().process(videos)

    class Source(EchoStage):
        name = "ingest"
        record_type = VideoRecord

        def process(self, videos):
            return {v.video_id: ctx(v.video_id).video for v in videos}

    cfg = CurateConfig()
    pipeline = Pipeline.of(cfg, [Source, Probe])
    executor = LocalExecutor(pipeline, OutputDir("memory://runner-probe"), stages=[Source(cfg), Probe(cfg)])
    sources = [SourceFile(uri=f"/v/{n}.mp4", size=1, version="1", video_id=n) for n in "abcd"]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda s: executor.submit(Batch(0, 0, [s])).result(), sources))
    assert not active["overlap"], "two threads ran the same model at once"
    assert all(r.payload[0].records["caption"].caption == s.video_id for r, s in zip(results, sources))
