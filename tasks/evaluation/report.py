"""The evaluation's outputs: per-video Parquet, failures Parquet, summary JSON and a markdown table shaped like the
paper's (identity-consistent: ArcSim, CurSim, ViCLIP-T; subject-consistent: ViCLIP-T, ViCLIP-V, Dynamic, tier-1
face scores, CLIP-T, CLIP-I, DINO-I), plus the binding accuracy and swap rate."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.evaluation import BindingDecision, CaseFailure, EvalSummary, TaskSummary, VideoMetrics
from tasks.base import atomic_write_bytes

METRICS_FILE = "metrics.parquet"
FAILURES_FILE = "failures.parquet"
BINDING_FILE = "binding.parquet"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"

_LABELS = {
    "viclip_t": "ViCLIP-T",
    "viclip_v": "ViCLIP-V",
    "dynamic": "Dynamic",
    "clip_t": "CLIP-T",
    "clip_i": "CLIP-I",
    "dino_i": "DINO-I",
    "binding_accuracy": "Binding acc.",
    "swap_rate": "Swap rate ↓",
}


def _mean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def task_columns(rows: Sequence[VideoMetrics], task: str) -> list[str]:
    names = sorted({n for r in rows for n in r.identity}) if task == "identity" else []
    tier1 = sorted({n for r in rows for n in r.tier1_face})
    if task == "identity":
        return [f"identity_{n}" for n in names] + ["viclip_t", "dynamic"]
    return [
        "viclip_t",
        "viclip_v",
        "dynamic",
        *[f"tier1_face_{n}" for n in tier1],
        "clip_t",
        "clip_i",
        "dino_i",
        "binding_accuracy",
        "swap_rate",
    ]


def summarise(
    rows: Sequence[VideoMetrics],
    method: str,
    profile: str,
    models: dict[str, Any],
    missing: Sequence[str] = (),
) -> EvalSummary:
    tasks = []
    for task in ("identity", "subject"):
        mine = [r for r in rows if r.task == task]
        if not mine:
            continue
        flat = [r.flat() for r in mine]
        columns = task_columns(mine, task)
        metrics = {c: _mean([f.get(c, math.nan) for f in flat]) for c in columns}
        counts = {c: sum(_present(f.get(c)) for f in flat) for c in columns}
        by_subjects = {
            str(n): {c: _mean([f.get(c, math.nan) for f in flat if f["num_subjects"] == n]) for c in columns}
            for n in sorted({f["num_subjects"] for f in flat})
        }
        if task == "subject":  # pooled over every attribute decision, not per video
            decisions = [d for r in mine for d in r.binding]
            if decisions:
                metrics["binding_accuracy_pooled"] = sum(d.outcome == "correct" for d in decisions) / len(
                    decisions
                )
                metrics["swap_rate_pooled"] = sum(d.outcome == "swapped" for d in decisions) / len(decisions)
        failures = Counter(reason for r in mine for reason in {f.reason for f in r.failures})
        random = sorted({m for r in mine for m in r.random_weight_metrics})
        tasks.append(
            TaskSummary(
                task=task,
                videos=len(mine),
                metrics=metrics,
                counts=counts,
                by_subjects=by_subjects,
                failures=dict(failures),
                random_weight_metrics=random,
            )
        )
    return EvalSummary(
        method=method, profile=profile, tasks=tasks, models=models, videos_missing=list(missing)
    )


def _label(column: str) -> str:
    for prefix in ("identity_", "tier1_face_"):
        if column.startswith(prefix):
            return column[len(prefix) :]
    return _LABELS.get(column, column)


def _fmt(v: float) -> str:
    return "–" if v is None or math.isnan(v) else f"{v:.4f}"


def summary_markdown(summary: EvalSummary) -> str:
    out = [f"# Evaluation: {summary.method} (profile {summary.profile})", ""]
    for t in summary.tasks:
        title = "Identity-consistent" if t.task == "identity" else "Subject-consistent"
        cols = [c for c in t.metrics if not c.endswith("_pooled")]
        out += [f"## {title} ({t.videos} videos)", ""]
        out.append("| Method | " + " | ".join(_label(c) for c in cols) + " |")
        out.append("|---" * (len(cols) + 1) + "|")
        out.append(f"| {summary.method} | " + " | ".join(_fmt(t.metrics[c]) for c in cols) + " |")
        if len(t.by_subjects) > 1:  # the paper's mix has 1-, 2- and 3-person cases: where does a method drop?
            for n, means in t.by_subjects.items():
                out.append(f"| {n} subject(s) | " + " | ".join(_fmt(means[c]) for c in cols) + " |")
        out += [
            "",
            "Videos with a value: " + ", ".join(f"{_label(c)} {t.counts.get(c, 0)}" for c in cols) + ".",
        ]
        if "binding_accuracy_pooled" in t.metrics:
            out += [
                "",
                f"Binding over all attribute decisions: accuracy {_fmt(t.metrics['binding_accuracy_pooled'])}, "
                f"swap rate {_fmt(t.metrics['swap_rate_pooled'])}.",
            ]
        if t.random_weight_metrics:
            out += [
                "",
                f"**Random-weight test builds produced {', '.join(t.random_weight_metrics)}: "
                "those numbers are not data.**",
            ]
        if t.failures:
            out += ["", "| failure reason | videos |", "|---|---|"]
            out += [f"| {k} | {v} |" for k, v in sorted(t.failures.items(), key=lambda kv: -kv[1])]
        out.append("")
    if summary.videos_missing:
        out.append(
            f"No generated video for {len(summary.videos_missing)} case(s): "
            + ", ".join(summary.videos_missing[:20])
        )
    return "\n".join(out) + "\n"


def _write_table(rows: list[dict[str, Any]], path: Path, empty_columns: Sequence[str]) -> None:
    table = (
        pa.Table.from_pylist(rows) if rows else pa.table({c: pa.array([], pa.null()) for c in empty_columns})
    )
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def _json_safe(value: Any) -> Any:
    """NaN is not JSON: write null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_outputs(out_dir: str | Path, rows: Sequence[VideoMetrics], summary: EvalSummary) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        name: out / name for name in (METRICS_FILE, FAILURES_FILE, BINDING_FILE, SUMMARY_JSON, SUMMARY_MD)
    }
    flat = [r.flat() for r in rows]
    columns = sorted({c for f in flat for c in f})  # every row gets every column (NaN where not computed)
    _write_table(
        [
            {c: f.get(c, math.nan if c.startswith(("identity_", "tier1_")) else None) for c in columns}
            for f in flat
        ],
        paths[METRICS_FILE],
        list(VideoMetrics.model_fields),
    )
    _write_table(
        [f.model_dump() for r in rows for f in r.failures],
        paths[FAILURES_FILE],
        list(CaseFailure.model_fields),
    )
    _write_table(
        [{"key": r.key, **d.model_dump()} for r in rows for d in r.binding],
        paths[BINDING_FILE],
        ["key", *BindingDecision.model_fields],
    )
    atomic_write_bytes(paths[SUMMARY_JSON], json.dumps(_json_safe(summary.model_dump()), indent=2).encode())
    atomic_write_bytes(paths[SUMMARY_MD], summary_markdown(summary).encode())
    return paths
