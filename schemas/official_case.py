"""The official LumosX case layout (inference and benchmark input), read and written byte-compatibly.

```
<case>/caption.txt                      one line: "<case id>;<caption>" (no trailing newline)
<case>/subjects/<k>/face_<label>.png    k = 1, 2, 3 ... one folder per person
<case>/subjects/<k>/<attribute>.png
<case>/objects/<object>.png             optional
<case>/background/<background>.png      optional, at most one
```

The authors' inference script parses this layout with a few rules that constrain the labels (they double as
file names), so the record rejects labels their parser would misread (`schemas.labels`, shared with the
entities stage and export):

- the caption line is split at the first ``;`` -> a case id cannot contain ``;``;
- any file in a subject folder whose name contains ``face`` is the face, ``face_`` is stripped -> an attribute
  label cannot contain ``face``;
- object and background labels are read as the file name up to the first ``.`` -> they cannot contain ``.``;
- files containing ``fullfullbody`` are skipped.

Reading tolerates what copying a case around adds: dot-files (macOS ``._*`` resource forks, ``.DS_Store``) are
ignored; subject folders must be numbered, and their numbers are kept (`CaseSubject.number`), gaps included.

Every label must appear verbatim (as whole words) in the caption: the cross-attention mask finds it there by
exact token match, so a label that is not in the caption silently conditions nothing.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.entities import appears_verbatim
from schemas.labels import SKIPPED_MARKER, label_problem

CAPTION_FILE = "caption.txt"
SUBJECTS_DIR = "subjects"
OBJECTS_DIR = "objects"
BACKGROUND_DIR = "background"
FACE_PREFIX = "face_"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FOLDER_NUMBER = re.compile(r"^[0-9]{1,6}$")


class CaseFormatError(ValueError):
    """A case folder does not follow the official layout."""


class CaseImage(BaseModel):
    """One labelled condition image, given either as a file or as encoded image bytes."""

    model_config = ConfigDict(frozen=True)

    label: str
    path: Path | None = None
    data: bytes | None = Field(default=None, repr=False)

    @field_validator("label")
    @classmethod
    def _label_is_a_file_name(cls, label: str) -> str:
        problem = label_problem(label)
        if problem is not None:
            raise ValueError(f"{problem.message}: it cannot be a file name")
        return label

    @model_validator(mode="after")
    def _one_source(self) -> CaseImage:
        if (self.path is None) == (self.data is None):
            raise ValueError(f"image {self.label!r}: give exactly one of path or data")
        return self

    def read_bytes(self) -> bytes:
        return self.data if self.data is not None else Path(self.path).read_bytes()  # type: ignore[arg-type]

    def png_bytes(self) -> bytes:
        """The image as PNG bytes; PNG input is passed through untouched (byte-exact round trips)."""
        raw = self.read_bytes()
        if raw.startswith(_PNG_SIGNATURE):
            return raw
        from PIL import Image

        with Image.open(io.BytesIO(raw)) as im:
            out = io.BytesIO()
            im.save(out, format="PNG")
            return out.getvalue()


class CaseSubject(BaseModel):
    """One person: a face crop (its label is the subject noun as written in the caption) plus attributes."""

    model_config = ConfigDict(frozen=True)

    face: CaseImage
    attributes: list[CaseImage] = Field(default_factory=list)
    number: int | None = Field(
        None, ge=0, description="the subject folder number (read cases); None: numbered 1, 2, ... on write"
    )

    @model_validator(mode="after")
    def _attribute_labels_readable(self) -> CaseSubject:
        for attr in self.attributes:
            problem = label_problem(attr.label, "attribute")
            if problem is not None:
                raise ValueError(problem.message)
        labels = [a.label for a in self.attributes]
        if len(set(labels)) != len(labels):
            raise ValueError(f"duplicate attribute labels in one subject: {labels}")
        return self


class OfficialCase(BaseModel):
    """One case of the official layout. Build it in memory (e.g. from a curated sample) or with read_case."""

    model_config = ConfigDict(frozen=True)

    case_id: str
    caption: str
    subjects: list[CaseSubject] = Field(default_factory=list)
    objects: list[CaseImage] = Field(default_factory=list)
    background: CaseImage | None = None

    @field_validator("case_id")
    @classmethod
    def _case_id_ok(cls, case_id: str) -> str:
        if not case_id or any(ch in case_id for ch in ";\n\r"):
            raise ValueError(f"case id {case_id!r} must be non-empty and contain no ';' or line break")
        return case_id

    @field_validator("caption")
    @classmethod
    def _caption_one_line(cls, caption: str) -> str:
        if not caption.strip() or "\n" in caption or "\r" in caption:
            raise ValueError("caption must be one non-empty line")
        return caption

    @model_validator(mode="after")
    def _labels_verbatim(self) -> OfficialCase:
        for image in self.all_images():
            if not appears_verbatim(image.label, self.caption):
                raise ValueError(
                    f"label {image.label!r} does not appear verbatim in the caption {self.caption!r}"
                )
        roles = [("object", o) for o in self.objects] + [("background", b) for b in [self.background] if b]
        for role, image in roles:
            problem = label_problem(image.label, role)  # type: ignore[arg-type]
            if problem is not None:
                raise ValueError(problem.message)
        names = [o.label for o in self.objects]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate object labels: {names}")
        numbers = [s.number for s in self.subjects]
        if any(n is not None for n in numbers) and (None in numbers or len(set(numbers)) != len(numbers)):
            raise ValueError(f"subject numbers must be given for every subject and differ: {numbers}")
        return self

    def subject_numbers(self) -> list[int]:
        """The folder number of every subject: the read ones, or 1, 2, ... for cases built in memory."""
        if self.subjects and self.subjects[0].number is not None:
            return [s.number for s in self.subjects]  # type: ignore[misc]
        return list(range(1, len(self.subjects) + 1))

    def all_images(self) -> list[CaseImage]:
        images: list[CaseImage] = []
        if self.background is not None:
            images.append(self.background)
        images.extend(self.objects)
        for subject in self.subjects:
            images.append(subject.face)
            images.extend(subject.attributes)
        return images

    def faces_only(self) -> OfficialCase:
        """The identity-consistent variant of the case: faces, no attributes, objects or background."""
        return OfficialCase(
            case_id=self.case_id,
            caption=self.caption,
            subjects=[CaseSubject(face=s.face, number=s.number) for s in self.subjects],
        )


def _hidden(path: Path) -> bool:
    # macOS copies leave "._<name>" AppleDouble files and .DS_Store next to every file; editors leave ".#x".
    return path.name.startswith(".")


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and not _hidden(p)
        and p.suffix.lower() in IMAGE_SUFFIXES
        and SKIPPED_MARKER not in p.name
    )


def _subject_folders(subjects_root: Path) -> list[tuple[int, Path]]:
    """(number, folder) of every subject folder, by number; CaseFormatError for unnumbered or clashing ones."""
    numbered: dict[int, Path] = {}
    for folder in subjects_root.iterdir():
        if _hidden(folder) or not folder.is_dir():
            continue
        if not _FOLDER_NUMBER.match(folder.name):
            raise CaseFormatError(
                f"{folder}: subject folders are named by their person number (1, 2, 3, ...), not {folder.name!r}"
            )
        number = int(folder.name)
        if number in numbered:
            raise CaseFormatError(f"{folder} and {numbered[number]} are both subject {number}")
        numbered[number] = folder
    return sorted(numbered.items())


def read_case(case_dir: str | os.PathLike[str]) -> OfficialCase:
    """Read a case folder; CaseFormatError for anything off the layout, bad labels included (the message says
    which file and which rule)."""
    try:
        return _read_case(Path(case_dir))
    except ValidationError as exc:
        problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors()[:3])
        raise CaseFormatError(f"{case_dir}: {problems}") from None


def _read_case(root: Path) -> OfficialCase:
    caption_path = root / CAPTION_FILE
    if not caption_path.is_file():
        raise CaseFormatError(f"{root}: missing {CAPTION_FILE}")
    line = caption_path.read_text(encoding="utf-8").rstrip("\r\n")
    if "\n" in line:
        raise CaseFormatError(f"{caption_path}: expected one line '<case id>;<caption>'")
    case_id, sep, caption = line.partition(";")
    if not sep:
        raise CaseFormatError(f"{caption_path}: expected '<case id>;<caption>', found no ';'")

    subjects: list[CaseSubject] = []
    subjects_root = root / SUBJECTS_DIR
    if subjects_root.is_dir():
        for number, folder in _subject_folders(subjects_root):
            faces, attributes = [], []
            for path in _image_files(folder):
                if "face" in path.name:
                    if not path.stem.startswith(FACE_PREFIX):
                        raise CaseFormatError(
                            f"{path}: the official reader takes any file whose name contains 'face' for the "
                            f"face image; the face is named {FACE_PREFIX}<label> and no other file contains 'face'"
                        )
                    faces.append(CaseImage(label=path.stem[len(FACE_PREFIX) :], path=path))
                else:
                    attributes.append(CaseImage(label=path.stem, path=path))
            if len(faces) != 1:
                raise CaseFormatError(
                    f"{folder}: expected exactly one face_<label> image, found {len(faces)}"
                )
            subjects.append(CaseSubject(face=faces[0], attributes=attributes, number=number))

    objects: list[CaseImage] = []
    if (root / OBJECTS_DIR).is_dir():
        objects = [CaseImage(label=p.stem, path=p) for p in _image_files(root / OBJECTS_DIR)]

    background = None
    if (root / BACKGROUND_DIR).is_dir():
        backgrounds = _image_files(root / BACKGROUND_DIR)
        if len(backgrounds) > 1:
            raise CaseFormatError(
                f"{root / BACKGROUND_DIR}: at most one background image, found {len(backgrounds)}"
            )
        if backgrounds:
            background = CaseImage(label=backgrounds[0].stem, path=backgrounds[0])

    if not subjects and not objects and background is None:
        raise CaseFormatError(f"{root}: no condition images (subjects/, objects/ or background/)")
    return OfficialCase(
        case_id=case_id, caption=caption, subjects=subjects, objects=objects, background=background
    )


def write_case(case: OfficialCase, case_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write a case in the official layout. The folder appears atomically (built aside, then renamed).

    PNG inputs are copied byte for byte; other formats are converted to PNG. Raises FileExistsError when the
    folder exists and overwrite is False.
    """
    target = Path(case_dir)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists (pass overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        # No trailing newline: the authors' reader keeps it as part of the caption.
        (staging / CAPTION_FILE).write_bytes(f"{case.case_id};{case.caption}".encode())
        for k, subject in zip(case.subject_numbers(), case.subjects, strict=True):
            folder = staging / SUBJECTS_DIR / str(k)
            folder.mkdir(parents=True)
            (folder / f"{FACE_PREFIX}{subject.face.label}.png").write_bytes(subject.face.png_bytes())
            for attr in subject.attributes:
                (folder / f"{attr.label}.png").write_bytes(attr.png_bytes())
        if case.objects:
            (staging / OBJECTS_DIR).mkdir()
            for obj in case.objects:
                (staging / OBJECTS_DIR / f"{obj.label}.png").write_bytes(obj.png_bytes())
        if case.background is not None:
            (staging / BACKGROUND_DIR).mkdir()
            (staging / BACKGROUND_DIR / f"{case.background.label}.png").write_bytes(
                case.background.png_bytes()
            )
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
