"""The `build-benchmark` flow: held-out test cases from curated shards, in the official case layout.

The paper's benchmark has 500 cases (220 one-person, 230 two-person, 50 three-person) used by two tasks:
identity-consistent (faces only) and subject-consistent (faces, attributes, objects, background). This flow
draws such a set from curated shards, deterministically by seed, and writes

    <out>/identity_consistent/<key>/...  official layout, faces only
    <out>/subject_consistent/<key>/...   official layout, every condition (v2 samples only)
    <out>/ground_truth/<key>.mp4         the source clip, when the sample has one (ViCLIP-V compares to it)
    <out>/heldout_keys.txt               the selected sample keys
    <out>/heldout_videos.txt             their source videos (content ids)
    <out>/train_exclude.txt              every scanned key from those source videos: training skips these
    <out>/benchmark.json                 what was asked, what was found, shortfalls, failures

Held-out means held out by *source video*, not by sample key: two clips of one video share the same people, so
a benchmark face whose video also fed training would measure memorisation. One case per source video.

Selection order per person-count bucket is a SHA-256 of (seed, key): independent of shard order and of how
many shards are scanned. Cases that qualify for both tasks come first, so the subject-consistent set is as
large as the data allows and both tasks share their cases, as in the paper.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from schemas.sample import SampleMeta
from tasks.base import atomic_write_bytes, atomic_write_json
from tasks.official_export import (
    ExportError,
    ExportFailure,
    ExportReport,
    Task,
    case_from_sample,
    export_samples,
    iter_shard_samples,
    shard_urls,
)

logger = logging.getLogger(__name__)

PAPER_MIX: tuple[int, int, int] = (220, 230, 50)
"""Cases with 1, 2 and 3 persons in the paper's 500-case benchmark."""
TASK_DIRS: dict[Task, str] = {"identity": "identity_consistent", "subject": "subject_consistent"}
GROUND_TRUTH_DIR = "ground_truth"
VIDEO_MEMBER = "mp4"
MANIFEST = "benchmark.json"


@dataclass(frozen=True)
class Candidate:
    """What the selection needs to know about one shard sample (small: no pixels)."""

    key: str
    shard: str
    video: str
    num_persons: int
    identity_ok: bool
    subject_ok: bool
    reason: str | None = None
    """Why the sample cannot be an identity case (the most permissive task), if it cannot."""
    random_weights: bool = False
    subject_reason: str | None = None
    """Why the sample cannot be a subject-consistent case, if it cannot (an unusable label: its
    `schemas.labels` reason; a v1 sample: identity_only; ...)."""


@dataclass
class Selection:
    requested: dict[int, int]
    """persons -> cases asked for (the mix, rescaled to `total` if given)"""
    targets: dict[int, int]
    """persons -> cases aimed at (requested, shrunk proportionally under keep_ratio)"""
    available: dict[int, int]
    selected: dict[int, list[Candidate]]
    subject_keys: list[str]
    shortfall: dict[int, int] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return sorted(c.key for cases in self.selected.values() for c in cases)


# ---------------------------------------------------------------------------------------------- scanning
def _dry_run(meta: SampleMeta, member_names: Iterable[str], task_name: Task) -> str | None:
    """None if the sample would export as a `task_name` case, else the failure reason. Reads no pixels."""
    try:
        case_from_sample(meta, dict.fromkeys(member_names, b""), task_name)
    except ExportError as exc:
        return exc.reason
    return None


def scan_shards(shards: str | Path | Iterable[str | Path]) -> tuple[list[Candidate], list[ExportFailure]]:
    """One candidate per sample. Only meta.json is read; clips and images are skipped inside the tar
    stream."""
    failures: list[ExportFailure] = []
    candidates = []
    for sample in iter_shard_samples(shards, select_members=lambda member: False, on_failure=failures.append):
        meta = sample.meta
        identity = _dry_run(meta, sample.member_names, "identity")
        subject = _dry_run(meta, sample.member_names, "subject") if identity is None else identity
        candidates.append(
            Candidate(
                key=sample.key,
                shard=sample.shard,
                video=meta.video.content_id or meta.key,
                num_persons=len(meta.persons),
                identity_ok=identity is None,
                subject_ok=subject is None,
                reason=identity,
                random_weights=meta.random_weights,
                subject_reason=subject,
            )
        )
    return candidates, failures


