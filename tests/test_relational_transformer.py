"""RelationalWanTransformer: diffusers weight compatibility, mixed-layout batches, ablations, backward."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel
from torch.nn.attention.flex_attention import flex_attention

import lumosx_model.attention as attention_module
from lumosx_model.layout import Condition, SampleLayout
from lumosx_model.masks import mcam_template, pad_templates
from lumosx_model.relational import RelationalConfig
from lumosx_model.transformer import RelationalWanTransformer

C, T, H, W = 16, 2, 4, 6  # latent video: 2 frames of 4×6 → 2×2×3 tokens
TXT = 9


@pytest.fixture(scope="module")
def model() -> RelationalWanTransformer:
    torch.manual_seed(0)
    return RelationalWanTransformer.from_config(RelationalWanTransformer.tiny_config()).eval()


def batch(seed: int = 0):
    """Two samples with different layouts; sample 1 uses 2 of 4 slots."""
    g = torch.Generator().manual_seed(seed)
    layouts = [
        SampleLayout.from_conditions(
            [
                Condition("background", "garden", -1),
                Condition("face", "man", 0),
                Condition("attribute", "hat", 0),
                Condition("face", "woman", 1),
            ]
        ),
        SampleLayout.from_conditions([Condition("object", "dog", -1), Condition("face", "kid", 0)]),
    ]
    prompt = [3, 1, 7, 2, 8, 4, 5, 6, 0]
    labels = {"garden": [6], "man": [1], "hat": [7, 2], "woman": [4], "dog": [5], "kid": [3]}
    templates = pad_templates(
        [mcam_template(lay, prompt, [labels[c.label] for c in lay.conditions]) for lay in layouts], 4, TXT
    )
    return dict(
        hidden_states=torch.randn(2, C, T, H, W, generator=g),
        timestep=torch.tensor([700.0, 30.0]),
        encoder_hidden_states=torch.randn(2, TXT, 32, generator=g),
        cond_latents=torch.randn(2, 4, C, H, W, generator=g),
        layouts=layouts,
        mcam_templates=templates,
    )


def take(inputs, b, num_slots):
    """Sample ``b`` alone with only ``num_slots`` condition slots."""
    out = {k: v[b : b + 1] for k, v in inputs.items() if k != "layouts"}
    out["cond_latents"] = out["cond_latents"][:, :num_slots]
    out["mcam_templates"] = out["mcam_templates"][:, :num_slots]
    out["layouts"] = [inputs["layouts"][b]]
    return out


def test_without_conditions_equals_wan(model):
    wan = WanTransformer3DModel.from_config(RelationalWanTransformer.tiny_config()).eval()
    wan.load_state_dict(model.state_dict())
    inputs = batch()
    plain = {k: inputs[k] for k in ("hidden_states", "timestep", "encoder_hidden_states")}
    with torch.no_grad():
        expected = wan(**plain, return_dict=False)[0]
        assert torch.equal(model(**plain), expected)
        assert torch.equal(model(**plain, return_dict=True).sample, expected)
        # the relational path itself (own rotary, processors, output head) with zero condition slots
        empty = model(
            **plain,
            cond_latents=torch.zeros(2, 0, C, H, W),
            layouts=[SampleLayout(())] * 2,
            relational=RelationalConfig(mcam=False),
        )
    torch.testing.assert_close(empty, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["paper", "release", "exact"])
def test_mixed_layout_batch_equals_per_sample_runs(model, mode):
    inputs = batch()
    cfg = RelationalConfig(mcam_mode=mode, mcam_pool=2)
    with torch.no_grad():
        together = model(**inputs, relational=cfg)
        alone = [model(**take(inputs, b, len(inputs["layouts"][b])), relational=cfg) for b in range(2)]
    assert together.shape == (2, C, T, H, W)
    for b in range(2):
        torch.testing.assert_close(together[b : b + 1], alone[b], atol=1e-5, rtol=1e-4)


def test_padding_content_is_ignored_and_conditions_matter(model):
    inputs = batch()
    with torch.no_grad():
        ref = model(**inputs)
        noisy_pad = dict(inputs, cond_latents=inputs["cond_latents"].clone())
        noisy_pad["cond_latents"][1, 2:] = 100.0
        torch.testing.assert_close(model(**noisy_pad), ref, atol=1e-6, rtol=1e-5)
        other = dict(inputs, cond_latents=inputs["cond_latents"].clone())
        other["cond_latents"][1, 0] += 1.0
        changed = model(**other)
    assert not torch.allclose(changed[1], ref[1], atol=1e-4)
    torch.testing.assert_close(changed[0], ref[0], atol=1e-6, rtol=1e-5)  # samples never mix


@pytest.mark.parametrize("switch", ["r2pe", "csam", "mcam"])
def test_each_ablation_switch_changes_the_prediction(model, switch):
    inputs = batch()
    with torch.no_grad():
        full = model(**inputs, relational=RelationalConfig())
        ablated = model(**inputs, relational=RelationalConfig(**{switch: False}))
    assert not torch.allclose(full, ablated, atol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_backend_matches_dense(model, monkeypatch):
    # Eager FlexAttention stands in for the compiled kernel on CPU (same maths, no 30 s compile);
    # tests/test_relational_attention.py checks the compiled kernels themselves.
    monkeypatch.setattr(attention_module, "_flex_attention", lambda compiled: flex_attention)
    inputs = batch()
    with torch.no_grad():
        for mode in ("paper", "release", "exact"):
            dense = model(**inputs, relational=RelationalConfig(mcam_mode=mode, backend="dense"))
            flex = model(**inputs, relational=RelationalConfig(mcam_mode=mode, backend="flex"))
            torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["paper", "exact"])
def test_backward_on_cpu_with_and_without_gradient_checkpointing(mode):
    torch.manual_seed(1)
    model = RelationalWanTransformer.from_config(RelationalWanTransformer.tiny_config()).train()
    inputs = batch(1)
    cfg = RelationalConfig(mcam_mode=mode)

    def grads():
        model.zero_grad()
        model(**inputs, relational=cfg).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.enable_gradient_checkpointing()
    checkpointed = grads()
    model.disable_gradient_checkpointing()
    assert plain.keys() == checkpointed.keys()
    assert len(plain) == len(list(model.parameters()))
    for name, grad in plain.items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_input_validation(model):
    inputs = batch()
    with pytest.raises(ValueError, match="mcam_templates are required"):
        model(**dict(inputs, mcam_templates=None))
    with pytest.raises(ValueError, match=r"mcam_templates must be \[B, N, L_txt\]"):
        model(**dict(inputs, mcam_templates=inputs["mcam_templates"][:, :2]))
    with pytest.raises(ValueError, match="cond_latents must be"):
        model(**dict(inputs, cond_latents=inputs["cond_latents"][..., :4]))
    with pytest.raises(ValueError, match="one SampleLayout per sample"):
        model(**dict(inputs, layouts=inputs["layouts"][:1]))
    with pytest.raises(ValueError, match="conditions but cond_latents has"):
        model(
            **dict(
                inputs,
                cond_latents=inputs["cond_latents"][:, :3],
                mcam_templates=inputs["mcam_templates"][:, :3],
            )
        )


def test_save_and_load_round_trip_with_diffusers(model, tmp_path):
    model.save_pretrained(tmp_path / "relational")
    wan = WanTransformer3DModel.from_pretrained(tmp_path / "relational")
    wan.save_pretrained(tmp_path / "wan")
    loaded = RelationalWanTransformer.from_pretrained(tmp_path / "wan", torch_dtype=torch.float32)
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    )
    assert all(type(p).__name__ == "RelationalAttnProcessor" for p in loaded.attn_processors.values())


def test_full_config_builds_on_meta_with_wan_keys():
    config = RelationalWanTransformer.full_config()
    with torch.device("meta"):
        relational = RelationalWanTransformer.from_config(config)
        wan = WanTransformer3DModel.from_config(config)
    params = sum(p.numel() for p in relational.parameters())
    print(f"Wan2.1-T2V-1.3B relational transformer: {params:,} parameters")
    assert 1.2e9 < params < 1.5e9
    assert params == sum(p.numel() for p in wan.parameters())
    assert list(relational.state_dict()) == list(wan.state_dict())
    assert len(relational.attn_processors) == 60


def test_relational_config_validation_and_backend_choice():
    assert RelationalConfig().resolve_backend(torch.device("cpu")) == "dense"
    assert RelationalConfig().resolve_backend(torch.device("cuda")) == "flex"
    assert RelationalConfig(backend="dense").resolve_backend(torch.device("cuda")) == "dense"
    for bad in (dict(mcam_mode="approx"), dict(backend="triton"), dict(mcam_pool=0)):
        with pytest.raises(ValueError):
            RelationalConfig(**bad)
