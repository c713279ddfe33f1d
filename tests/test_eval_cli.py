"""`lumosx-eval` end to end on a tiny benchmark folder laid out as `build-benchmark` and
`lumosx-train infer` write it: real dlib faces, the real colour matcher and OpenCV HOG for the binding score,
tiny random builds for X-CLIP, RAFT, OWLv2, CLIP and DINOv2 (their numbers are flagged as not data)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytest.importorskip("dlib")


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict[str, Path]:
    """The demo folder, plus an identity case with no video and one whose video is not a video."""
    import shutil

    from flows.eval_samples import write_eval_demo

    root = tmp_path_factory.mktemp("eval")
    paths = write_eval_demo(root, seconds=1.0, fps=8)
    cases = paths["bench"] / "identity_consistent"
    for key in ("no_video", "broken", "bad_reference"):
        shutil.copytree(cases / "two_people", cases / key)
    (paths["gen"] / "identity" / "broken.mp4").write_bytes(b"not an mp4 at all")
    # a case whose reference face is not an image: that case fails with its reason, the others are scored
    next((cases / "bad_reference" / "subjects" / "1").glob("face_*.png")).write_bytes(b"\x89PNG garbage")
    shutil.copy(paths["gen"] / "identity" / "two_people.mp4", paths["gen"] / "identity" / "bad_reference.mp4")
    return {"bench": paths["bench"], "gen": paths["gen"], "swapped": paths["gen_swapped"], "root": root}


def _cli(*args: str) -> int:
    from flows.eval_cli import main

    return main([*args, "--profile", "test", "--no-prefect"])


def _rows(out: Path) -> dict[str, dict]:
    return {r["key"]: r for r in pq.read_table(out / "metrics.parquet").to_pylist()}


def test_cli_identity_task_scores_and_explains(bench, capsys):
    out = bench["root"] / "out_identity"
    rc = _cli(
        "--videos",
        str(bench["gen"] / "identity"),
        "--cases",
        str(bench["bench"] / "identity_consistent"),
        "--out",
        str(out),
    )
    assert rc == 1  # one case has no video, one video is broken: reported, not fatal
    assert "Identity-consistent" in capsys.readouterr().out
    rows = _rows(out)
    assert set(rows) == {"two_people", "broken", "bad_reference"}
    assert rows["bad_reference"]["failure_reasons"] == ["unreadable_case"]
    good = rows["two_people"]
    assert good["task"] == "identity" and good["identity_DlibSim"] > 0.8 and good["num_frames"] == 8
    assert math.isfinite(good["viclip_t"]) and good["dynamic"] in (0.0, 1.0)
    assert sorted(good["random_weight_metrics"]) == ["dynamic", "viclip_t"]  # identity ran on real weights
    assert rows["broken"]["failure_reasons"] == ["unreadable_video"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["videos_missing"] == ["no_video"]
    (task,) = summary["tasks"]
    assert task["metrics"]["identity_DlibSim"] == pytest.approx(good["identity_DlibSim"])
    failures = pq.read_table(out / "failures.parquet").to_pylist()
    assert {f["reason"] for f in failures} >= {"unreadable_video"}
    md = (out / "summary.md").read_text()
    assert "| Method | DlibSim | ViCLIP-T | Dynamic |" in md and "not data" in md


def test_cli_subject_task_binding_tells_right_from_swapped(bench):
    results = {}
    for name in ("gen", "swapped"):
        out = bench["root"] / f"out_subject_{name}"
        rc = _cli(
            "--videos",
            str(bench[name] / "subject"),
            "--cases",
            str(bench["bench"] / "subject_consistent"),
            "--out",
            str(out),
            "--method",
            name,
        )
        assert rc == 0
        results[name] = _rows(out)["binding_demo"]
        decisions = pq.read_table(out / "binding.parquet").to_pylist()
        assert {d["attribute"] for d in decisions} == {"green shirt", "blue shirt"}
    right, swapped = results["gen"], results["swapped"]
    assert (right["binding_accuracy"], right["swap_rate"]) == (1.0, 0.0)
    assert (swapped["binding_accuracy"], swapped["swap_rate"]) == (0.0, 1.0)
    assert "binding" not in right["random_weight_metrics"]  # dlib + HOG + colour matcher: real
    assert {"two_tier", "viclip_t", "viclip_v", "dynamic"} <= set(right["random_weight_metrics"])
    for metric in ("viclip_t", "viclip_v", "clip_t", "clip_i", "dino_i"):
        assert math.isfinite(right[metric]), metric


def test_missing_weights_are_refused_up_front_in_one_line(bench, capsys):
    from flows.eval_cli import main

    out = bench["root"] / "out_paper"
    rc = main(
        [
            "--videos",
            str(bench["gen"] / "subject"),
            "--cases",
            str(bench["bench"] / "subject_consistent"),
            "--out",
            str(out),
            "--profile",
            "paper",
            "--no-prefect",
        ]
    )
    err = capsys.readouterr().err
    assert (
        rc == 2 and "models not available" in err and "florence2" in err and "face_recognizer:CurSim" in err
    )
    assert not out.exists()  # nothing was loaded or written


def test_overrides_change_one_field_of_a_model_spec():
    from schemas.evaluation import EvalConfig

    cfg = EvalConfig.from_profile("paper", {"video_text": {"device": "cuda:1"}, "binding_frames": 5})
    assert cfg.video_text.backend == "xclip" and cfg.video_text.device == "cuda:1" and cfg.binding_frames == 5
    with pytest.raises(ValueError, match="unknown evaluation profile"):
        EvalConfig.from_profile("nope")


def test_summary_means_skip_missing_values_and_split_by_subject_count(tmp_path):
    from schemas.evaluation import BindingDecision, VideoMetrics
    from tasks.evaluation.report import summarise, write_outputs

    def decision(outcome: str) -> BindingDecision:
        return BindingDecision(subject=0, attribute="red hat", frame=0, outcome=outcome)

    rows = [
        VideoMetrics(key="a", case_id="a", task="subject", video="a.mp4", num_subjects=1, clip_t=0.3),
        VideoMetrics(key="b", case_id="b", task="subject", video="b.mp4", num_subjects=2, clip_t=0.2,
                     binding_accuracy=1.0, swap_rate=0.0, binding=[decision("correct")]),
        VideoMetrics(key="c", case_id="c", task="subject", video="c.mp4", num_subjects=2, clip_t=0.1,
                     binding_accuracy=0.0, swap_rate=1 / 3,
                     binding=[decision("swapped"), decision("elsewhere"), decision("person_not_found")]),
    ]  # fmt: skip
    summary = summarise(rows, "M", "test", {})
    (t,) = summary.tasks
    assert t.metrics["clip_t"] == pytest.approx(0.2) and t.counts["clip_t"] == 3
    # per video: mean of 1.0 and 0.0; pooled: 1 correct of 4 decisions
    assert t.metrics["binding_accuracy"] == pytest.approx(0.5) and t.counts["binding_accuracy"] == 2
    assert t.metrics["binding_accuracy_pooled"] == pytest.approx(0.25)
    assert t.metrics["swap_rate_pooled"] == pytest.approx(0.25)
    assert t.by_subjects["1"]["clip_t"] == pytest.approx(0.3) and math.isnan(
        t.by_subjects["1"]["binding_accuracy"]
    )
    assert t.by_subjects["2"]["clip_t"] == pytest.approx(0.15)
    paths = write_outputs(tmp_path, rows, summary)
    on_disk = json.loads(paths["summary.json"].read_text())  # NaN is written as null: valid JSON
    assert on_disk["tasks"][0]["by_subjects"]["1"]["binding_accuracy"] is None
    assert len(pq.read_table(paths["binding.parquet"])) == 4
    assert pq.read_table(paths["failures.parquet"]).num_rows == 0
