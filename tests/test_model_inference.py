"""Inference from an official case folder to an mp4 with tiny models."""

from __future__ import annotations

import av
import pytest
import torch
from model_fixtures import case_folder, one_torch_thread  # noqa: F401 (one_torch_thread: autouse)

from lumosx_model.components import load_transformer
from lumosx_model.conditions import TooManyConditionsError
from lumosx_model.config import InferenceConfig, ModelConfig
from lumosx_model.inference import LumosXGenerator, generate_case, write_mp4
from schemas.official_case import CaseFormatError, read_case


def _probe(path) -> tuple[int, int, int]:
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
        return len(frames), frames[0].width, frames[0].height


def test_case_to_mp4_of_configured_size_and_length(tmp_path):
    cfg = InferenceConfig.preset("inference_tiny")
    out = generate_case(case_folder(tmp_path), tmp_path / "out" / "case_0.mp4", cfg)
    assert _probe(out) == (5, 48, 32)
    tall = cfg.model_copy(update={"height": 48, "width": 32, "num_frames": 9})
    assert _probe(generate_case(tmp_path / "case_0", tmp_path / "tall.mp4", tall)) == (9, 32, 48)


def test_cfg_branches_share_image_conditions_and_seed_is_reproducible(tmp_path):
    cfg = InferenceConfig.preset("inference_tiny")
    gen = LumosXGenerator.from_config(cfg)
    calls = []
    forward = gen.transformer.forward

    def spy(hidden, t, text, **kw):
        calls.append(kw)
        return forward(hidden, t, text, **kw)

    gen.transformer.forward = spy
    case = read_case(case_folder(tmp_path))
    kwargs = dict(height=32, width=48, num_frames=5, steps=3, guidance_scale=6.0, seed=1)
    a = gen.generate(case, **kwargs)
    assert len(calls) == 3
    for kw in calls:
        cond = kw["cond_latents"]
        assert cond.shape[0] == 2 and torch.equal(cond[0], cond[1])
        assert kw["layouts"][0] == kw["layouts"][1] and len(kw["layouts"][0]) == 6
        assert kw["mcam_templates"][0].abs().sum() > 0  # the caption holds the labels ...
        assert kw["mcam_templates"][1].abs().sum() == 0  # ... the empty negative prompt does not
    assert torch.equal(a, gen.generate(case, **kwargs))
    assert not torch.equal(a, gen.generate(case, **{**kwargs, "seed": 2}))
    calls.clear()
    faces = gen.generate(case, **{**kwargs, "guidance_scale": 1.0}, identity_only=True)
    assert faces.shape == (5, 32, 48, 3) and calls[0]["cond_latents"].shape[:2] == (1, 2)


def test_fixed_condition_slots_pad_the_case_and_keep_the_video(tmp_path):
    gen = LumosXGenerator.from_config(InferenceConfig.preset("inference_tiny"))
    shapes = []
    forward = gen.transformer.forward

    def spy(hidden, t, text, **kw):
        shapes.append((tuple(kw["cond_latents"].shape), tuple(kw["mcam_templates"].shape)))
        return forward(hidden, t, text, **kw)

    gen.transformer.forward = spy
    case = read_case(case_folder(tmp_path))  # 6 condition images
    kwargs = dict(height=32, width=48, num_frames=5, steps=2, seed=3)
    own = gen.generate(case, **kwargs)
    padded = gen.generate(case, **kwargs, condition_slots=9)
    assert shapes[0][1] == (2, 6, 64) and shapes[-1] == ((2, 9, 16, 4, 6), (2, 9, 64))
    # padding slots are masked out: the same video up to float rounding (uint8 frames: at most 1 level)
    assert (own.int() - padded.int()).abs().max() <= 1
    with pytest.raises(TooManyConditionsError, match="6 condition images, more than condition_slots=5"):
        gen.generate(case, **kwargs, condition_slots=5)


def test_loads_trained_transformer(tmp_path):
    model = load_transformer(ModelConfig(tiny=True))
    with torch.no_grad():
        model.proj_out.bias.add_(0.5)
    model.save_pretrained(tmp_path / "run" / "transformer")
    cfg = InferenceConfig.preset("inference_tiny", model={"transformer_path": str(tmp_path / "run")})
    gen = LumosXGenerator.from_config(cfg)
    torch.testing.assert_close(gen.transformer.proj_out.bias, model.proj_out.bias)


def test_errors(tmp_path):
    with pytest.raises(CaseFormatError):
        generate_case(tmp_path, tmp_path / "x.mp4", InferenceConfig.preset("inference_tiny"))
    with pytest.raises(ValueError, match="4k\\+1"):
        InferenceConfig.preset("inference_tiny", num_frames=6)
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(torch.zeros(2, 8, 8, 3).numpy(), tmp_path / "x.mp4")


def test_cli_infer(tmp_path):
    from lumosx_model.cli import main

    case = case_folder(tmp_path / "cases")
    assert (
        main(["infer", "--preset", "inference_tiny", "--case", str(case), "--out", str(tmp_path / "a.mp4")])
        == 0
    )
    assert _probe(tmp_path / "a.mp4") == (5, 48, 32)
    (tmp_path / "cases" / "broken").mkdir()
    (tmp_path / "cases" / "broken" / "caption.txt").write_text("x;A man.")
    assert (
        main(
            [
                "infer",
                "--preset",
                "inference_tiny",
                "--cases",
                str(tmp_path / "cases"),
                "--out",
                str(tmp_path / "all"),
            ]
        )
        == 1
    )  # the broken case is reported, the good one written
    assert _probe(tmp_path / "all" / "case_0.mp4") == (5, 48, 32)


def test_released_cfg_gives_the_negative_branch_the_positive_masks(tmp_path):
    from lumosx_model.config import WAN_NEGATIVE_PROMPT

    gen = LumosXGenerator.from_config(InferenceConfig.preset("inference_tiny"))
    templates = []
    forward = gen.transformer.forward

    def spy(hidden, t, text, **kw):
        templates.append(kw["mcam_templates"])
        return forward(hidden, t, text, **kw)

    gen.transformer.forward = spy
    case = read_case(case_folder(tmp_path))
    kwargs = dict(height=32, width=48, num_frames=5, steps=1, negative_prompt=WAN_NEGATIVE_PROMPT)
    gen.generate(case, **kwargs, negative_mcam="positive")
    assert templates[0][0].abs().sum() > 0 and torch.equal(templates[0][1], templates[0][0])
    gen.generate(case, **kwargs)  # default: the negative prompt's own tokens (no label in it: no bias)
    assert templates[1][1].abs().sum() == 0
    assert InferenceConfig.preset("lumosx_release").negative_mcam == "positive"
    assert InferenceConfig.preset("lumosx_release").negative_prompt == WAN_NEGATIVE_PROMPT
