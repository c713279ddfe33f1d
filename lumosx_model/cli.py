"""``lumosx-train``: train, cache encoder outputs, and generate from official case folders.

    lumosx-train train --config lumosx_model/configs/paper_stage1.yaml
    accelerate launch -m lumosx_model.cli train --config stage1.yaml      # many GPUs (DDP / FSDP)
    lumosx-train cache --config stage1.yaml        # video latents + text embeddings
    lumosx-train infer --case cases/case_007 --out out/case_007.mp4 [--config inference.yaml]
    lumosx-train infer --cases cases/ --out out/                              # every case folder under cases/
    lumosx-train infer --preset lumosx_release --cases cases/ --out out/      # the authors' released weights
    lumosx-train export --transformer runs/x/transformer --out lumosx.pt      # to the original Wan layout

``--preset NAME`` loads a bundled config (tiny, paper_stage1, paper_stage2, inference, inference_tiny,
lumosx_release, lumosx_release_finetune) instead of ``--config``; ``--set a.b=value`` overrides single fields
(YAML-parsed values).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# Nothing heavy at import: `lumosx-train --help` must answer at once. The config models import torch (through
# lumosx_model.relational), so every command imports what it needs when it runs.


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lumosx-curate")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "unknown (not installed)"


def _load(args: argparse.Namespace, default_preset: str) -> dict:
    import yaml

    from lumosx_model.config import deep_update, preset_path, read_yaml

    source = Path(args.config) if args.config else preset_path(args.preset or default_preset)
    data = read_yaml(source)
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        update: dict = {}
        node = update
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
        data = deep_update(data, update)
    return data


def _train(args: argparse.Namespace) -> int:
    from lumosx_model.config import TrainConfig
    from lumosx_model.train import train

    cfg = TrainConfig.model_validate(_load(args, "paper_stage1"))
    losses = train(cfg)
    if losses:
        logging.info("done: %d steps, last loss %.4f", len(losses), losses[-1])
    return 0


def _cache(args: argparse.Namespace) -> int:
    import torch
    from accelerate import PartialState

    from lumosx_model.components import load_encoders
    from lumosx_model.config import TrainConfig
    from lumosx_model.data import LatentCache, fill_cache

    cfg = TrainConfig.model_validate(_load(args, "paper_stage1"))
    if cfg.data.cache_dir is None:
        raise SystemExit("set data.cache_dir (and temporal_crop: start or center) to build a cache")
    state = PartialState()  # rank and device under `accelerate launch`; shards are split by node
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision, torch.float32)
    encoders = load_encoders(cfg.model, device=state.device, dtype=dtype)
    cache = LatentCache(
        cfg.data.cache_dir,
        encoder_fingerprint=encoders.fingerprint,
        num_frames=cfg.data.num_frames,
        fps=cfg.data.fps,
        temporal_crop=cfg.data.temporal_crop,
    )
    written, skipped = fill_cache(cfg.data, encoders, cache)
    print(f"rank {state.process_index}: cached {written} samples, skipped {skipped} -> {cache.dir}")
    return 0


def _infer(args: argparse.Namespace) -> int:
    from lumosx_model.config import InferenceConfig
    from lumosx_model.inference import LumosXGenerator, generate_case

    cfg = InferenceConfig.model_validate(_load(args, "inference"))
    generator = LumosXGenerator.from_config(cfg)
    if args.case:
        out = Path(args.out)
        print(
            generate_case(
                args.case,
                out if out.suffix == ".mp4" else out / f"{Path(args.case).name}.mp4",
                cfg,
                generator,
            )
        )
        return 0
    cases = sorted(p for p in Path(args.cases).iterdir() if (p / "caption.txt").is_file())
    if not cases:
        raise SystemExit(f"no case folders (with caption.txt) under {args.cases}")
    failed = 0
    for case in cases:
        try:
            print(generate_case(case, Path(args.out) / f"{case.name}.mp4", cfg, generator))
        except ValueError as err:  # a malformed case is reported, the others still run
            failed += 1
            print(f"{case}: {type(err).__name__}: {err}", file=sys.stderr)
    return 1 if failed else 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from lumosx_model.components import load_transformer
    from lumosx_model.config import ModelConfig
    from lumosx_model.wan_original import export_original_transformer

    model = load_transformer(ModelConfig(transformer_path=args.transformer))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.dtype]
    print(export_original_transformer(model, args.out, dtype=dtype))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lumosx-train", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        group = p.add_mutually_exclusive_group()
        group.add_argument("--config", help="YAML config file")
        group.add_argument("--preset", help="bundled config name")
        p.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. max_steps=10"
        )

    common(sub.add_parser("train", help="train (resumes from the latest checkpoint by default)"))
    common(sub.add_parser("cache", help="precompute video latents and text embeddings"))
    infer = sub.add_parser("infer", help="generate videos from official case folders")
    common(infer)
    target = infer.add_mutually_exclusive_group(required=True)
    target.add_argument("--case", help="one case folder")
    target.add_argument("--cases", help="a folder of case folders")
    infer.add_argument("--out", required=True, help="mp4 path (one case) or output folder")
    export = sub.add_parser("export", help="write a trained transformer in the original Wan2.1 layout")
    export.add_argument("--transformer", required=True, help="a run dir, its transformer/, or a checkpoint")
    export.add_argument("--out", required=True, help="a .pt/.pth/.safetensors file, or a folder")
    export.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return {"train": _train, "cache": _cache, "infer": _infer, "export": _export}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
