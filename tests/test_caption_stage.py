"""Caption stage: sidecar vs model, records with model info, failures with reasons."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from models.base import ModelSpec
from schemas.config import CaptionConfig, CurateConfig
from schemas.records import ModelInfo, SourceFile, VideoRecord
from tasks.base import StageError, VideoContext
from tasks.caption import CaptionStage, normalize_caption, uniform_times
from tasks.runner import run_stage

FPS = 8
N_FRAMES = 16
TEST_MODEL = ModelSpec(backend="qwen2.5-vl", random_init=True, device="cpu", batch_size=2)


def _write_noise_video(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, FPS)
        for i in range(N_FRAMES):
            frame = av.VideoFrame.from_ndarray(
                rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), format="rgb24"
            )
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def _record(uri: Path, vid: str, sidecar: str | None) -> VideoRecord:
    return VideoRecord(
        video_id=vid,
        uri=str(uri),
        size_bytes=uri.stat().st_size,
        container="mp4",
        codec="h264",
        width=32,
        height=32,
        fps=FPS,
        duration_s=N_FRAMES / FPS,
        num_frames=N_FRAMES,
        sidecar_caption=sidecar,
    )


@pytest.fixture(scope="module")
def video_files(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("videos")
    return [_write_noise_video(d / f"v{i}.mp4", seed=i) for i in range(2)]


def _stage(source: str, **caption) -> CaptionStage:
    settings = {"model": TEST_MODEL, "num_frames": 2, "max_new_tokens": 4, **caption}
    config = CurateConfig(caption=CaptionConfig(source=source, **settings))
    return CaptionStage(config)


def _context(record: VideoRecord) -> VideoContext:
    """A video as ingest leaves it: its source file, its `VideoRecord` (with the sidecar caption ingest read)."""
    source = SourceFile(uri=record.uri, size=record.size_bytes, version="test", video_id=record.video_id)
    return VideoContext(source=source, video=record, records={"ingest": record})


def _contexts(video_files, sidecars) -> list[VideoContext]:
    return [
        _context(_record(p, f"vid{i}", s)) for i, (p, s) in enumerate(zip(video_files, sidecars, strict=True))
    ]


class _FakeCaptioner:
    info = ModelInfo(backend="fake")

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def __call__(self, videos, prompt, *, max_new_tokens, sample_fps=None):
        self.calls.append(
            {"videos": videos, "prompt": prompt, "max_new_tokens": max_new_tokens, "sample_fps": sample_fps}
        )
        return self.answers[: len(videos)]


def test_sidecar_source_never_loads_a_model(video_files, monkeypatch):
    stage = _stage("sidecar")
    monkeypatch.setattr(stage, "captioner", lambda: pytest.fail("sidecar mode must not load a captioner"))
    stage.setup()
    out = stage.process(_contexts(video_files, ["  A man\n in a  red coat.  ", None]))
    assert out["vid0"].caption == "A man in a red coat." and out["vid0"].source == "sidecar"
    assert out["vid0"].model is None
    assert isinstance(out["vid1"], StageError) and out["vid1"].reason == "no_caption"


def test_through_the_runner_records_and_failures_land_in_the_contexts(video_files):
    stage = _stage("sidecar")
    ctxs = _contexts(video_files, ["A man waves.", None])
    stats = run_stage(stage, ctxs)
    assert stats.ok == 1 and stats.failed == {"no_caption": 1}
    assert ctxs[0].record("caption").caption == "A man waves." and ctxs[0].failure is None
    assert ctxs[1].failure.stage == "caption" and ctxs[1].failure.error_class == "no_caption"
    assert "caption" not in ctxs[1].records


def test_sidecar_or_model_captions_missing_ones_with_the_test_build(video_files):
    stage = _stage("sidecar_or_model")
    out = stage.process(_contexts(video_files, ["A woman smiles.", "   "]))
    assert out["vid0"].source == "sidecar" and out["vid0"].caption == "A woman smiles."
    rec = out["vid1"]
    assert not isinstance(rec, StageError), rec  # the seeded test build answers non-whitespace bytes
    assert rec.source == "model" and rec.caption == normalize_caption(rec.caption)
    assert rec.model is not None and rec.model.random_weights and rec.model.backend == "qwen2.5-vl"
    assert rec.frame_times_s == pytest.approx(uniform_times(N_FRAMES / FPS, 2))


def test_model_source_ignores_sidecars_and_samples_frames_across_the_video(video_files):
    stage = _stage("model", num_frames=4)
    fake = _FakeCaptioner(["  A dog\truns. ", "A cat sleeps."])
    stage._captioner = fake
    out = stage.process(_contexts(video_files, ["sidecar text", None]))
    assert [out[v].caption for v in ("vid0", "vid1")] == ["A dog runs.", "A cat sleeps."]
    assert all(out[v].source == "model" and out[v].model == fake.info for v in ("vid0", "vid1"))
    (call,) = fake.calls  # one call for the batch: the captioner does its own batching
    assert [len(frames) for frames in call["videos"]] == [4, 4]
    assert call["videos"][0][0].size == (32, 32)
    assert call["prompt"] == stage.prompt and call["max_new_tokens"] == 4
    assert call["sample_fps"] == pytest.approx([4 / 2.0, 4 / 2.0])  # 4 frames over a 2 s video
    assert out["vid0"].frame_times_s == pytest.approx([0.25, 0.75, 1.25, 1.75])


def test_empty_model_output_fails_with_a_reason(video_files):
    stage = _stage("model")
    stage._captioner = _FakeCaptioner([" \n\t ", "A person walks."])
    out = stage.process(_contexts(video_files, [None, None]))
    assert isinstance(out["vid0"], StageError) and out["vid0"].reason == "empty_caption"
    assert out["vid1"].caption == "A person walks."


def test_undecodable_video_fails_alone(tmp_path, video_files):
    stage = _stage("model")
    stage._captioner = _FakeCaptioner(["A person walks."])
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 100)
    ctxs = _contexts([broken, video_files[1]], [None, None])
    out = stage.process(ctxs)
    assert isinstance(out["vid0"], StageError) and out["vid0"].reason == "decode_error"
    assert out["vid1"].caption == "A person walks."


def test_prompt_text_and_caption_config_are_in_the_fingerprint(tmp_path, monkeypatch):
    import tasks.prompts

    (tmp_path / "a.txt").write_text("Describe the video.")
    (tmp_path / "b.txt").write_text("Describe the video densely.")
    monkeypatch.setattr(tasks.prompts, "PROMPTS_DIR", tmp_path)
    up = {"ingest": "fp-ingest"}
    fp_a = _stage("model", prompt_file="a.txt").fingerprint(up)
    fp_b = _stage("model", prompt_file="b.txt").fingerprint(up)
    (tmp_path / "a.txt").write_text("Describe the video!")  # same file name, edited text
    fp_a2 = _stage("model", prompt_file="a.txt").fingerprint(up)
    fp_frames = _stage("model", prompt_file="b.txt", num_frames=3).fingerprint(up)
    assert len({fp_a, fp_b, fp_a2, fp_frames}) == 4


def test_stage_declaration():
    assert CaptionStage.name == "caption" and CaptionStage.requires == ("ingest",) and CaptionStage.uses_gpu
