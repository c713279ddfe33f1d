"""Curated shard samples <-> the official LumosX case layout (inference and benchmark input).

Export reads v2 (and v1, identity only) samples with plain `webdataset`, turns each into an `OfficialCase` and
writes it with `schemas.official_case.write_case`. Import reads a case folder back into a v2 `SampleMeta` plus
its image members, so hand-made or third-party cases can flow into the same tools as curated samples.

Labels become file names in the official layout, and keys become folder names. Both come from data (model
output, third-party shards), so neither is trusted: a label that cannot be a portable file name, or that the
authors' reader would misread, fails the case with the reason slug of `schemas.labels` (the same rules the
entities stage applies when it makes the label); it is never silently rewritten, because a label must stay
verbatim in the caption for the cross-attention mask to find it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from schemas.labels import LabelRole, label_problem
from schemas.official_case import CaseImage, CaseSubject, OfficialCase, read_case, write_case
from schemas.sample import (
    SampleAttribute,
    SampleBackground,
    SampleMeta,
    SampleObject,
    SamplePerson,
    load_sample_meta,
)

logger = logging.getLogger(__name__)

Task = Literal["identity", "subject"]
TASKS: tuple[Task, ...] = ("identity", "subject")
META_MEMBER = "meta.json"

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")
# Person nouns for v1 samples, which carry no subject label: a one-person case can still be labelled.
_PERSON_NOUNS = (
    "man",
    "woman",
    "boy",
    "girl",
    "person",
    "child",
    "kid",
    "baby",
    "lady",
    "gentleman",
    "guy",
    "teenager",
    "player",
    "athlete",
    "dancer",
    "singer",
    "chef",
    "worker",
    "student",
)


class ExportError(ValueError):
    """One sample cannot become an official case; `reason` is a short slug for the report."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ExportFailure:
    key: str
    reason: str
    message: str
    shard: str | None = None


@dataclass
class ExportReport:
    written: dict[str, Path] = field(default_factory=dict)
    failures: list[ExportFailure] = field(default_factory=list)

    def reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.failures:
            out[f.reason] = out.get(f.reason, 0) + 1
        return out


@dataclass(frozen=True)
class ShardSample:
    """One sample as read from a shard: its parsed meta and its raw members (name -> bytes)."""

    key: str
    shard: str
    meta: SampleMeta
    members: Mapping[str, bytes]
    member_names: frozenset[str] = frozenset()
    """Every member of the sample in the tar, including those `select_members` did not read."""


# ---------------------------------------------------------------------------------------------- names
def check_label(label: str, role: LabelRole | None = None) -> str:
    """Return `label` if it can be a `role` label file as is; raise ExportError(<reason of schemas.labels>)."""
    problem = label_problem(label, role)
    if problem is not None:
        raise ExportError(problem.reason, f"{problem.message}: it cannot be exported")
    return label


def check_case_id(key: str) -> str:
    """Keys become case folder names: [A-Za-z0-9_-] only, so nothing can escape the output directory."""
    if not isinstance(key, str) or not _SAFE_KEY.match(key):
        raise ExportError(
            "unsafe_key", f"sample key {key!r} is not a safe folder name ([A-Za-z0-9_-], <= 128)"
        )
    return key


def case_dir(out_dir: Path, key: str) -> Path:
    root = out_dir.resolve()
    target = (root / check_case_id(key)).resolve()
    if target.parent != root:  # belt and braces: the regex already excludes separators and dots
        raise ExportError("unsafe_key", f"case folder for {key!r} would land outside {root}")
    return target


def guess_subject_noun(caption: str) -> str | None:
    """The earliest person noun of the caption, as written there (v1 samples have no subject label)."""
    best: tuple[int, str] | None = None
    for noun in _PERSON_NOUNS:
        m = re.search(rf"(?<!\w){noun}(?!\w)", caption, flags=re.IGNORECASE)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), m.group(0))
    return best[1] if best else None


# --------------------------------------------------------------------------------------------- sample -> case
def _member(members: Mapping[str, bytes], name: str, key: str) -> bytes:
    data = members.get(name)
    if data is None:
        raise ExportError(
            "missing_member", f"{key}: meta.json names {name!r} but the sample has no such member"
        )
    return data


