"""Replica placement on made-up clusters: minimums first, then spare resources in proportion to each stage's cost."""

from __future__ import annotations

from collections import Counter

import pytest

from schemas.config import STAGE_NAMES, StageResources, load_config
from tasks.placement import NodeCapacity, PlacementError, describe, plan


def res(cpus=1.0, gpus=0.0, spv=1.0, min_=1, max_=None, mem=None) -> StageResources:
    return StageResources.model_validate(
        {
            "num_cpus": cpus,
            "num_gpus": gpus,
            "seconds_per_video": spv,
            "memory_gb": mem,
            "replicas": {"min": min_, "max": max_},
        }
    )


def counts(replicas) -> Counter:
    return Counter(r.stage for r in replicas)


def test_a_gpu_stage_fills_every_gpu_of_every_node():
    nodes = [NodeCapacity("a", cpus=8, gpus=4), NodeCapacity("b", cpus=8, gpus=4)]
    out = plan(nodes, {"caption": res(gpus=1)}, ["caption"])
    assert counts(out)["caption"] == 8
    assert sorted((r.node_id, r.gpus) for r in out) == [(n, (g,)) for n in "ab" for g in range(4)]


def test_paper_profile_on_one_8_gpu_node_follows_the_written_arithmetic():
    cfg = load_config("paper")
    order = list(STAGE_NAMES)
    node = NodeCapacity("n0", cpus=96, gpus=8, memory_gb=1000)
    out = plan([node], cfg.run.stages, order)
    c = counts(out)
    assert (
        c["caption"] == 1
        and c["entities"] == 1
        and c["persons"] == 1
        and c["faces"] == 1
        and c["masks"] == 1
        and c["binding"] == 1
    )
    assert c["background"] == 5  # FLUX, the slowest stage, gets every GPU left: 1 + 1 + 1 (shared) + 5 = 8
    gpus_used = Counter(g for r in out for g in r.gpus)
    assert len(gpus_used) == 8  # every GPU of the node has work
    shared = {r.gpus for r in out if r.stage in ("persons", "faces", "masks", "binding")}
    assert len(shared) == 1  # YOLO, insightface, GroundingDINO+SAM and CLIP share one GPU (4 x 0.25)


def test_more_nodes_need_no_new_config():
    cfg = load_config("paper")
    order = list(STAGE_NAMES)
    nodes = [NodeCapacity(f"n{i}", cpus=96, gpus=8, memory_gb=1000) for i in range(8)]
    c = counts(plan(nodes, cfg.run.stages, order))
    assert sum(c[s] * cfg.run.stages[s].num_gpus for s in c) >= 63  # at most a shared half GPU left over
    tput = {s: c[s] / cfg.run.stages[s].seconds_per_video for s in ("caption", "entities", "background")}
    assert max(tput.values()) / min(tput.values()) < 2.5  # the GPU stages keep pace with each other


def test_replicas_grow_in_proportion_to_cost_and_stop_at_the_slowest_saturated_stage():
    stages = {"cheap": res(spv=0.1), "dear": res(spv=1.0), "capped": res(spv=2.0, max_=2)}
    out = plan([NodeCapacity("a", cpus=64)], stages, ["cheap", "dear", "capped"])
    c = counts(out)
    assert c["capped"] == 2
    # 'capped' can do 2 / 2.0 = 1 video/s: growing the others past that would only make them wait.
    assert c["dear"] == 1 and c["cheap"] == 1


def test_minimums_that_do_not_fit_say_which_stage_and_what_it_needs():
    with pytest.raises(PlacementError, match=r"stage caption needs 1 replica\(s\) of 4 CPU, 1 GPU"):
        plan(
            [NodeCapacity("cpu-only", cpus=16)],
            {"ingest": res(), "caption": res(cpus=4, gpus=1)},
            ["ingest", "caption"],
        )


def test_fractional_gpus_pack_and_whole_gpus_stay_free():
    node = NodeCapacity("a", cpus=32, gpus=2)
    out = plan([node], {"small": res(gpus=0.5, max_=2), "big": res(gpus=1, max_=1)}, ["small", "big"])
    small = {r.gpus for r in out if r.stage == "small"}
    big = {r.gpus for r in out if r.stage == "big"}
    assert len(small) == 1 and small.isdisjoint(big)  # both halves on one GPU, the other GPU whole for 'big'


def test_memory_is_respected_and_the_plan_is_printable():
    out = plan([NodeCapacity("a", cpus=32, memory_gb=40)], {"vlm": res(mem=16)}, ["vlm"])
    assert counts(out)["vlm"] == 2
    assert "vlm x2" in describe(out)
