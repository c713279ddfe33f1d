"""build-benchmark: held-out selection by mix and seed, one case per source video, train exclusion, both
tasks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from test_official_export import files, v1_sample, v2_sample, write_shard

from flows.benchmark_builder import (
    PAPER_MIX,
    Candidate,
    build_benchmark,
    plan_selection,
    scale_mix,
    scan_shards,
    write_benchmark,
)
from schemas.official_case import read_case

NOUNS = ["man", "woman", "boy"]
TOPS = ["grey hoodie", "black suit", "yellow raincoat"]


def sample_with(n: int, key: str, video: str | None = None, *, bad_label: bool = False) -> dict:
    """A v2 sample with n persons; `bad_label` gives an attribute the official reader cannot take."""
    persons = [(NOUNS[i], [TOPS[i]]) for i in range(n)]
    parts = [f"a {NOUNS[i]} in a {TOPS[i]}" for i in range(n)]
    caption = " and ".join(parts).capitalize() + " stand in a park near a bench."
    if bad_label:
        caption = caption.replace(" stand", " with a face mask stand")
        persons[0] = (persons[0][0], [TOPS[0], "face mask"])
    return v2_sample(key, caption, persons=persons, objects=["bench"], background="park", content_id=video)


@pytest.fixture
def shards(tmp_path) -> list[str]:
    """40 one-person, 12 two-person, 3 three-person samples over 3 shards, plus edge cases."""
    s0, s1, s2 = {}, {}, {}
    for i in range(30):
        s0[f"one_{i:03d}"] = sample_with(1, f"one_{i:03d}")
    for i in range(10):  # identity-only v1 samples: identity cases, never subject cases
        s0[f"vone_{i:03d}"] = v1_sample(f"vone_{i:03d}", "A woman with a red scarf waves at the camera.", 1)
    for i in range(12):
        s1[f"two_{i:03d}"] = sample_with(2, f"two_{i:03d}")
    for i in range(3):
        s1[f"three_{i:03d}"] = sample_with(3, f"three_{i:03d}")
    # Three clips of one source video: at most one may be selected, all must be excluded from training.
    for i in range(3):
        s2[f"clip_{i}"] = sample_with(2, f"clip_{i}", video="shared_video")
    s2["bad_label"] = sample_with(1, "bad_label", bad_label=True)  # subject export impossible: identity only
    s2["v1_pair"] = v1_sample("v1_pair", "A man and a woman dance.", 2)  # no labels: not a case at all
    s2["four"] = v2_sample(
        "four",
        "A man, a woman, a boy and a girl sit on a bench.",
        persons=[("man", []), ("woman", []), ("boy", []), ("girl", [])],
        objects=[],
        background=None,
    )
    rnd = sample_with(1, "random_w")
    meta = json.loads(rnd["meta.json"])
    meta.update(random_weights=True, random_weight_stages=["entities"])
    rnd["meta.json"] = json.dumps(meta).encode()
    s2["random_w"] = rnd
    return [write_shard(tmp_path / f"shard-{i:06d}.tar", s) for i, s in enumerate((s0, s1, s2))]


def cand(key, n, video=None, subject=True, ok=True, rw=False) -> Candidate:
    return Candidate(
        key=key,
        shard="s.tar",
        video=video or key,
        num_persons=n,
        identity_ok=ok,
        subject_ok=subject,
        reason=None if ok else "unsafe_label",
        random_weights=rw,
    )


def test_scale_mix():
    assert scale_mix(PAPER_MIX, 500) == [220, 230, 50]
    assert scale_mix(PAPER_MIX, 50) == [22, 23, 5]
    assert scale_mix(PAPER_MIX, 7) == [3, 3, 1] and sum(scale_mix(PAPER_MIX, 101)) == 101
    assert scale_mix([0, 0, 0], 10) == [0, 0, 0]


def test_plan_mix_shortfall_and_determinism():
    pool = [cand(f"a{i}", 1) for i in range(30)] + [cand(f"b{i}", 2) for i in range(8)] + [cand("c0", 3)]
    sel = plan_selection(pool, mix=[10, 10, 2], seed=1)
    assert {n: len(v) for n, v in sel.selected.items()} == {1: 10, 2: 8, 3: 1}
    assert sel.shortfall == {2: 2, 3: 1} and sel.available == {1: 30, 2: 8, 3: 1}
    shuffled = pool[:]
    random.Random(0).shuffle(shuffled)
    assert plan_selection(shuffled, mix=[10, 10, 2], seed=1).keys == sel.keys  # input order is irrelevant
    assert plan_selection(pool, mix=[10, 10, 2], seed=2).keys != sel.keys
    # keep_ratio: the 3-person bucket has half of what was asked, so every bucket is halved.
    kept = plan_selection(pool, mix=[10, 10, 2], seed=1, keep_ratio=True)
    assert kept.targets == {1: 5, 2: 5, 3: 1} and {n: len(v) for n, v in kept.selected.items()} == {
        1: 5,
        2: 5,
        3: 1,
    }
    # total rescales the paper mix.
    assert plan_selection(pool, seed=1, total=10).requested == {1: 4, 2: 5, 3: 1}


def test_plan_filters_and_preferences():
    pool = [
        cand("same_1", 1, video="v"),
        cand("same_2", 1, video="v", subject=False),
        cand("ident_only", 1, subject=False),
        cand("broken", 1, ok=False),
        cand("rw", 1, rw=True),
        cand("four", 4),
        cand("trained", 1, video="tv"),
    ]
    sel = plan_selection(pool, mix=[10], seed=0, exclude_videos={"tv"})
    assert sorted(sel.keys) == ["ident_only", "same_1"]  # one per video, the subject-capable clip wins
    assert sel.subject_keys == ["same_1"]
    assert "rw" in plan_selection(pool, mix=[10], seed=0, allow_random_weights=True).keys
    # Subject-capable cases are taken first when the bucket is over-full.
    assert plan_selection(pool, mix=[1], seed=0).keys == ["same_1"]
    with pytest.raises(ValueError):
        plan_selection(pool, mix=[-1, 2])


def test_scan_reads_metas_and_flags_eligibility(shards):
    candidates, failures = scan_shards(shards)
    by_key = {c.key: c for c in candidates}
    assert failures == [] and len(candidates) == 62
    assert by_key["vone_000"].identity_ok and not by_key["vone_000"].subject_ok
    assert by_key["bad_label"].identity_ok and not by_key["bad_label"].subject_ok
    assert not by_key["v1_pair"].identity_ok and by_key["v1_pair"].reason == "unlabelled_person"
    assert by_key["clip_1"].video == "shared_video" and by_key["four"].num_persons == 4
    assert by_key["random_w"].random_weights


def test_write_benchmark_layout_lists_and_exclusion(shards, tmp_path):
    candidates, failures = scan_shards(shards)
    sel = plan_selection(candidates, mix=[8, 20, 5], seed=3)
    out = tmp_path / "bench"
    manifest = write_benchmark(candidates, failures, sel, out, {"seed": 3})
    heldout = (out / "heldout_keys.txt").read_text().split()
    assert heldout == manifest["heldout_keys"] and len(heldout) == 8 + 13 + 3
    assert manifest["shortfall"] == {"2": 7, "3": 2}  # 12 + 1 shared video two-person cases; 3 three-person
    assert manifest["available"] == {
        "1": 41,
        "2": 13,
        "3": 3,
    }  # 30 v2 + 10 v1 + bad_label; not v1_pair/four/rw
    # Every selected case is an identity case; subject cases are the v2 ones with exportable labels.
    assert sorted(p.name for p in (out / "identity_consistent").iterdir()) == heldout
    subject = sorted(p.name for p in (out / "subject_consistent").iterdir())
    assert subject == manifest["subject_keys"] and set(subject) <= set(heldout)
    assert not any(k.startswith("vone_") or k == "bad_label" for k in subject)
    for key in subject:
        case = read_case(out / "subject_consistent" / key)
        assert case.background is not None and case.objects and all(s.attributes for s in case.subjects)
    for key in heldout:
        case = read_case(out / "identity_consistent" / key)
        assert all(not s.attributes for s in case.subjects) and not case.objects and case.background is None
        assert (out / "ground_truth" / f"{key}.mp4").is_file()
    # Held out by source video: one clip of the shared video at most, and all its clips are excluded.
    exclude = set((out / "train_exclude.txt").read_text().split())
    assert set(heldout) <= exclude
    shared = [k for k in heldout if k.startswith("clip_")]
    assert len(shared) == 1 and {"clip_0", "clip_1", "clip_2"} <= exclude
    assert len(exclude) == len(heldout) + 2
    assert "shared_video" in (out / "heldout_videos.txt").read_text().split()
    assert manifest["ineligible"] == {"unlabelled_person": 1}
    # What was skipped, per task and reason: the "face mask" attribute keeps bad_label out of the subject task.
    skipped = manifest["skipped"]
    assert skipped["identity_consistent"] == {"unlabelled_person": {"count": 1, "keys": ["v1_pair"]}}
    assert skipped["subject_consistent"]["face_in_attribute"] == {"count": 1, "keys": ["bad_label"]}
    assert skipped["subject_consistent"]["identity_only"]["count"] == 10  # the v1 samples


def test_flow_is_deterministic_and_protects_previous_output(shards, tmp_path, prefect_harness):
    out = tmp_path / "bench"
    first = build_benchmark(shards=shards, out_dir=str(out), mix=[4, 4, 1], seed=7, shards_per_task=2)
    assert len(first["heldout_keys"]) == 9 and first["shortfall"] == {}
    tree = files(out)
    with pytest.raises(FileExistsError):
        build_benchmark(shards=shards, out_dir=str(out), mix=[4, 4, 1], seed=7)
    second = build_benchmark(
        shards=str(Path(shards[0]).parent), out_dir=str(out), mix=[4, 4, 1], seed=7, overwrite=True
    )
    assert second["heldout_keys"] == first["heldout_keys"] and files(out) == tree
    # Videos of shards used for training (without exclusion) are never selected.
    third = build_benchmark(
        shards=shards, out_dir=str(tmp_path / "b3"), mix=[40, 20, 5], seed=7, train_shards=[shards[1]]
    )
    assert not any(k.startswith(("two_", "three_")) for k in third["heldout_keys"])
    assert third["shortfall"] == {"2": 19, "3": 5}
