"""Weights in the original Wan2.1 layout (the LumosX release): tiny random models saved with Wan's key names load
to the same outputs as diffusers-native loading, export back round-trips, and the release preset runs end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import av
import pytest
import torch
from diffusers import AutoencoderKLWan
from model_fixtures import case_folder, one_torch_thread  # noqa: F401 (one_torch_thread: autouse)
from safetensors.torch import load_file
from transformers import UMT5EncoderModel

from lumosx_model import wan_original as wo
from lumosx_model.cli import main
from lumosx_model.components import build_tiny_tokenizer, tiny_text_encoder_config
from lumosx_model.transformer import RelationalWanTransformer
from models.base import ModelLoadError


def tiny_transformer(seed: int = 0) -> RelationalWanTransformer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RelationalWanTransformer.from_config(RelationalWanTransformer.tiny_config()).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKLWan:
    # Wan2.1's VAE architecture (dim_mult 1,2,4,4; 2 res blocks: what diffusers' converter maps) at width 4.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLWan(base_dim=4, z_dim=16).eval()


def tiny_umt5(seed: int = 0) -> UMT5EncoderModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UMT5EncoderModel(tiny_text_encoder_config(32)).eval()


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# Names as Wan's own modules define them (wan/modules/model.py, vae.py, t5.py), written out by hand.
WAN_TRANSFORMER_NAMES = {
    "patch_embedding.weight",
    "text_embedding.0.weight",
    "text_embedding.2.bias",
    "time_embedding.0.weight",
    "time_projection.1.weight",
    "blocks.0.modulation",
    "blocks.0.self_attn.q.weight",
    "blocks.0.self_attn.o.bias",
    "blocks.0.self_attn.norm_q.weight",
    "blocks.1.cross_attn.k.weight",
    "blocks.1.cross_attn.norm_k.weight",
    "blocks.0.norm3.weight",
    "blocks.0.ffn.0.weight",
    "blocks.0.ffn.2.bias",
    "head.head.weight",
    "head.modulation",
}
WAN_VAE_NAMES = {
    "conv1.weight",
    "conv2.bias",
    "encoder.conv1.weight",
    "encoder.downsamples.0.residual.0.gamma",
    "encoder.downsamples.0.residual.2.weight",
    "encoder.downsamples.3.shortcut.weight",
    "encoder.downsamples.2.resample.1.weight",
    "encoder.middle.1.to_qkv.weight",
    "encoder.head.2.weight",
    "decoder.conv1.weight",
    "decoder.middle.2.residual.6.bias",
    "decoder.upsamples.3.resample.1.weight",
    "decoder.upsamples.3.time_conv.weight",
    "decoder.upsamples.4.shortcut.weight",
    "decoder.upsamples.14.residual.3.gamma",
    "decoder.head.0.gamma",
}
WAN_T5_NAMES = {
    "token_embedding.weight",
    "norm.weight",
    "blocks.0.norm1.weight",
    "blocks.0.attn.q.weight",
    "blocks.1.attn.o.weight",
    "blocks.0.norm2.weight",
    "blocks.0.ffn.gate.0.weight",
    "blocks.0.ffn.fc1.weight",
    "blocks.1.ffn.fc2.weight",
    "blocks.1.pos_embedding.embedding.weight",
}


# ------------------------------------------------------------------------------------------------ transformer


@pytest.mark.parametrize("name", ["lumosx.pt", "diffusion_pytorch_model.safetensors"])
def test_transformer_in_wan_layout_loads_to_native_outputs_and_round_trips(tmp_path, name):
    model = tiny_transformer()
    model.save_pretrained(tmp_path / "native")
    native = RelationalWanTransformer.from_pretrained(tmp_path / "native").eval()

    weights = wo.export_original_transformer(model, tmp_path / "wan" / name)
    saved = torch.load(weights, weights_only=True) if weights.suffix == ".pt" else load_file(str(weights))
    assert saved.keys() >= WAN_TRANSFORMER_NAMES
    assert not any("attn1" in k or "to_q" in k or "condition_embedder" in k for k in saved)
    assert json.loads(weights.with_suffix(".json").read_text())["num_heads"] == 2

    loaded = wo.load_original_transformer(weights).eval()
    for key, value in RelationalWanTransformer.tiny_config().items():
        got = loaded.config[key]
        assert (list(got) if isinstance(got, tuple | list) else got) == (
            list(value) if isinstance(value, tuple) else value
        ), key
    torch.manual_seed(1)
    x, t, text = torch.randn(1, 16, 2, 4, 6), torch.tensor([500.0]), torch.randn(1, 8, 32)
    assert same_tensors(loaded.state_dict(), native.state_dict())  # bit for bit
    with torch.no_grad():
        # Same weights, same maths; CPU kernels on from_pretrained's mmapped storage may round the last bit
        # differently (a freshly built model shows the same 5e-7), hence the float32-ulp-level tolerance.
        torch.testing.assert_close(loaded(x, t, text), native(x, t, text), rtol=0, atol=2e-6)
        assert torch.equal(loaded(x, t, text), model(x, t, text))
    # Export back: identical tensors under identical Wan names, and identical diffusers weights after loading.
    assert same_tensors(wo.transformer_to_original(loaded.state_dict()), saved)
    assert same_tensors(loaded.state_dict(), model.state_dict())


def test_transformer_folder_layouts_and_wrappers(tmp_path):
    from safetensors.torch import save_file

    model = tiny_transformer()
    original = wo.transformer_to_original(model.state_dict())
    # Hub layout: shards + index.json + Wan's config.json
    keys = sorted(original)
    shards = {"part-1.safetensors": keys[: len(keys) // 2], "part-2.safetensors": keys[len(keys) // 2 :]}
    folder = tmp_path / "hub"
    folder.mkdir()
    for file, part in shards.items():
        save_file({k: original[k].contiguous() for k in part}, str(folder / file))
    weight_map = {k: f for f, part in shards.items() for k in part}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map})
    )
    (folder / "config.json").write_text(json.dumps(wo.wan_transformer_config(model.config)))
    assert same_tensors(wo.load_original_transformer(folder).state_dict(), model.state_dict())
    # A training script's wrapper: {"state_dict": {"module.<key>": ...}}
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in original.items()}}, wrapped)
    (tmp_path / "config.json").write_text(json.dumps(wo.wan_transformer_config(model.config)))
    assert same_tensors(wo.load_original_transformer(wrapped).state_dict(), model.state_dict())


def test_mismatched_keys_are_named(tmp_path):
    original = wo.transformer_to_original(tiny_transformer().state_dict())
    original.pop("blocks.1.ffn.2.weight")
    original["blocks.0.extra_gate.weight"] = torch.zeros(2)
    torch.save(original, tmp_path / "bad.pt")
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 2}))
    with pytest.raises(ModelLoadError) as err:
        wo.load_original_transformer(tmp_path / "bad.pt")
    message = str(err.value)
    assert "missing 1 keys: blocks.1.ffn.net.2.weight" in message
    assert "unexpected 1 keys: blocks.0.extra_gate.weight" in message


class _NotATensor:
    pass


def test_pickled_objects_are_refused_not_executed(tmp_path):
    torch.save({"weight": torch.zeros(1), "payload": _NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(ModelLoadError, match="weights-only"):
        wo.read_state_dict(tmp_path / "evil.pt")


# ------------------------------------------------------------------------------------------------ VAE, UMT5


def test_vae_in_wan_layout_loads_to_native_outputs_and_round_trips(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "native")
    native = AutoencoderKLWan.from_pretrained(tmp_path / "native").eval()
    path = wo.export_original_vae(vae, tmp_path / "vae.pth")
    saved = torch.load(path, weights_only=True)
    assert saved.keys() >= WAN_VAE_NAMES and not any("up_blocks" in k or "mid_block" in k for k in saved)

    loaded = wo.load_original_vae(path).eval()
    assert loaded.config.base_dim == 4 and loaded.config.z_dim == 16
    torch.manual_seed(2)
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        z = native.encode(video).latent_dist.mode()
        assert torch.equal(loaded.encode(video).latent_dist.mode(), z)
        assert torch.equal(loaded.decode(z).sample, native.decode(z).sample)
    assert same_tensors(wo.vae_to_original(loaded.state_dict()), saved)


def test_umt5_in_wan_layout_loads_to_native_outputs_and_round_trips(tmp_path):
    encoder = tiny_umt5()
    encoder.save_pretrained(tmp_path / "native")
    native = UMT5EncoderModel.from_pretrained(tmp_path / "native").eval()
    path = wo.export_original_umt5(encoder, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    saved = torch.load(path, weights_only=True)
    assert saved.keys() >= WAN_T5_NAMES and len(saved) == 2 + 2 * 10  # embedding, final norm, 10 per block

    loaded = wo.load_original_umt5(path, torch_dtype=torch.float32).eval()
    ids = torch.randint(3, 256, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        expected = native(ids, attention_mask=mask).last_hidden_state
        assert torch.equal(loaded(ids, attention_mask=mask).last_hidden_state, expected)
    assert same_tensors(wo.umt5_to_original(loaded.state_dict()), saved)


# ------------------------------------------------------------------------------------------------ release preset


def write_release_standin(root: Path) -> Path:
    """A stand-in for a download of Alibaba-DAMO-Academy/LumosX: tiny random weights, the release's file names."""
    models = root / "LumosX_models"
    model = tiny_transformer(seed=3)
    wo.export_original_transformer(model, models / "LumosX.pt")  # + LumosX.json with Wan's num_heads
    wo.export_original_umt5(tiny_umt5(seed=4), models / wo.T5_FILE)
    wo.export_original_vae(tiny_vae(seed=5), models / "vae.pth")
    build_tiny_tokenizer().save_pretrained(str(models / "umt5-xxl"))
    return root