def subject_labels(meta: SampleMeta) -> list[str]:
    """The face label of every person. v1 samples: only a single person can be labelled (by its noun)."""
    labels = [p.label for p in meta.persons]
    if all(label is not None for label in labels):
        return labels  # type: ignore[return-value]
    if len(meta.persons) == 1:
        noun = guess_subject_noun(meta.caption)
        if noun is not None:
            return [noun]
    raise ExportError(
        "unlabelled_person",
        f"{meta.key}: person(s) without a subject label (a v1 sample with {len(meta.persons)} persons); "
        "run the entities stage to bind each face to its words in the caption",
    )


def case_from_sample(meta: SampleMeta, members: Mapping[str, bytes], task: Task) -> OfficialCase:
    """The official case of one sample: faces only for "identity", every condition for "subject"."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    key = check_case_id(meta.key)
    if not meta.persons:
        raise ExportError("no_person", f"{key}: no person with a face")
    if task == "subject" and meta.schema_version == 1:
        raise ExportError(
            "identity_only", f"{key}: a v1 sample has faces only; it can only be an identity case"
        )
    caption = meta.caption
    if "\n" in caption or "\r" in caption:
        raise ExportError(
            "invalid_case", f"{key}: the caption spans several lines; caption.txt holds one line"
        )
    labels = subject_labels(meta)
    subjects = []
    for person, label in zip(meta.persons, labels, strict=True):
        check_label(label, "subject")
        attributes = []
        if task == "subject":
            for attr in person.attributes:
                check_label(attr.label, "attribute")
                attributes.append(CaseImage(label=attr.label, data=_member(members, attr.image, key)))
        subjects.append((label, _member(members, person.face, key), attributes))
    objects, background = [], None
    if task == "subject":
        for obj in meta.objects:
            objects.append(
                CaseImage(label=check_label(obj.label, "object"), data=_member(members, obj.image, key))
            )
        if meta.background is not None:
            background = CaseImage(
                label=check_label(meta.background.label, "background"),
                data=_member(members, meta.background.image, key),
            )
    try:
        return OfficialCase(
            case_id=key,
            caption=caption,
            subjects=[
                CaseSubject(face=CaseImage(label=label, data=face), attributes=attributes)
                for label, face, attributes in subjects
            ],
            objects=objects,
            background=background,
        )
    except ValidationError as exc:
        # The labels passed check_label: what is left is a conflict between them (duplicate labels in one
        # subject or among the objects). Say which rule, do not rename behind the user's back.
        msg = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors()[:3])
        raise ExportError("label_conflict", f"{key}: {msg}") from None


# ---------------------------------------------------------------------------------------------- shards
def shard_urls(shards: str | Path | Iterable[str | Path]) -> list[str]:
    """A directory (its *.tar, sorted), one shard path/URL (brace patterns allowed), or a list of them."""
    if isinstance(shards, (str, Path)):
        path = Path(shards)
        if path.is_dir():
            urls = [str(p) for p in sorted(path.glob("*.tar"))]
            if not urls:
                raise FileNotFoundError(f"no *.tar shards in {path}")
            return urls
        return [str(shards)]
    return [str(s) for s in shards]


def iter_shard_samples(
    shards: str | Path | Iterable[str | Path],
    *,
    select_members: Callable[[str], bool] | None = None,
    on_failure: Callable[[ExportFailure], None] | None = None,
) -> Iterator[ShardSample]:
    """Samples of the shards, in order, read with plain webdataset (no decoding, no project code needed).

    `select_members(member_name)` skips members that are not needed (e.g. the mp4 when only metas are wanted);
    meta.json is always read. A sample whose meta is missing or invalid, or a shard that cannot be read, is
    passed to `on_failure` and skipped.
    """
    import webdataset as wds

    names: dict[str, set[str]] = {}

    def keep(fname: str) -> bool:
        # Same split as webdataset's: the key is the base name up to its first dot.
        prefix, _, member = fname.rsplit("/", 1)[-1].partition(".")
        names.setdefault(prefix, set()).add(member)
        return member == META_MEMBER or select_members is None or select_members(member)

    report = on_failure or (lambda f: logger.warning("skipping %s: %s (%s)", f.key, f.message, f.reason))
    for url in shard_urls(shards):
        names.clear()
        dataset = wds.WebDataset(url, shardshuffle=False, empty_check=False, select_files=keep)
        try:
            for sample in dataset:
                key = sample["__key__"]
                members = {k: v for k, v in sample.items() if not k.startswith("__")}
                member_names = frozenset(names.pop(key.rsplit("/", 1)[-1], set()) | set(members))
                raw = members.get(META_MEMBER)
                if raw is None:
                    report(ExportFailure(key, "no_meta", "sample has no meta.json", url))
                    continue
                try:
                    meta = load_sample_meta(raw)
                except ValueError as exc:  # also JSONDecodeError and pydantic's ValidationError
                    report(ExportFailure(key, "invalid_meta", str(exc).splitlines()[0][:300], url))
                    continue
                if meta.key != key.rsplit("/", 1)[-1]:
                    report(
                        ExportFailure(key, "invalid_meta", f"meta.json key {meta.key!r} != sample key", url)
                    )
                    continue
                yield ShardSample(
                    key=meta.key, shard=url, meta=meta, members=members, member_names=member_names
                )
        except Exception as exc:  # noqa: BLE001 - tarfile.ReadError, truncated gzip, I/O: one bad shard, not the run
            report(ExportFailure(url, "unreadable_shard", f"{type(exc).__name__}: {exc}", url))


def _needed_for_cases(member: str) -> bool:
    # Cases need images; masks and clips are dead weight when exporting.
    return member.endswith(".png") and "mask" not in member


def export_samples(
    samples: Iterable[ShardSample],
    out_dir: str | Path,
    task: Task,
    *,
    overwrite: bool = False,
    report: ExportReport | None = None,
) -> ExportReport:
    """Write the official case of every given sample to `out_dir/<key>/`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = report or ExportReport()
    for sample in samples:
        try:
            case = case_from_sample(sample.meta, sample.members, task)
            target = case_dir(out, sample.key)
            report.written[sample.key] = write_case(case, target, overwrite=overwrite)
        except ExportError as exc:
            report.failures.append(ExportFailure(sample.key, exc.reason, str(exc), sample.shard))
        except FileExistsError as exc:
            report.failures.append(ExportFailure(sample.key, "exists", str(exc), sample.shard))
    return report


