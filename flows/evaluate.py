"""The `evaluate` flow: generated videos + their benchmark cases -> per-video metrics, failures and a summary.

    lumosx-train infer --cases bench/subject_consistent --out gen/subject
    lumosx-eval --videos gen/subject --cases bench/subject_consistent --out eval/subject

Inputs are what `lumosx-train infer` writes (`<videos>/<key>.mp4`) and what `build-benchmark` writes
(`<cases>/<key>/` in the official layout, ground-truth clips in `<cases>/../ground_truth/<key>.mp4`). Prefect
runs one task per batch of videos (not per metric and video); models load once per worker process and every
video's frames stay inside its task. The summary is published as a markdown artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from models.base import ModelLoadError
from schemas.evaluation import EvalConfig, EvalSummary, VideoMetrics
from tasks.evaluation.inputs import EvalItem, pair_inputs
from tasks.evaluation.report import summarise, summary_markdown, write_outputs
from tasks.evaluation.runner import Evaluator

logger = logging.getLogger(__name__)

_EVALUATORS: dict[str, Evaluator] = {}


def artifact_key(out: str) -> str:
    """Prefect artifact keys allow lower-case letters, digits and dashes: one key per output folder."""
    return "evaluate-summary-" + hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:10]


def evaluator_for(cfg: EvalConfig) -> Evaluator:
    """One Evaluator (and so one set of loaded models) per configuration per process."""
    key = cfg.model_dump_json()
    if key not in _EVALUATORS:
        _EVALUATORS[key] = Evaluator(cfg)
    return _EVALUATORS[key]


def check_weights(cfg: EvalConfig, tasks: set[str]) -> None:
    """Refuse, in one line naming every missing model, a run whose weights are not here and cannot be fetched
    (before minutes of loading, not after)."""
    from models.weights import missing

    problems = [f"{role}: {why}" for role, spec in cfg.specs_for(tasks).items() if (why := missing(spec))]
    if problems:
        raise ModelLoadError("models not available: " + "; ".join(problems))


def plan(
    videos: str, cases: str, ground_truth: str | None, profile: str, overrides: dict[str, Any] | None
) -> tuple[EvalConfig, list[EvalItem], list[str]]:
    cfg = EvalConfig.from_profile(profile, overrides)
    items = pair_inputs(videos, cases, ground_truth)
    if not items:
        raise FileNotFoundError(f"no case folders (with caption.txt) under {cases}")
    check_weights(cfg, {i.task for i in items})
    missing = [i.key for i in items if i.video is None]
    return cfg, items, missing


def evaluate_batch(cfg: EvalConfig, items: list[EvalItem]) -> list[VideoMetrics]:
    ev = evaluator_for(cfg)
    return [ev.evaluate(item) for item in items]


def finish(
    cfg: EvalConfig,
    rows: list[VideoMetrics],
    items: list[EvalItem],
    missing: list[str],
    out: str,
    method: str,
) -> EvalSummary:
    models = evaluator_for(cfg).load({i.task for i in items})  # already built: only reads their ModelInfo
    summary = summarise(rows, method, cfg.profile, models, missing)
    write_outputs(out, rows, summary)
    return summary


def run_evaluation(
    videos: str,
    cases: str,
    out: str,
    *,
    profile: str = "paper",
    overrides: dict[str, Any] | None = None,
    ground_truth: str | None = None,
    method: str = "LumosX",
) -> EvalSummary:
    """The same evaluation without Prefect (one process, in order): what `lumosx-eval --no-prefect` runs."""
    cfg, items, missing = plan(videos, cases, ground_truth, profile, overrides)
    evaluator_for(cfg).load({i.task for i in items})
    rows = evaluate_batch(cfg, [i for i in items if i.video is not None])
    return finish(cfg, rows, items, missing, out, method)


@task(
    name="evaluate-batch",
    task_run_name="evaluate-batch-{number}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=1,
    retry_delay_seconds=5,
)
def evaluate_batch_task(cfg: EvalConfig, items: list[EvalItem], number: int) -> list[VideoMetrics]:
    return evaluate_batch(cfg, items)


# One worker thread: the batches share this process's single copy of each model (the GPU is the bottleneck, and
# dlib/ONNX/torch models are not all safe to call from several threads). Scale out with flow runs over disjoint
# case folders.
@flow(name="evaluate", validate_parameters=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def evaluate(
    videos: str,
    cases: str,
    out: str,
    profile: str = "paper",
    overrides: dict[str, Any] | None = None,
    ground_truth: str | None = None,
    method: str = "LumosX",
) -> dict[str, Any]:
    """Score every generated video under `videos` against its case under `cases`; write `out`/metrics.parquet,
    failures.parquet, binding.parquet, summary.json and summary.md; publish the summary as an artifact."""
    log = get_run_logger()
    cfg, items, missing = plan(videos, cases, ground_truth, profile, overrides)
    evaluator_for(cfg).load({i.task for i in items})  # a model that cannot load stops the run here, once
    todo = [i for i in items if i.video is not None]
    batches = [todo[i : i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
    futures = [evaluate_batch_task.submit(cfg, batch, n) for n, batch in enumerate(batches)]
    rows = [row for f in futures for row in f.result()]
    summary = finish(cfg, rows, items, missing, out, method)
    with contextlib.suppress(Exception):  # the summary is on disk too
        create_markdown_artifact(summary_markdown(summary), key=artifact_key(out), description=out)
    if missing:
        log.warning("%d case(s) have no generated video: %s", len(missing), ", ".join(missing[:10]))
    log.info("evaluated %d videos into %s", len(rows), out)
    return summary.model_dump()