def test_release_files_are_found_and_ambiguity_is_reported(tmp_path):
    root = write_release_standin(tmp_path / "LumosX")
    files = wo.find_release_files(root)
    assert {k: p.name for k, p in files.items()} == {
        "text_encoder": wo.T5_FILE,
        "tokenizer": "umt5-xxl",
        "vae": "vae.pth",
        "transformer": "LumosX.pt",
    }
    torch.save({}, root / "LumosX_models" / "other.pt")
    with pytest.raises(ModelLoadError, match="transformer_path"):
        wo.find_release_files(root)
    with pytest.raises(ModelLoadError, match="huggingface-cli download"):
        wo.find_release_files(tmp_path / "nowhere")


def test_infer_with_the_release_preset_end_to_end(tmp_path, capsys):
    root = write_release_standin(tmp_path / "LumosX")
    cases = tmp_path / "cases"
    case_folder(cases)
    overrides = {
        "model.pretrained": str(root),
        "model.text_len": 64,
        "height": 32,
        "width": 48,
        "num_frames": 5,
        "steps": 2,
        "device": "cpu",
        "dtype": "fp32",
        "condition_slots": "null",
    }
    argv = ["infer", "--preset", "lumosx_release", "--cases", str(cases), "--out", str(tmp_path / "out")]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    assert main(argv) == 0
    out = tmp_path / "out" / "case_0.mp4"
    assert str(out) in capsys.readouterr().out
    with av.open(str(out)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 5 and (frames[0].width, frames[0].height) == (48, 32)


def test_cli_exports_a_trained_transformer_to_the_wan_layout(tmp_path, capsys):
    model = tiny_transformer(seed=6)
    model.save_pretrained(tmp_path / "run" / "transformer")
    out = tmp_path / "lumosx_finetuned.pt"
    assert main(["export", "--transformer", str(tmp_path / "run"), "--out", str(out), "--dtype", "bf16"]) == 0
    assert str(out) in capsys.readouterr().out
    saved = torch.load(out, weights_only=True)
    assert saved.keys() >= WAN_TRANSFORMER_NAMES and all(v.dtype == torch.bfloat16 for v in saved.values())
    loaded = wo.load_original_transformer(out).state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(loaded[name], value.to(torch.bfloat16).float())


def test_training_starts_from_the_released_weights(tmp_path):
    from model_fixtures import sample, write_shards

    from lumosx_model.config import TrainConfig
    from lumosx_model.train import Trainer

    root = write_release_standin(tmp_path / "LumosX")
    shards = write_shards(tmp_path / "shards", [sample(f"r{i}", persons=2, seed=i) for i in range(2)])
    cfg = TrainConfig.preset(
        "lumosx_release_finetune",
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        mixed_precision="no",
        model={"pretrained": str(root), "text_len": 64, "gradient_checkpointing": False},
        data={
            "shards": shards,
            "buckets": [[32, 48]],
            "num_frames": 5,
            "num_workers": 0,
            "condition_slots": None,
            "whole_person_prob": 1.0,
        },
        optim={"warmup_steps": 0},
    )
    assert cfg.model.relational.mcam_mode == "release" and cfg.data.whole_person_as_object
    trainer = Trainer(cfg)
    start = {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
    released = wo.load_original_transformer(root / "LumosX_models" / "LumosX.pt").state_dict()
    assert same_tensors(start, released)  # the run starts from the released transformer
    assert trainer.encoders.source_id.startswith("wan:")
    batch = next(iter(trainer.loader))
    assert all(layout.num_groups == 0 for layout in batch.layouts)  # whole persons as non-human entries
    assert math.isfinite(trainer.fit()[0])
    trainer.close()


def test_full_size_key_maps_and_config_without_weights():
    from accelerate import init_empty_weights

    with init_empty_weights():  # the real 1.3B transformer and Wan2.1 VAE, parameters on the meta device
        model = RelationalWanTransformer.from_config(RelationalWanTransformer.full_config())
        vae = AutoencoderKLWan()
    original = wo.transformer_to_original(model.state_dict())  # verified against diffusers' converter
    assert len(original) == 825 and original.keys() >= WAN_TRANSFORMER_NAMES | {"blocks.29.norm3.bias"}
    config = wo.transformer_config_from_original(original)
    assert (config["num_attention_heads"], config["attention_head_dim"], config["num_layers"]) == (
        12,
        128,
        30,
    )
    assert (config["ffn_dim"], config["text_dim"], config["freq_dim"]) == (8960, 4096, 256)
    assert wo.vae_to_original(vae.state_dict()).keys() >= WAN_VAE_NAMES
