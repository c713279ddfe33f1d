"""How many replicas of each stage, on which node: a plan made once from the cluster's nodes and the config.

Pure arithmetic (no Ray), so it is tested on made-up clusters and printed before a run starts.

1. Every stage gets its `replicas.min` first (a run cannot start without one replica of each stage): if that does
   not fit, `PlacementError` says which stage needs what.
2. Spare resources then go, one replica at a time, to the stage with the lowest throughput
   (replicas / `seconds_per_video`) that still fits somewhere and is under its `replicas.max`. Replicas therefore
   grow in proportion to each stage's cost, the pipeline stays balanced, and a bigger cluster needs no new config.
   Growth stops when nothing fits, or when every stage that could still grow is already faster than the slowest
   stage that cannot: more replicas there would only wait.

GPUs are packed the way Ray packs them: a fractional request shares one physical GPU (best fit, keeping whole
GPUs free for whole-GPU stages); a request of n >= 1 takes n free GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.config import StageResources

HEADROOM = 1.0
"""Stop growing a stage once its throughput exceeds the slowest saturated stage's by this factor."""


class PlacementError(RuntimeError):
    """The cluster cannot hold the minimum replicas of some stage."""


@dataclass
class NodeCapacity:
    node_id: str
    cpus: float
    gpus: int = 0
    memory_gb: float = float("inf")
    gpu_free: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.gpu_free:
            self.gpu_free = [1.0] * self.gpus

    def gpu_slots(self, request: float) -> list[int] | None:
        """GPU indices a replica asking for `request` GPUs would take here, or None if it does not fit."""
        if request <= 0:
            return []
        if request < 1:
            fits = [i for i, free in enumerate(self.gpu_free) if free + 1e-9 >= request]
            return [min(fits, key=lambda i: (self.gpu_free[i], i))] if fits else None
        whole = [i for i, free in enumerate(self.gpu_free) if free >= 1 - 1e-9]
        n = int(round(request))
        return whole[:n] if len(whole) >= n else None

    def fits(self, res: StageResources) -> list[int] | None:
        if res.num_cpus > self.cpus + 1e-9 or (res.memory_gb or 0) > self.memory_gb + 1e-9:
            return None
        return self.gpu_slots(res.num_gpus)

    def take(self, res: StageResources, slots: list[int]) -> None:
        self.cpus -= res.num_cpus
        self.memory_gb -= res.memory_gb or 0
        share = res.num_gpus if res.num_gpus < 1 else 1.0
        for i in slots:
            self.gpu_free[i] -= share


@dataclass(frozen=True)
class Replica:
    stage: str
    node_id: str
    gpus: tuple[int, ...] = ()


def plan(nodes: list[NodeCapacity], stages: dict[str, StageResources], order: list[str]) -> list[Replica]:
    """Replicas per stage and node (see the module docstring). `order` is the pipeline's stage order."""
    free = [NodeCapacity(n.node_id, n.cpus, n.gpus, n.memory_gb, list(n.gpu_free)) for n in nodes]
    out: list[Replica] = []
    count = dict.fromkeys(order, 0)

    def place(stage: str) -> bool:
        res = stages[stage]
        best: tuple[tuple, NodeCapacity, list[int]] | None = None
        for node in free:
            slots = node.fits(res)
            if slots is None:
                continue
            # GPU stages: the tightest GPU fit; CPU stages: the node with the most free CPUs (spread them).
            rank = (
                (min((node.gpu_free[i] for i in slots), default=0.0), -node.cpus)
                if slots
                else (0.0, -node.cpus)
            )
            if best is None or rank < best[0]:
                best = (rank, node, slots)
        if best is None:
            return False
        _, node, slots = best
        node.take(res, slots)
        out.append(Replica(stage, node.node_id, tuple(slots)))
        count[stage] += 1
        return True

    for stage in order:
        for _ in range(stages[stage].replicas.min):
            if not place(stage):
                res = stages[stage]
                total_gpus = sum(n.gpus for n in nodes)
                raise PlacementError(
                    f"stage {stage} needs {res.replicas.min} replica(s) of {res.num_cpus:g} CPU, {res.num_gpus:g} GPU"
                    + (f", {res.memory_gb:g} GB" if res.memory_gb else "")
                    + f"; after the stages before it the cluster ({len(nodes)} node(s), {total_gpus} GPU(s)) has "
                    f"no node with room for one. Lower run.stages.{stage}.num_gpus / num_cpus, or use a profile "
                    "made for this machine (--profile offline on CPUs)"
                )

    def throughput(stage: str) -> float:
        return count[stage] / stages[stage].seconds_per_video

    growing = [s for s in order if stages[s].replicas.max is None or count[s] < stages[s].replicas.max]
    while growing:
        saturated = [s for s in order if s not in growing]
        bound = min((throughput(s) for s in saturated), default=float("inf"))
        stage = min(growing, key=lambda s: (throughput(s), order.index(s)))
        if throughput(stage) >= bound * HEADROOM:
            break  # every stage that could grow already keeps pace with the slowest one that cannot
        if not place(stage):
            growing.remove(stage)
            continue
        limit = stages[stage].replicas.max
        if limit is not None and count[stage] >= limit:
            growing.remove(stage)
    return out


def describe(replicas: list[Replica]) -> str:
    """One line per node: which stages run there, how many replicas, on which GPUs."""
    by_node: dict[str, dict[str, list[tuple[int, ...]]]] = {}
    for r in replicas:
        by_node.setdefault(r.node_id, {}).setdefault(r.stage, []).append(r.gpus)
    lines = []
    for node, stages in by_node.items():
        parts = []
        for stage, gpus in stages.items():
            used = sorted({g for gs in gpus for g in gs})
            parts.append(f"{stage} x{len(gpus)}" + (f" (GPU {','.join(map(str, used))})" if used else ""))
        lines.append(f"node {node[:12]}: " + ", ".join(parts))
    return "\n".join(lines)