# ---------------------------------------------------------------------------------------------- selection
def _order(seed: int | str, key: str) -> str:
    return hashlib.sha256(f"{seed}\x1f{key}".encode()).hexdigest()


def scale_mix(mix: Sequence[int], total: int) -> list[int]:
    """`mix` rescaled to sum to `total`, by largest remainder (220/230/50 at 50 -> 22/23/5)."""
    whole = sum(mix)
    if whole == 0 or total <= 0:
        return [0] * len(mix)
    exact = [m * total / whole for m in mix]
    out = [int(e) for e in exact]
    for i in sorted(range(len(mix)), key=lambda i: (out[i] - exact[i], i))[: total - sum(out)]:
        out[i] += 1
    return out


def plan_selection(
    candidates: Sequence[Candidate],
    *,
    mix: Sequence[int] = PAPER_MIX,
    seed: int | str = 0,
    total: int | None = None,
    keep_ratio: bool = False,
    exclude_videos: Iterable[str] = (),
    allow_random_weights: bool = False,
) -> Selection:
    """Pick the held-out cases: one per source video, `mix[n-1]` cases with n persons, deterministic by seed.

    total: rescale `mix` to this many cases first. keep_ratio: when a bucket is short, shrink every bucket by
    the same factor (the mix stays the paper's); otherwise short buckets take what exists and the rest stay
    full.
    """
    if any(m < 0 for m in mix) or not mix:
        raise ValueError(f"mix must be non-negative counts per person number, got {list(mix)}")
    wanted = scale_mix(mix, total) if total is not None else list(mix)
    excluded = set(exclude_videos)
    usable = [
        c
        for c in candidates
        if c.identity_ok
        and 1 <= c.num_persons <= len(wanted)
        and c.video not in excluded
        and (allow_random_weights or not c.random_weights)
    ]
    # One case per source video: the sample that qualifies for most tasks, then by seeded hash.
    rank = {c.key: (not c.subject_ok, _order(seed, c.key)) for c in usable}
    per_video: dict[str, Candidate] = {}
    for c in usable:
        best = per_video.get(c.video)
        if best is None or rank[c.key] < rank[best.key]:
            per_video[c.video] = c
    buckets: dict[int, list[Candidate]] = {n: [] for n in range(1, len(wanted) + 1)}
    for c in per_video.values():
        buckets[c.num_persons].append(c)
    for cases in buckets.values():
        cases.sort(key=lambda c: rank[c.key])
    available = {n: len(cases) for n, cases in buckets.items()}
    targets = {n: wanted[n - 1] for n in buckets}
    if keep_ratio:
        factor = min([1.0] + [available[n] / t for n, t in targets.items() if t > 0])
        targets = {n: int(t * factor) for n, t in targets.items()}
    selected = {n: buckets[n][: targets[n]] for n in buckets}
    return Selection(
        requested={n: wanted[n - 1] for n in buckets},
        targets=targets,
        available=available,
        selected=selected,
        subject_keys=sorted(c.key for cases in selected.values() for c in cases if c.subject_ok),
        shortfall={n: wanted[n - 1] - len(selected[n]) for n in buckets if wanted[n - 1] > len(selected[n])},
    )


# ---------------------------------------------------------------------------------------------- writing
def _clear_previous(out: Path, overwrite: bool) -> None:
    ours = [out / d for d in (*TASK_DIRS.values(), GROUND_TRUTH_DIR)] + [out / MANIFEST]
    present = [p for p in ours if p.exists()]
    if present and not overwrite:
        raise FileExistsError(
            f"{out} already holds a benchmark ({present[0].name}); pass overwrite=True to rebuild"
        )
    for p in present:  # only the folders and files this flow writes, never anything else in out_dir
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def export_selection(selection: Selection, out_dir: str | Path) -> dict[Task, ExportReport]:
    """Write both tasks' case folders and the ground-truth clips. Only shards holding selected cases are
    read."""
    out = Path(out_dir)
    chosen = {c.key: c for cases in selection.selected.values() for c in cases}
    subject_keys = set(selection.subject_keys)
    shards = sorted({c.shard for c in chosen.values()})
    reports: dict[Task, ExportReport] = {"identity": ExportReport(), "subject": ExportReport()}

    def needed(member: str) -> bool:
        return member == VIDEO_MEMBER or (member.endswith(".png") and "mask" not in member)

    failures = reports["identity"].failures
    for sample in iter_shard_samples(shards, select_members=needed, on_failure=failures.append):
        if sample.key not in chosen:
            continue
        export_samples([sample], out / TASK_DIRS["identity"], "identity", report=reports["identity"])
        if sample.key in subject_keys:
            export_samples([sample], out / TASK_DIRS["subject"], "subject", report=reports["subject"])
        clip = sample.members.get(VIDEO_MEMBER)
        if clip is not None and sample.key in reports["identity"].written:
            atomic_write_bytes(out / GROUND_TRUTH_DIR / f"{sample.key}.mp4", clip)
    for task_name, report in reports.items():
        expected = set(chosen) if task_name == "identity" else subject_keys
        done = set(report.written) | {f.key for f in report.failures}
        report.failures += [
            ExportFailure(k, "not_found", "selected key not found on re-read") for k in expected - done
        ]
    return reports


