r"""Seconds per image of the mask and background models: GroundingDINO, SAM (both backends), FLUX Fill.

By default every model is its tiny random-weight test build (what CI can run); pass real weights to measure
the production models on a GPU, e.g.

    python benchmarks/bench_masks.py --device cuda --dtype bfloat16 \
        --grounding-weights IDEA-Research/grounding-dino-base --sam-weights sam_vit_h_4b8939.pth \
        --flux-weights black-forest-labs/FLUX.1-Fill-dev --size 1280x720 --flux-steps 50
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from models.base import ModelSpec
from models.grounding import GROUNDERS
from models.inpainter import INPAINTERS, clean_plates
from models.segmenter import SEGMENTERS
from schemas.records import Box
from tasks.mask_ops import box_mask, foreground_union


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first calls pay for lazy init and kernel selection
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def spec(backend: str, weights: str | None, args, **options) -> ModelSpec:
    return ModelSpec(
        backend=backend,
        weights=weights,
        random_init=weights is None,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch,
        options=options,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--size", default="128x96", help="frame WxH")
    p.add_argument("--batch", type=int, default=4, help="images per call (and spec.batch_size)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--grounding-weights")
    p.add_argument("--sam-weights")
    p.add_argument("--sam-hf-weights")
    p.add_argument("--flux-weights")
    p.add_argument("--flux-steps", type=int, default=2)
    args = p.parse_args()

    w, h = (int(v) for v in args.size.lower().split("x"))
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for _ in range(args.batch)]
    person = Box(x0=w * 0.25, y0=h * 0.1, x1=w * 0.6, y1=h * 0.95)
    obj = Box(x0=w * 0.65, y0=h * 0.5, x1=w * 0.9, y1=h * 0.9)
    rows: list[tuple[str, str, float]] = []

    def label(adapter) -> str:
        return "tiny, random weights" if adapter.info.random_weights else str(adapter.info.model_id)

    # A person crop with three attribute phrases, plus an object search on the whole frame.
    grounder = GROUNDERS.build(spec("grounding-dino", args.grounding_weights, args))
    phrases = [["black shirt", "blue jeans", "watch"]] * args.batch
    t = timed(lambda: grounder.detect(frames, phrases, [person] * args.batch), args.repeats)
    rows.append(("grounding-dino, person region, 3 phrases", label(grounder), t / args.batch))
    t = timed(lambda: grounder.detect(frames, [["wooden cutting board"]] * args.batch), args.repeats)
    rows.append(("grounding-dino, full frame, 1 phrase", label(grounder), t / args.batch))

    boxes = [
        [person, obj, Box(x0=person.x0, y0=person.y0, x1=person.x1, y1=person.y0 + h * 0.3)]
    ] * args.batch
    for backend, weights in (("sam", args.sam_weights), ("sam-hf", args.sam_hf_weights)):
        seg = SEGMENTERS.build(spec(backend, weights, args))
        t = timed(lambda seg=seg: seg.segment(frames, boxes), args.repeats)
        rows.append((f"{backend}, 3 boxes", label(seg), t / args.batch))

    inpainter = INPAINTERS.build(
        spec("flux-fill", args.flux_weights, args, num_inference_steps=args.flux_steps)
    )
    mask = foreground_union([box_mask(person, (h, w)), box_mask(obj, (h, w))], dilate_px=max(2, w // 100))
    t = timed(
        lambda: clean_plates(
            inpainter, frames, [mask] * args.batch, ["modern kitchen"] * args.batch, seeds=0
        ),
        args.repeats,
    )
    rows.append((f"flux-fill, {args.flux_steps} steps", label(inpainter), t / args.batch))

    print(
        f"frame {w}x{h}, batch {args.batch}, device {args.device}, dtype {args.dtype}, median "
        f"of {args.repeats}"
    )
    print(f"{'model':<42} {'weights':<36} {'s / image':>10}")
    for name, weights, sec in rows:
        print(f"{name:<42} {weights:<36} {sec:>10.4f}")


if __name__ == "__main__":
    main()
