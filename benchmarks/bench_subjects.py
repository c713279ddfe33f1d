r"""Subject-consistent stages: seconds per video of entities, masks and background, and FLUX calls per sample.

    .venv/bin/python benchmarks/bench_subjects.py [--rounds 3] [--profile test]

Runs the stages on the sample videos (two_people: 2 subjects, 3 attributes, 2 objects, a background phrase;
astronaut_zoom: 1 subject, no background phrase) with the models of the profile (`test`: tiny random builds).
Random weights answer garbage, so the entities stage is timed on its real model (it fails with invalid_json,
which costs the same generation time) and the later stages then run on the scripted answers the tests use
(tests/subject_fixtures.py), with every phrase grounded (thresholds 0) so SAM sees the full workload.
Model loading is timed apart from processing. The FLUX count is the number of images FLUX Fill generated per
sample (target: 1, i.e. only the selected background keyframe is inpainted, plus retries the plate check asks
for) and the number of pipeline calls per batch.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the scripted world of the tests: one copy of it, not two


class CountingPipe:
    """Wraps a FluxFillPipeline: one entry per pipeline call, holding the number of images it generated."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __call__(self, **kwargs):
        self.calls.append(len(kwargs["prompt"]))
        return self.pipe(**kwargs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="test")
    p.add_argument("--rounds", type=int, default=3, help="fresh sets of videos; the median is reported")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)  # expected failures (random answers) are not news here

    from subject_fixtures import ScriptedEntities, build_world

    from flows.sample_data import make_sample_videos
    from schemas.config import load_config
    from tasks.background import BackgroundRecord, BackgroundStage
    from tasks.entities import EntitiesStage
    from tasks.masks import MasksStage
    from tasks.runner import run_stage

    config = load_config(
        args.profile, {"masks": {"grounder": {"options": {"box_threshold": 0.0, "text_threshold": 0.0}}}}
    )
    names = ("two_people", "astronaut_zoom")
    tmp = Path(tempfile.mkdtemp(prefix="bench-subjects-"))
    videos = make_sample_videos(tmp / "videos")

    load: dict[str, float] = {}
    per_video: dict[str, list[float]] = {"entities": [], "masks": [], "background": []}
    flux_per_sample: list[int] = []
    pipe_calls: list[list[int]] = []
    for _ in range(args.rounds):
        world = build_world(videos, names, config)
        items = world.items()
        stages = {
            "entities": EntitiesStage(config),
            "masks": MasksStage(config),
            "background": BackgroundStage(config),
        }
        for name, stage in stages.items():
            t0 = time.perf_counter()
            stage.setup()  # cached per process: only the first round pays for loading
            load[name] = load.get(name, 0.0) + time.perf_counter() - t0
            if name == "background":
                if not isinstance(stage.inpainter.pipe, CountingPipe):
                    stage.inpainter.pipe = CountingPipe(stage.inpainter.pipe)
                stage.inpainter.pipe.calls.clear()
            if name == "entities":
                # Random weights answer garbage: time the real model on copies, then go on with the scripted
                # answers (not timed).
                import copy

                trial = copy.deepcopy(items)
                stats = run_stage(stage, trial)
                run_stage(EntitiesStage(config, generator=ScriptedEntities()), items)
            else:
                stats = run_stage(stage, items)
            per_video[name].append(stats.seconds / len(items))
            assert all(c.failure is None for c in items), (name, [c.failure for c in items])
        for ctx in items:
            rec = ctx.record("background", BackgroundRecord)
            if rec.status != "skipped":
                flux_per_sample.append(rec.flux_calls)
        pipe_calls.append(list(stages["background"].inpainter.pipe.calls))

    print(f"profile {args.profile}, {len(names)} videos per batch, {args.rounds} rounds (median), CPU")
    print(f"{'stage':<12} {'load s':>8} {'s / video':>10}")
    for name, times in per_video.items():
        print(f"{name:<12} {load[name]:>8.2f} {statistics.median(times):>10.3f}")
    print(f"FLUX generations per sample with a background: {flux_per_sample} (target 1 each)")
    print(f"FLUX pipeline calls per batch (images per call): {pipe_calls}")


if __name__ == "__main__":
    main()
