"""The rules a label must follow to be usable end to end: one function, one list of reasons.

A label (subject noun, attribute, object or background phrase) is copied verbatim from the caption and becomes a
file name in the official case layout (`face_<label>.png`, `<attribute>.png`, `objects/<label>.png`, ...), read
back by the authors' inference script. The entities stage applies these rules where a label is made (and drops
the one entity whose label breaks them); export, import and `build-benchmark` apply the same rules, so a label
the entities stage accepted never fails later, and a third-party sample fails with the same reason slug.

Labels are never rewritten to pass: the cross-attention mask finds a label in the caption by exact token match,
so "face mask" renamed to "mask" would condition other words.
"""

from __future__ import annotations

import unicodedata
from typing import Literal, NamedTuple

LabelRole = Literal["subject", "attribute", "object", "background"]

MAX_LABEL_BYTES = 200
"""Leaves room for "face_" and ".png" under the common 255-byte file name limit."""
SKIPPED_MARKER = "fullfullbody"
"""Files whose name contains this are skipped by the authors' reader (an experimental whole-body image)."""
_NON_PORTABLE = frozenset('<>:"|?*')

LABEL_REASONS: dict[str, str] = {
    "empty_label": "is empty or has leading/trailing whitespace",
    "control_character": "contains NUL, a line break or another control character",
    "path_separator": "contains a path separator ('/' or '\\')",
    "dot_path": "is '.' or '..', contains '..' or starts with '.'",
    "non_portable": 'contains a character that is not portable in file names (< > : " | ? *)',
    "too_long": f"is longer than {MAX_LABEL_BYTES} bytes in UTF-8",
    "skipped_marker": f"contains {SKIPPED_MARKER!r}: the official reader skips such files",
    "face_in_attribute": "contains 'face': the official reader takes any file of a subject folder whose name "
    "contains 'face' for the face image",
    "dot_in_label": "contains '.': the official reader cuts object and background file names at the first '.'",
}
"""Every reason a label can be refused, slug -> why (the slugs are the failure reasons in reports)."""


class LabelProblem(NamedTuple):
    reason: str
    message: str


class LabelError(ValueError):
    """A label breaks a rule of LABEL_REASONS; `reason` is its slug."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def label_problem(label: str, role: LabelRole | None = None) -> LabelProblem | None:
    """The first rule `label` breaks as a `role` label (None: only the file-name rules), or None if it is usable."""
    reason = _first_broken_rule(label, role)
    if reason is None:
        return None
    what = f"{role} label" if role else "label"
    return LabelProblem(reason, f"{what} {label!r} {LABEL_REASONS[reason]}")


def check_label(label: str, role: LabelRole | None = None) -> str:
    """`label` if usable, else LabelError with the reason."""
    problem = label_problem(label, role)
    if problem is not None:
        raise LabelError(*problem)
    return label


def _first_broken_rule(label: str, role: LabelRole | None) -> str | None:
    if not isinstance(label, str) or not label or label != label.strip():
        return "empty_label"
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in label):
        return "control_character"
    if "/" in label or "\\" in label:
        return "path_separator"
    if label in (".", "..") or ".." in label or label.startswith("."):
        return "dot_path"
    if any(ch in _NON_PORTABLE for ch in label):
        return "non_portable"
    if len(label.encode("utf-8")) > MAX_LABEL_BYTES:
        return "too_long"
    if SKIPPED_MARKER in label.lower():
        return "skipped_marker"
    if role == "attribute" and "face" in label.lower():
        return "face_in_attribute"
    if role in ("object", "background") and "." in label:
        return "dot_in_label"
    return None
