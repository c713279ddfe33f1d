"""Per-entity keyframe selection: valid, reproducible, never all from one frame when avoidable, unbiased."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.select import _repair, all_from_one_keyframe, select_keyframes, selection_seed

# entity key -> non-empty subset of the three keyframes
valid_maps = st.dictionaries(
    keys=st.text(alphabet="abcdefgh:_0123", min_size=1, max_size=8),
    values=st.lists(st.integers(0, 2), min_size=1, max_size=3),
    min_size=0,
    max_size=7,
)


@settings(max_examples=300, deadline=None)
@given(valid=valid_maps, seed=st.text(max_size=12))
def test_properties(valid, seed):
    out = select_keyframes(valid, seed)
    assert set(out) == set(valid)
    for key, frame in out.items():
        assert frame in valid[key]
    # Same input, same seed -> same output; insertion order does not matter.
    assert select_keyframes(valid, seed) == out
    assert select_keyframes(dict(reversed(list(valid.items()))), seed) == out
    # Never all from one frame when some entity had another option.
    if all_from_one_keyframe(out):
        assert all(len(set(v)) == 1 for v in valid.values())


def test_exhaustive_small_cases():
    """Every combination of valid sets for up to 3 entities and several seeds."""
    subsets = [s for r in (1, 2, 3) for s in itertools.combinations(range(3), r)]
    for n in (2, 3):
        for combo in itertools.product(subsets, repeat=n):
            valid = {f"e{i}": list(s) for i, s in enumerate(combo)}
            forced = all(len(s) == 1 for s in combo)
            for seed in ("a", "b", "c"):
                out = select_keyframes(valid, seed)
                assert all(out[k] in valid[k] for k in valid)
                assert forced or not all_from_one_keyframe(out)


def test_pinned_entities_single_alternative():
    # Everything pinned to keyframe 1 except one entity that can also come from 2: it must move.
    valid = {"face:0": [1], "attr:0:0": [1], "object:0": [1], "background": [1, 2]}
    for seed in map(str, range(50)):
        assert select_keyframes(valid, seed)["background"] == 2


def test_forced_same_frame_is_allowed():
    assert select_keyframes({"a": [0], "b": [0]}, "s") == {"a": 0, "b": 0}


def test_single_entity_and_empty():
    assert select_keyframes({}, "s") == {}
    assert select_keyframes({"face:0": [2]}, "s") == {"face:0": 2}


def test_entity_without_valid_keyframe_is_an_error():
    with pytest.raises(ValueError, match="no valid keyframe"):
        select_keyframes({"a": [0, 1], "b": []}, "s")


def test_mixed_key_types_and_duplicates():
    valid = {("person", 1): [0, 0, 1], "background": [1], 3: [2, 1]}
    out = select_keyframes(valid, "vid")
    assert out == select_keyframes(valid, "vid")
    assert out[("person", 1)] in (0, 1) and out["background"] == 1 and out[3] in (1, 2)


def test_seed_changes_the_draw():
    valid = {f"e{i}": [0, 1, 2] for i in range(6)}
    draws = {
        tuple(select_keyframes(valid, selection_seed("video_a", salt)).values())
        for salt in map(str, range(20))
    }
    assert len(draws) > 10


def test_reproducible_across_processes():
    """Python's hash() is salted per process; the selection must not be."""
    code = (
        "from tasks.select import select_keyframes;"
        "print(select_keyframes({'a':[0,1,2],'b':[0,1,2],'c':[0,2],'d':[1,2]}, 'video_x'))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": str(h), "PYTHONPATH": "."},
        ).stdout
        for h in (1, 2, 3)
    }
    assert len(outs) == 1
    assert eval(outs.pop()) == select_keyframes(
        {"a": [0, 1, 2], "b": [0, 1, 2], "c": [0, 2], "d": [1, 2]}, "video_x"
    )


def test_draw_is_uniform_over_allowed_assignments():
    """Rejection sampling keeps every allowed assignment equally likely (a repair-first scheme would not)."""
    valid = {"a": [0, 1], "b": [0, 1]}  # allowed: (0,1) and (1,0)
    counts = Counter(tuple(select_keyframes(valid, f"v{i}").values()) for i in range(4000))
    assert set(counts) == {(0, 1), (1, 0)}
    assert abs(counts[(0, 1)] - 2000) < 200  # ~6.3 sigma
    valid3 = {"a": [0, 1, 2], "b": [0, 1, 2]}  # 6 allowed assignments
    counts3 = Counter(tuple(select_keyframes(valid3, f"w{i}").values()) for i in range(6000))
    assert len(counts3) == 6 and all(abs(c - 1000) < 160 for c in counts3.values())


def test_repair_moves_exactly_one_entity():
    import random

    options = {"a": [0], "b": [0, 2], "c": [0]}
    fixed = _repair({"a": 0, "b": 0, "c": 0}, options, random.Random(0))
    assert fixed == {"a": 0, "b": 2, "c": 0}
