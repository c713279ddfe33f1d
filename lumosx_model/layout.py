"""Which condition images a sample carries, and where their tokens sit in the sequence.

LumosX appends every condition image (one latent frame each) after the video tokens, in a fixed order that
the positions (R2PE), the self-attention mask (CSAM) and the cross-attention bias (MCAM) all rely on
(SPEC §2)::

    [video: T frames] [background] [object 0] [object 1] ... [group 0: face, attr, ...] [group 1: ...] ...

:class:`SampleLayout` is that order, validated once, so the three relational pieces can never disagree.

A person given as one *whole-person cut-out* (30 % of persons at train time) is a group with a single
``kind="face"`` condition whose label is the person's phrase and no attributes: "face" means "the image
that opens a subject group", not strictly a face crop.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

ConditionKind = Literal["background", "object", "face", "attribute"]
_KINDS: tuple[str, ...] = ("background", "object", "face", "attribute")


class LayoutError(ValueError):
    """A list of conditions that cannot form a LumosX sample (two backgrounds, a group without face, ...)."""


@dataclass(frozen=True)
class Condition:
    """One condition image.

    Attributes:
        kind: ``"background"``, ``"object"``, ``"face"`` (opens a subject group; also used for a whole-person
            cut-out) or ``"attribute"`` (belongs to the group of the same index).
        label: the phrase, verbatim in the caption, that MCAM ties this image to; ``None`` gives the image
            an all-zero MCAM template row (no cross-attention bias).
        group: subject-group index for ``face`` / ``attribute`` (any non-negative ints: they are renumbered
            0..G-1 in first-appearance order by :meth:`SampleLayout.from_conditions`); ``-1`` otherwise.
    """

    kind: ConditionKind
    label: str | None
    group: int = -1

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise LayoutError(f"unknown condition kind {self.kind!r}; expected one of {_KINDS}")
        subject = self.kind in ("face", "attribute")
        if subject and self.group < 0:
            raise LayoutError(f"a {self.kind!r} condition needs a group index >= 0, got {self.group}")
        if not subject and self.group != -1:
            raise LayoutError(f"a {self.kind!r} condition must have group=-1, got {self.group}")
        if self.label is not None and not self.label.strip():
            raise LayoutError("a condition label must be a non-empty phrase or None")


@dataclass(frozen=True)
class SampleLayout:
    """The conditions of one sample in canonical order (see module docstring).

    Build it with :meth:`from_conditions` (reorders and renumbers); the constructor only accepts a tuple that
    is already canonical, so a hand-built layout cannot silently disagree with the model's token order.
    """

    conditions: tuple[Condition, ...]

    def __post_init__(self) -> None:
        conds = tuple(self.conditions)
        object.__setattr__(self, "conditions", conds)
        rank = {"background": 0, "object": 1}
        expected_group = 0
        prev_rank = -1
        for i, c in enumerate(conds):
            r = rank.get(c.kind, 2)
            if r < prev_rank:
                raise LayoutError(
                    f"condition {i} ({c.kind}) is out of canonical order: background, objects, groups"
                )
            if c.kind == "background" and prev_rank == 0:
                raise LayoutError("at most one background condition per sample")
            if c.kind == "face":
                if c.group != expected_group:
                    raise LayoutError(
                        f"condition {i}: groups must be numbered 0..G-1 in order, each opened by one face; "
                        f"expected a face of group {expected_group}, got group {c.group}"
                    )
                expected_group += 1
            elif c.kind == "attribute" and c.group != expected_group - 1:
                raise LayoutError(
                    f"condition {i}: attribute of group {c.group} must directly follow the face of its group"
                )
            prev_rank = r

    @classmethod
    def from_conditions(cls, conditions: Iterable[Condition]) -> SampleLayout:
        """Put ``conditions`` into canonical order and validate them.

        Objects keep their given order; groups are renumbered 0..G-1 in order of first appearance of any of
        their images; inside a group the face comes first, attributes keep their given order.

        Raises:
            LayoutError: more than one background, a group without face or with two faces.
        """
        conditions = list(conditions)
        backgrounds = [c for c in conditions if c.kind == "background"]
        if len(backgrounds) > 1:
            raise LayoutError(f"at most one background condition per sample, got {len(backgrounds)}")
        objects = [c for c in conditions if c.kind == "object"]
        group_order: list[int] = []
        for c in conditions:
            if c.kind in ("face", "attribute") and c.group not in group_order:
                group_order.append(c.group)
        ordered = backgrounds + objects
        for new_index, old in enumerate(group_order):
            faces = [c for c in conditions if c.kind == "face" and c.group == old]
            if len(faces) != 1:
                raise LayoutError(f"subject group {old} needs exactly one face condition, got {len(faces)}")
            attrs = [c for c in conditions if c.kind == "attribute" and c.group == old]
            ordered += [Condition(c.kind, c.label, new_index) for c in faces + attrs]
        return cls(tuple(ordered))

    def __len__(self) -> int:
        return len(self.conditions)

    @property
    def num_groups(self) -> int:
        """Number of subject groups G."""
        return sum(c.kind == "face" for c in self.conditions)

    @property
    def num_bo(self) -> int:
        """Number of background + object images (N_bo in SPEC §2)."""
        return sum(c.kind in ("background", "object") for c in self.conditions)

    def token_ranges(self, video_grid: tuple[int, int, int]) -> list[tuple[int, int]]:
        """Token ``[start, end)`` of every condition in the full sequence.

        ``video_grid`` is the post-patch token grid (T, H', W') of the video; each condition is one latent
        frame of H'×W' tokens placed after the T·H'·W' video tokens.
        """
        t, h, w = video_grid
        per = h * w
        start = t * per
        return [(start + i * per, start + (i + 1) * per) for i in range(len(self.conditions))]

    def block_ids(self) -> list[int]:
        """CSAM block id of every condition: the background, each object and each whole group is one block."""
        ids: list[int] = []
        next_id = 0
        for c in self.conditions:
            if c.kind == "attribute":
                ids.append(ids[-1])  # same block as the face (or previous attribute) of its group
            else:
                ids.append(next_id)
                next_id += 1
        return ids
