"""Video captioners: both backends' test builds run for real; NVILA's remote code needs an explicit opt-in."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from models.base import ModelLoadError, ModelSpec
from models.captioner import CAPTIONERS, NvilaCaptioner, QwenVLCaptioner, build_test_nvila

PROMPT = "Describe the persons, their clothing and the background."


def _videos(n: int, frames: int = 2, size: tuple[int, int] = (56, 56)) -> list[list[Image.Image]]:
    rng = np.random.default_rng(0)
    return [
        [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(frames)]
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def nvila_test() -> NvilaCaptioner:
    return CAPTIONERS.build(ModelSpec(backend="nvila", random_init=True, device="cpu", batch_size=2))


def test_backends_registered():
    assert CAPTIONERS.backends == ["nvila", "qwen2.5-vl"]
    with pytest.raises(ModelLoadError, match="unknown captioner backend"):
        CAPTIONERS.build(ModelSpec(backend="vila-1.5"))


def test_qwen_captioner_test_build_captions_a_batch():
    cap = CAPTIONERS.build(ModelSpec(backend="qwen2.5-vl", random_init=True, device="cpu", batch_size=2))
    assert isinstance(cap, QwenVLCaptioner) and cap.info.random_weights
    out = cap(_videos(2), PROMPT, max_new_tokens=4, sample_fps=[0.5, 1.0])
    assert len(out) == 2 and all(isinstance(t, str) for t in out)


def test_nvila_test_build_captions_in_batches(nvila_test: NvilaCaptioner, monkeypatch):
    assert nvila_test.info.random_weights and nvila_test.info.backend == "nvila"
    calls = []
    monkeypatch.setattr(nvila_test, "processor", _Spy(nvila_test.processor, calls))
    out = nvila_test(_videos(3, size=(64, 40)), PROMPT, max_new_tokens=3)
    assert len(out) == 3 and all(isinstance(t, str) for t in out)
    assert [c["input_ids"].shape[0] for c in calls] == [2, 1]  # batch_size 2
    video_token = nvila_test.processor.tokenizer.convert_tokens_to_ids("<video>")
    # 56 px frames -> 4x4 SigLIP patches pooled 2x2 -> 4 tokens per frame, x2 frames, +1 newline token.
    assert ((calls[0]["input_ids"] == video_token).sum(dim=1) == 2 * 4 + 1).all()
    assert calls[0]["pixel_values_videos"].shape == (2, 2, 3, 56, 56)


class _Spy:
    """Wraps a processor to keep what it returned; everything else goes to the real one."""

    def __init__(self, processor, calls):
        self._p, self._calls = processor, calls

    def __call__(self, *args, **kwargs):
        out = self._p(*args, **kwargs)
        self._calls.append(out)
        return out

    def __getattr__(self, name):
        return getattr(self._p, name)


def test_bad_input_is_refused_clearly(nvila_test: NvilaCaptioner):
    with pytest.raises(ValueError, match="non-empty list of PIL frames"):
        nvila_test([[]], PROMPT)
    with pytest.raises(ValueError, match="must be PIL images"):
        nvila_test([[np.zeros((8, 8, 3), np.uint8)]], PROMPT)
    assert nvila_test([], PROMPT) == []


def test_nvila_loads_a_native_local_checkpoint(tmp_path):
    model, processor = build_test_nvila()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    cap = CAPTIONERS.build(ModelSpec(backend="nvila", weights=str(tmp_path), device="cpu"))
    assert cap.info.model_id == str(tmp_path) and not cap.info.random_weights
    assert len(cap(_videos(1), PROMPT, max_new_tokens=2)) == 1


@pytest.fixture
def remote_code_checkpoint(tmp_path):
    """A checkpoint laid out like Efficient-Large-Model/NVILA-8B-hf: a model_type unknown to transformers."""
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "nvila",
                "architectures": ["NVILAForConditionalGeneration"],
                "auto_map": {
                    "AutoConfig": "configuration_nvila.NVILAConfig",
                    "AutoModel": "modeling_nvila.NVILAForConditionalGeneration",
                    "AutoProcessor": "processing_nvila.NVILAProcessor",
                    "AutoTokenizer": ["tokenization_nvila.NVILATokenizer", None],
                },
            }
        )
    )
    return tmp_path


@pytest.fixture
def recorded_loads(monkeypatch):
    import transformers

    seen: list[tuple[str, object]] = []

    def recorder(cls_name):
        def fake_from_pretrained(name, **kwargs):
            seen.append((cls_name, kwargs.get("trust_remote_code")))
            if cls_name == "AutoProcessor":
                return object()  # let the load go on to the model class
            raise OSError("stopped by the test")

        return fake_from_pretrained

    for cls in ("AutoProcessor", "AutoModel", "AutoModelForImageTextToText"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", recorder(cls))
    return seen


def test_remote_code_needs_explicit_opt_in(remote_code_checkpoint, recorded_loads):
    spec = ModelSpec(backend="nvila", weights=str(remote_code_checkpoint), device="cpu")
    with pytest.raises(ModelLoadError, match="trust_remote_code: true"):
        CAPTIONERS.build(spec)
    assert recorded_loads == []  # refused before any loader (and any checkpoint code) ran


def test_remote_code_is_passed_only_when_the_spec_says_so(remote_code_checkpoint, recorded_loads):
    spec = ModelSpec(
        backend="nvila",
        weights=str(remote_code_checkpoint),
        device="cpu",
        trust_remote_code=True,
        revision=None,
    )
    with pytest.raises(ModelLoadError, match="stopped by the test"):
        CAPTIONERS.build(spec)
    assert recorded_loads == [("AutoProcessor", True), ("AutoModel", True)]


def test_native_checkpoint_never_gets_remote_code(tmp_path, recorded_loads):
    model, processor = build_test_nvila()
    model.config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError):
        CAPTIONERS.build(ModelSpec(backend="nvila", weights=str(tmp_path), device="cpu"))
    assert recorded_loads == [("AutoProcessor", False), ("AutoModelForImageTextToText", False)]


def test_missing_weights_offline_raise_model_load_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="NVILA-8B-hf"):
        CAPTIONERS.build(ModelSpec(backend="nvila", device="cpu"))