def export_cases(
    shards: str | Path | Iterable[str | Path],
    out_dir: str | Path,
    *,
    task: Task = "subject",
    keys: Iterable[str] | None = None,
    overwrite: bool = False,
) -> ExportReport:
    """Export shard samples as official case folders `out_dir/<key>/`.

    task: "identity" writes faces only (v1 and v2 samples); "subject" writes every condition (v2 samples).
    keys: only these samples (default: all). Failures are reported per sample, never raised.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    wanted = set(keys) if keys is not None else None
    report = ExportReport()
    samples = iter_shard_samples(shards, select_members=_needed_for_cases, on_failure=report.failures.append)
    if wanted is not None:
        samples = (s for s in samples if s.key in wanted)
    export_samples(samples, out_dir, task, overwrite=overwrite, report=report)
    if wanted is not None:
        for key in sorted(wanted - set(report.written) - {f.key for f in report.failures}):
            report.failures.append(ExportFailure(key, "not_found", "key not found in the shards"))
    return report


# --------------------------------------------------------------------------------------------- case -> sample
def import_case(case_dir: str | Path) -> tuple[SampleMeta, dict[str, bytes]]:
    """Read an official case folder as a v2 sample: its meta and its image members (PNG bytes).

    Member names follow the shard convention (face_<i>.png, attr_<i>_<j>.png, object_<j>.png, background.png,
    i = person id); person ids are the subject folder numbers, kept as they are (folders 1 and 3 are persons 1
    and 3). Masks, keyframes and boxes are unknown (None).
    Raises schemas.official_case.CaseFormatError for folders off the layout, labels included.
    """
    case = read_case(case_dir)
    members: dict[str, bytes] = {}
    persons = []
    for pid, subject in zip(case.subject_numbers(), case.subjects, strict=True):
        face = f"face_{pid}.png"
        members[face] = subject.face.png_bytes()
        attributes = []
        for j, attr in enumerate(subject.attributes):
            name = f"attr_{pid}_{j}.png"
            members[name] = attr.png_bytes()
            attributes.append(SampleAttribute(label=attr.label, image=name))
        persons.append(
            SamplePerson(person_id=pid, label=subject.face.label, face=face, attributes=attributes)
        )
    objects = []
    for j, obj in enumerate(case.objects):
        name = f"object_{j}.png"
        members[name] = obj.png_bytes()
        objects.append(SampleObject(label=obj.label, image=name))
    background = None
    if case.background is not None:
        members["background.png"] = case.background.png_bytes()
        background = SampleBackground(label=case.background.label, image="background.png")
    meta = SampleMeta(
        schema_version=2,
        key=case.case_id,
        caption=case.caption,
        persons=persons,
        objects=objects,
        background=background,
    )
    return meta, members
