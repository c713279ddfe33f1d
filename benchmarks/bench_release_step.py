"""Seconds per denoising step and peak memory of the full relational Wan2.1-T2V-1.3B, MCAM ``release`` vs ``exact``.

Random weights of the real 1.3B config in bf16 (the timing does not depend on the values), one CFG step as
``lumosx-train infer`` runs it: batch 2 (positive + negative prompt), 512 text tokens, 480×832×81 (21×30×52
latent tokens = 32,760 video tokens) and 3 subjects (background + object + 3 × (face + 2 attributes) = 11
condition frames, 17,160 condition tokens). Backend ``auto`` (FlexAttention block mask for the CSAM on CUDA;
``release`` adds its pooled float bias through SDPA on the condition rows, ``exact`` its ``score_mod``).

    python benchmarks/bench_release_step.py --device cuda            # the real shapes (needs a GPU, ~10 GB)
    python benchmarks/bench_release_step.py --small                  # tiny config on the CPU (checks the script)
"""

from __future__ import annotations

import argparse
import time

import torch

from lumosx_model.layout import Condition, SampleLayout
from lumosx_model.relational import RelationalConfig
from lumosx_model.transformer import RelationalWanTransformer
from lumosx_model.wan_original import materialize

LAYOUT = SampleLayout.from_conditions(
    [Condition("background", "kitchen"), Condition("object", "cutting board")]
    + [
        c
        for g, (who, a1, a2) in enumerate(
            [("man", "white jacket", "watch"), ("woman", "red dress", "scarf"), ("child", "cap", "backpack")]
        )
        for c in (Condition("face", who, g), Condition("attribute", a1, g), Condition("attribute", a2, g))
    ]
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny config and 5×32×48 video (CPU smoke run)")
    parser.add_argument(
        "--modes", nargs="+", default=["release", "exact"], choices=["paper", "release", "exact"]
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = RelationalWanTransformer.tiny_config() if args.small else RelationalWanTransformer.full_config()
    frames, height, width = (5, 32, 48) if args.small else (81, 480, 832)
    with torch.device(device):
        model = RelationalWanTransformer.from_config(config).eval()
    model = materialize(model, dtype, device)  # bf16, norms / time embedder in fp32 as from_pretrained
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}  device: {device}  dtype: {dtype}")
    grid = ((frames - 1) // 4 + 1, height // 16, width // 16)
    n = len(LAYOUT)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, grid[0], height // 8, width // 8, generator=g).to(device, dtype)
    conds = torch.randn(2, n, 16, height // 8, width // 8, generator=g).to(device, dtype)
    text = torch.randn(2, 512 if not args.small else 64, config["text_dim"], generator=g).to(device, dtype)
    templates = torch.zeros(2, n, text.shape[1], device=device)
    templates[:, :, :40] = torch.randint(-1, 2, (n, 40), generator=g).float().to(device)
    t = torch.full((2,), 500.0, device=device)
    print(f"video tokens: {grid[0] * grid[1] * grid[2]:,}  condition tokens: {n * grid[1] * grid[2]:,}")
    for mode in args.modes:
        relational = RelationalConfig(mcam_mode=mode, backend="auto")

        def step(relational=relational):
            with torch.no_grad():
                return model(
                    latents,
                    t,
                    text,
                    cond_latents=conds,
                    layouts=[LAYOUT] * 2,
                    mcam_templates=templates,
                    relational=relational,
                )

        step()  # warm-up: compiles the FlexAttention kernels
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.repeats):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.repeats
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        print(f"{mode:8s} {seconds:8.3f} s/step (CFG batch 2)   peak {peak:6.2f} GiB")


if __name__ == "__main__":
    main()
