"""Cost of LumosX relational attention vs plain attention, per Wan2.1-1.3B layer, as the sequence grows.

One "layer" = self-attention (attn1, with rotary) + text cross-attention (attn2) of a real-size
``WanAttention`` pair (dim 1536, 12 heads × 128, 512 text tokens), run through:

* ``sdpa``        — diffusers' ``WanAttnProcessor`` on the same concatenated sequence, no mask, no bias
                    (what naive sequence concatenation costs; the lower bound);
* ``dense-paper`` — CSAM as an SDPA bool mask + paper-mode MCAM float bias (the released code's recipe);
* ``dense-exact`` — CSAM bool mask + exact MCAM with an explicit softmax;
* ``flex-paper``  — CSAM FlexAttention block mask + paper-mode MCAM bias (SDPA, condition rows only);
* ``dense-release`` / ``flex-release`` — as ``*-paper`` with the released code's pooled arithmetic (padded
                    tile mean, crop after flatten; same cost profile, different tile lookup);
* ``flex-exact``  — CSAM block mask + exact MCAM through a FlexAttention ``score_mod`` (fully fused).

Masks/templates are built once per model forward and shared by all 30 layers, so they are built outside the
timed region (their build time is printed separately). Flex kernels are compiled during warm-up.

Peak memory: CUDA — ``torch.cuda.max_memory_allocated`` above the inputs; CPU — peak resident set size sampled
every millisecond above the level before the timed call (an estimate; CPU freed memory is trimmed first).

    python benchmarks/bench_attention.py                    # CPU, small sizes
    python benchmarks/bench_attention.py --device cuda      # full Wan 480p shapes, up to 32,760 video tokens
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import threading
import time

import torch
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor, WanRotaryPosEmbed

from lumosx_model.attention import RelationalAttnProcessor, RelationalContext, relational_context
from lumosx_model.layout import Condition, SampleLayout
from lumosx_model.masks import csam_block_mask, csam_dense
from lumosx_model.positions import batch_positions, gather_rotary

DIM, HEADS, TEXT = 1536, 12, 512
LAYOUT = SampleLayout.from_conditions(
    [
        Condition("background", "kitchen"),
        Condition("object", "cutting board"),
        Condition("face", "man", 0),
        Condition("attribute", "white jacket", 0),
        Condition("attribute", "watch", 0),
        Condition("face", "woman", 1),
        Condition("attribute", "red dress", 1),
    ]
)
METHODS = ("sdpa", "dense-paper", "dense-release", "dense-exact", "flex-paper", "flex-release", "flex-exact")


class PeakRSS:
    """Samples the process RSS in a thread; ``peak`` is the maximum above the level at entry."""

    def __enter__(self):
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.base = self.peak_abs = self._rss()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop:
            self.peak_abs = max(self.peak_abs, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak_abs, self._rss()) - self.base


def build_layer(device, dtype):
    torch.manual_seed(0)
    attn1 = WanAttention(DIM, HEADS, DIM // HEADS, eps=1e-6, processor=WanAttnProcessor())
    attn2 = WanAttention(
        DIM,
        HEADS,
        DIM // HEADS,
        eps=1e-6,
        cross_attention_dim_head=DIM // HEADS,
        processor=WanAttnProcessor(),
    )
    return attn1.to(device, dtype), attn2.to(device, dtype)


def make_context(method, grid, device, seq_len):
    t0 = time.perf_counter()
    backend = method.split("-")[0]
    if backend == "flex":
        mask = csam_block_mask([LAYOUT], grid, seq_len, device)
    else:
        mask = csam_dense([LAYOUT], grid, seq_len)[:, None].to(device)
    templates = torch.zeros(1, len(LAYOUT), TEXT, device=device)
    templates[0, :, :40] = torch.randint(-1, 2, (len(LAYOUT), 40), device=device).float()
    ctx = RelationalContext(
        num_video_tokens=grid[0] * grid[1] * grid[2],
        grid_hw=grid[1:],
        backend=backend,
        self_mask=mask,
        templates=templates,
        mcam_mode=method.split("-")[1],
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return ctx, time.perf_counter() - t0


def run_layer(attn1, attn2, x, text, rotary, backward):
    out = attn1(x, None, None, rotary)
    out = attn2(x + out, text, None, None)
    if backward:
        out.float().square().mean().backward()
    return out


def measure(method, grid, args, device, dtype, layers):
    attn1, attn2 = layers
    processor = WanAttnProcessor() if method == "sdpa" else RelationalAttnProcessor()
    attn1.set_processor(processor)
    attn2.set_processor(processor)
    t, h, w = grid
    seq_len = t * h * w + len(LAYOUT) * h * w
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, seq_len, DIM, generator=g).to(device, dtype).requires_grad_(args.backward)
    text = torch.randn(1, TEXT, DIM, generator=g).to(device, dtype)
    rope = WanRotaryPosEmbed(DIM // HEADS, (1, 2, 2), 1024).to(device)
    rotary = gather_rotary(rope, batch_positions([LAYOUT], grid, len(LAYOUT)).to(device))
    ctx, build_s = (None, 0.0) if method == "sdpa" else make_context(method, grid, device, seq_len)

    def step():
        with relational_context(ctx), torch.set_grad_enabled(args.backward):
            run_layer(attn1, attn2, x, text, rotary, args.backward)
        x.grad = None
        for p in (*attn1.parameters(), *attn2.parameters()):
            p.grad = None

    step()  # warm-up (compiles flex kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        for _ in range(args.repeats):
            step()
        torch.cuda.synchronize()
        elapsed = (time.perf_counter() - start) / args.repeats
        cpu = float("nan")
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with PeakRSS() as mem:
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(args.repeats):
                step()
            elapsed = (time.perf_counter() - start) / args.repeats
            cpu = (time.process_time() - cpu_start) / args.repeats
        peak = mem.peak
    return seq_len, elapsed, cpu, peak, build_s


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--frames", type=int, nargs="+", help="latent frames per size (default: per device)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--backward", action="store_true", help="time forward + backward (flex skipped on CPU)"
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda requested but CUDA is not available")
        dtype, hw, frames = torch.bfloat16, (30, 52), args.frames or [1, 6, 11, 16, 21]  # 480×832 latents
    else:
        dtype, hw, frames = torch.float32, (8, 8), args.frames or [1, 4, 8, 16]
        torch.set_num_threads(os.cpu_count() or 1)
    methods = [
        m for m in args.methods if not (args.backward and device.type == "cpu" and m.startswith("flex"))
    ]
    layers = build_layer(device, dtype)

    print(
        f"device={device} dtype={dtype} heads={HEADS}x{DIM // HEADS} text={TEXT} conditions={len(LAYOUT)} "
        f"frame={hw[0]}x{hw[1]} tokens {'fwd+bwd' if args.backward else 'fwd'} per layer (attn1+attn2)"
    )
    # On a shared CPU, process CPU time (all threads) is steadier than wall time; the ratio uses it there.
    header = (
        f"{'video tok':>9} {'total tok':>9} {'method':<12} {'wall ms':>9} {'cpu ms':>9} {'vs sdpa':>8} "
        f"{'peak MiB':>9} {'mask ms':>8}"
    )
    print(header)
    print("-" * len(header))
    for t in frames:
        grid = (t, *hw)
        base_ms = None
        for method in methods:
            seq_len, elapsed, cpu, peak, build_s = measure(method, grid, args, device, dtype, layers)
            ms = (elapsed if device.type == "cuda" else cpu) * 1e3
            base_ms = ms if method == "sdpa" else base_ms
            ratio = f"{ms / base_ms:.2f}x" if base_ms else "-"
            print(
                f"{t * hw[0] * hw[1]:>9} {seq_len:>9} {method:<12} {elapsed * 1e3:>9.1f} {cpu * 1e3:>9.1f} "
                f"{ratio:>8} {peak / 2**20:>9.0f} {build_s * 1e3:>8.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
