"""Qwen2.5-VL adapter: the tiny random test build runs the real processor and generate() on CPU."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from models.base import ModelLoadError, ModelSpec
from models.qwen_vl import QwenVL, build_test_qwen_vl


def _frames(n: int, size: int = 56, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _video_chat(frames, text: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": frames, "sample_fps": 0.5},
                {"type": "text", "text": text},
            ],
        }
    ]


@pytest.fixture(scope="module")
def qwen() -> QwenVL:
    return QwenVL.from_spec(ModelSpec(backend="qwen2.5-vl", random_init=True, device="cpu", batch_size=2))


def test_test_build_is_flagged(qwen: QwenVL):
    assert qwen.info.random_weights is True
    assert qwen.info.backend == "qwen2.5-vl"


def test_processor_really_tokenises_videos_and_images(qwen: QwenVL):
    tok = qwen.processor.tokenizer
    video_pad = tok.convert_tokens_to_ids("<|video_pad|>")
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    convs = [
        _video_chat(_frames(2, seed=0), "Describe the video."),
        _video_chat(_frames(2, seed=1), "Describe the whole video in detail."),
    ]
    inputs = qwen.prepare(convs)
    ids = inputs["input_ids"]
    # 56x56 frames -> 4x4 patches of 14 px, merged 2x2 -> 4 tokens; 2 frames = 1 temporal patch of 2.
    assert inputs["video_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    assert inputs["pixel_values_videos"].shape == (2 * 16, 3 * 2 * 14 * 14)
    assert ((ids == video_pad).sum(dim=1) == 4).all()
    # Left padding: the shorter prompt is padded at the start, both prompts end with the assistant turn.
    assert inputs["attention_mask"][0, 0] == 0 and inputs["attention_mask"][:, -1].all()
    assert tok.decode(ids[1]).endswith("<|im_start|>assistant\n")
    # Frame timing reaches the model: temporal patch of 2 frames at 0.5 fps = 4 s per grid step.
    assert inputs["second_per_grid_ts"].tolist() == [4.0, 4.0]

    image_chat = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": _frames(1, size=84)[0]},
                {"type": "text", "text": "Who is there?"},
            ],
        }
    ]
    inputs = qwen.prepare([image_chat])
    n_patches = int(inputs["image_grid_thw"].prod())
    assert inputs["pixel_values"].shape == (n_patches, 3 * 2 * 14 * 14)
    assert (inputs["input_ids"] == image_pad).sum() == n_patches // 4


def test_generate_batch_of_two_videos_returns_strings(qwen: QwenVL):
    convs = [
        _video_chat(_frames(2, seed=0), "Describe the video."),
        _video_chat(_frames(2, seed=1), "Describe it."),
    ]
    out = qwen.generate(convs, max_new_tokens=5)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    assert qwen.generate(convs, max_new_tokens=5) == out  # greedy by default: deterministic


def test_generate_chunks_by_batch_size(qwen: QwenVL, monkeypatch):
    calls = []
    real = qwen.prepare
    monkeypatch.setattr(qwen, "prepare", lambda convs: calls.append(len(convs)) or real(convs))
    convs = [_video_chat(_frames(2, seed=i), "Describe.") for i in range(3)]
    out = qwen.generate(convs, max_new_tokens=2)
    assert len(out) == 3 and calls == [2, 1]


def test_test_build_is_deterministic():
    a, _ = build_test_qwen_vl()
    b, _ = build_test_qwen_vl()
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert (pa == pb).all(), name


def test_missing_weights_offline_raise_model_load_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to fall back on
    with pytest.raises(ModelLoadError, match="Qwen/Qwen2.5-VL-7B-Instruct"):
        QwenVL.from_spec(ModelSpec(backend="qwen2.5-vl", device="cpu"))
    with pytest.raises(ModelLoadError, match="cannot load"):
        QwenVL.from_spec(ModelSpec(backend="qwen2.5-vl", weights=str(tmp_path / "nowhere"), device="cpu"))


def test_never_trusts_remote_code(monkeypatch):
    import transformers

    seen = []

    def fake_from_pretrained(name, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise OSError("no weights here")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(
        transformers.Qwen2_5_VLForConditionalGeneration, "from_pretrained", fake_from_pretrained
    )
    for trust in (False, True):  # Qwen2.5-VL is native: even an opt-in runs no checkpoint code
        with pytest.raises(ModelLoadError):
            QwenVL.from_spec(ModelSpec(backend="qwen2.5-vl", device="cpu", trust_remote_code=trust))
    assert seen == [False, False]


def test_unknown_option_is_refused():
    with pytest.raises(ModelLoadError, match="unknown options"):
        QwenVL.from_spec(ModelSpec(backend="qwen2.5-vl", random_init=True, options={"max_pixel": 1}))