SKIPPED_EXAMPLES = 20
"""Keys listed per task and reason in the manifest's `skipped` section (the counts cover all of them)."""


def skipped_report(candidates: Sequence[Candidate]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per task, per reason: how many scanned samples cannot be that task's case, and a few of their keys.

    A sample with an unusable label (an attribute "face mask", a background "St. Mark's Square") is still an
    identity case; it is skipped for the subject task only, and this says so instead of a silent shortfall.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for task_name, reason_of in (
        ("identity", lambda c: c.reason),
        ("subject", lambda c: c.subject_reason),
    ):
        per: dict[str, dict[str, Any]] = {}
        for c in sorted(candidates, key=lambda c: c.key):
            reason = reason_of(c)
            if reason is None:
                continue
            entry = per.setdefault(reason, {"count": 0, "keys": []})
            entry["count"] += 1
            if len(entry["keys"]) < SKIPPED_EXAMPLES:
                entry["keys"].append(c.key)
        out[TASK_DIRS[task_name]] = dict(sorted(per.items()))  # type: ignore[index]
    return out


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    atomic_write_bytes(path, "".join(f"{line}\n" for line in lines).encode("utf-8"))


def write_benchmark(
    candidates: Sequence[Candidate],
    scan_failures: Sequence[ExportFailure],
    selection: Selection,
    out_dir: str | Path,
    params: dict[str, Any],
) -> dict[str, Any]:
    """Export the selection and write the key lists and the manifest; returns the manifest."""
    out = Path(out_dir)
    reports = export_selection(selection, out)
    written = {t: sorted(r.written) for t, r in reports.items()}
    heldout = written["identity"]
    videos = sorted({c.video for c in candidates if c.key in set(heldout)})
    video_set = set(videos)
    exclude = sorted({c.key for c in candidates if c.video in video_set})
    _write_lines(out / "heldout_keys.txt", heldout)
    _write_lines(out / "heldout_videos.txt", videos)
    _write_lines(out / "train_exclude.txt", exclude)
    by_key = {c.key: c for c in candidates}
    per_bucket = {t: Counter(by_key[k].num_persons for k in keys) for t, keys in written.items()}
    manifest = {
        "params": params,
        "scanned_samples": len(candidates),
        "scan_failures": [asdict(f) for f in scan_failures],
        "ineligible": dict(Counter(c.reason for c in candidates if not c.identity_ok)),
        "skipped": skipped_report(candidates),
        "random_weight_samples": sum(c.random_weights for c in candidates),
        "requested": {str(n): r for n, r in selection.requested.items()},
        "targets": {str(n): t for n, t in selection.targets.items()},
        "available": {str(n): a for n, a in selection.available.items()},
        "shortfall": {str(n): s for n, s in selection.shortfall.items()},
        "cases": {
            TASK_DIRS[t]: {str(n): per_bucket[t].get(n, 0) for n in selection.targets} for t in written
        },
        "export_failures": {TASK_DIRS[t]: [asdict(f) for f in r.failures] for t, r in reports.items()},
        "heldout_keys": heldout,
        "subject_keys": written["subject"],
        "train_exclude_count": len(exclude),
    }
    atomic_write_json(out / MANIFEST, manifest)  # last: its presence marks a finished benchmark
    return manifest


def summary_markdown(manifest: dict[str, Any]) -> str:
    rows = [
        "| persons | requested | available | identity cases | subject cases | shortfall |",
        "|---|---|---|---|---|---|",
    ]
    ident, subj = manifest["cases"][TASK_DIRS["identity"]], manifest["cases"][TASK_DIRS["subject"]]
    for n in manifest["targets"]:
        rows.append(
            f"| {n} | {manifest['requested'][n]} | {manifest['available'][n]} | {ident[n]} | {subj[n]} | "
            f"{manifest['shortfall'].get(n, 0)} |"
        )
    return (
        f"# Benchmark: {len(manifest['heldout_keys'])} held-out cases\n\n"
        + "\n".join(rows)
        + f"\n\nScanned {manifest['scanned_samples']} samples; {manifest['train_exclude_count']} keys go to "
        "train_exclude.txt.\n"
        + "".join(
            f"\nSkipped for {task_dir}: "
            + ", ".join(f"{reason} ({entry['count']})" for reason, entry in reasons.items())
            + "\n"
            for task_dir, reasons in manifest.get("skipped", {}).items()
            if reasons
        )
    )


# ---------------------------------------------------------------------------------------------- the flow
@task(name="scan-shards", cache_policy=NO_CACHE, persist_result=False, retries=1, retry_delay_seconds=5)
def scan_task(urls: list[str]) -> tuple[list[Candidate], list[ExportFailure]]:
    return scan_shards(urls)


@task(name="export-benchmark", cache_policy=NO_CACHE, persist_result=False)
def export_task(
    candidates, scan_failures, selection: Selection, out_dir: str, params: dict
) -> dict[str, Any]:
    return write_benchmark(candidates, scan_failures, selection, out_dir, params)


@flow(name="build-benchmark")
def build_benchmark(
    shards: list[str] | str,
    out_dir: str,
    mix: list[int] = list(PAPER_MIX),  # noqa: B006 - Prefect parameters are copied per run
    seed: int = 0,
    total: int | None = None,
    keep_ratio: bool = False,
    train_shards: list[str] | str | None = None,
    allow_random_weights: bool = False,
    overwrite: bool = False,
    shards_per_task: int = 16,
) -> dict[str, Any]:
    """Held-out identity- and subject-consistent test sets from curated shards (see the module docstring).

    shards: the pool to draw from (a directory of *.tar, a shard, or a list). train_shards: shards used for
    training that are NOT filtered by train_exclude.txt; their source videos are never selected.
    """
    log = get_run_logger()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_previous(out, overwrite)
    urls = shard_urls(shards)
    batches = [urls[i : i + shards_per_task] for i in range(0, len(urls), shards_per_task)]
    scanned = [f.result() for f in scan_task.map(batches)]
    candidates = [c for cands, _ in scanned for c in cands]
    failures = [f for _, fails in scanned for f in fails]
    train_videos: set[str] = set()
    if train_shards:
        train_cands, train_failures = scan_task(shard_urls(train_shards))
        train_videos = {c.video for c in train_cands}
        failures += train_failures
    selection = plan_selection(
        candidates,
        mix=mix,
        seed=seed,
        total=total,
        keep_ratio=keep_ratio,
        exclude_videos=train_videos,
        allow_random_weights=allow_random_weights,
    )
    params = {
        "shards": urls,
        "mix": list(mix),
        "seed": seed,
        "total": total,
        "keep_ratio": keep_ratio,
        "train_shards": shard_urls(train_shards) if train_shards else [],
        "allow_random_weights": allow_random_weights,
    }
    manifest = export_task(candidates, failures, selection, str(out), params)
    for task_dir, reasons in manifest["skipped"].items():
        if reasons:
            counts = ", ".join(f"{reason}: {entry['count']}" for reason, entry in reasons.items())
            log.warning("samples skipped for %s (reason: count): %s", task_dir, counts)
    if manifest["shortfall"]:
        log.warning("benchmark shortfall (persons -> missing cases): %s", manifest["shortfall"])
    create_markdown_artifact(summary_markdown(manifest), key="benchmark-summary", description=str(out))
    log.info(
        "benchmark: %d cases (%d subject-consistent) in %s",
        len(manifest["heldout_keys"]),
        len(manifest["subject_keys"]),
        out,
    )
    return manifest
