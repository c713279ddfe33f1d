"""Per-entity keyframe selection (paper step 3d).

Every entity (a face, an attribute, an object, the background) was found valid on some of the three keyframes.
The paper picks one frame per entity at random, but never all entities from the same frame: condition images
that all come from one instant let the model copy pose and lighting instead of learning identity and
appearance.

Draws are random but reproducible: the generator is seeded from a SHA-256 of the seed string (video id +
salt), never from Python's `hash()`, which is salted per process. The result does not depend on the order of
the input dict.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

K = TypeVar("K", bound=Hashable)

# Rejection sampling keeps the draw uniform over the allowed assignments. The worst case accepts with
# probability 1/2 per draw (one entity has two options, all others are pinned), so 64 draws fail with
# probability 2^-64; the deterministic repair below only exists so the function is total.
_MAX_DRAWS = 64


def selection_seed(video_id: str, salt: str = "") -> str:
    """The seed string for one video: change `salt` (config `select.seed_salt`) to draw other keyframes."""
    return f"{video_id}\x1f{salt}"


def _rng(seed: str) -> random.Random:
    digest = hashlib.sha256(seed.encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _sort_key(key: Hashable) -> tuple[str, str]:
    # Keys may be str, int or tuples: sort by type name then repr so mixed keys still have one stable order.
    return (type(key).__name__, repr(key))


def select_keyframes(entity_valid_keyframes: Mapping[K, Sequence[int]], seed: str) -> dict[K, int]:
    """One keyframe per entity, drawn among its valid keyframes.

    Unless every entity can only come from the same single frame, the result never takes all entities from one
    keyframe (with at least two entities). Same input and seed -> same output, in any process.

    Raises ValueError for an entity without any valid keyframe (drop it before selecting: it has no image).
    """
    keys = sorted(entity_valid_keyframes, key=_sort_key)
    options: dict[K, list[int]] = {}
    for key in keys:
        frames = sorted({int(f) for f in entity_valid_keyframes[key]})
        if not frames:
            raise ValueError(f"entity {key!r} has no valid keyframe; drop it before selecting")
        options[key] = frames
    if not keys:
        return {}

    rng = _rng(seed)
    choice: dict[K, int] = {}
    for _ in range(_MAX_DRAWS):
        choice = {key: rng.choice(options[key]) for key in keys}
        if _allowed(choice, options):
            return choice
    return _repair(choice, options, rng)


def _allowed(choice: Mapping[K, int], options: Mapping[K, list[int]]) -> bool:
    if len(choice) < 2 or len(set(choice.values())) > 1:
        return True
    # All from one frame: acceptable only if no entity could have come from another one.
    return all(len(frames) == 1 for frames in options.values())


def _repair(choice: dict[K, int], options: Mapping[K, list[int]], rng: random.Random) -> dict[K, int]:
    """Move one movable entity to another of its frames (deterministic given the generator state)."""
    if _allowed(choice, options):
        return choice
    frame = next(iter(choice.values()))
    movable = [key for key in choice if len(options[key]) > 1]
    key = rng.choice(movable)
    choice = dict(choice)
    choice[key] = rng.choice([f for f in options[key] if f != frame])
    return choice


def all_from_one_keyframe(selection: Mapping[Hashable, int]) -> bool:
    """True if at least two entities were selected and they all share one keyframe."""
    return len(selection) >= 2 and len(set(selection.values())) == 1
