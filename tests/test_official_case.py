"""Official case layout: read/write round trip, byte compatibility, label rules."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from pydantic import ValidationError

from schemas.official_case import (
    CaseFormatError,
    CaseImage,
    CaseSubject,
    OfficialCase,
    read_case,
    write_case,
)

CAPTION = (
    "A man on the left in a white jacket talks to a woman in a red dress; they stand at a wooden "
    "cutting board in a modern kitchen."
)


def _png(color: tuple[int, int, int], size: tuple[int, int] = (12, 9)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def _jpeg(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(out, format="JPEG")
    return out.getvalue()


def _case() -> OfficialCase:
    return OfficialCase(
        case_id="case_007",
        caption=CAPTION,
        subjects=[
            CaseSubject(
                face=CaseImage(label="man on the left", data=_png((200, 150, 120))),
                attributes=[CaseImage(label="white jacket", data=_png((250, 250, 250)))],
            ),
            CaseSubject(
                face=CaseImage(label="woman", data=_png((190, 140, 110))),
                attributes=[CaseImage(label="red dress", data=_jpeg((200, 0, 0)))],
            ),
        ],
        objects=[CaseImage(label="wooden cutting board", data=_png((120, 80, 40)))],
        background=CaseImage(label="modern kitchen", data=_png((90, 90, 90), (32, 18))),
    )


def test_write_produces_official_layout_bytes(tmp_path):
    case = _case()
    root = write_case(case, tmp_path / "case_007")
    # One line, no trailing newline: the authors' reader keeps everything after the first ';' as the caption.
    assert (root / "caption.txt").read_bytes() == f"case_007;{CAPTION}".encode()
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == [
        "background/modern kitchen.png",
        "caption.txt",
        "objects/wooden cutting board.png",
        "subjects/1/face_man on the left.png",
        "subjects/1/white jacket.png",
        "subjects/2/face_woman.png",
        "subjects/2/red dress.png",
    ]
    # PNG passes through byte for byte; JPEG is converted to PNG.
    assert (root / "subjects/1/white jacket.png").read_bytes() == case.subjects[0].attributes[0].data
    assert (root / "subjects/2/red dress.png").read_bytes().startswith(b"\x89PNG")


def test_round_trip(tmp_path):
    case = _case()
    first = read_case(write_case(case, tmp_path / "a"))
    assert first.case_id == case.case_id and first.caption == case.caption  # ';' inside the caption survives
    assert [s.face.label for s in first.subjects] == ["man on the left", "woman"]
    assert [[a.label for a in s.attributes] for s in first.subjects] == [["white jacket"], ["red dress"]]
    assert [o.label for o in first.objects] == ["wooden cutting board"]
    assert first.background is not None and first.background.label == "modern kitchen"
    second = read_case(write_case(first, tmp_path / "b"))
    assert second.model_dump(exclude={"subjects", "objects", "background"}) == first.model_dump(
        exclude={"subjects", "objects", "background"}
    )
    for a, b in zip(first.all_images(), second.all_images(), strict=True):
        assert a.label == b.label and a.read_bytes() == b.read_bytes()
    ident = first.faces_only()
    assert ident.objects == [] and ident.background is None and all(not s.attributes for s in ident.subjects)


def test_subject_folders_sorted_numerically_and_extra_files_ignored(tmp_path):
    case = OfficialCase(
        case_id="c",
        caption=" ".join(f"p{i}" for i in range(11)),
        subjects=[CaseSubject(face=CaseImage(label=f"p{i}", data=_png((i, i, i)))) for i in range(11)],
    )
    root = write_case(case, tmp_path / "c")
    (root / "subjects/1/fullfullbody_p0.png").write_bytes(_png((1, 2, 3)))  # skipped like the authors' reader
    assert [s.face.label for s in read_case(root).subjects] == [f"p{i}" for i in range(11)]


@pytest.mark.parametrize(
    "bad",
    [
        dict(objects=[CaseImage(label="spoon", data=_png((0, 0, 0)))]),  # not in caption
        dict(
            objects=[CaseImage(label="man", data=_png((0, 0, 0)))],  # only inside "woman"
            caption="A woman cooks.",
        ),
        dict(subjects=[CaseSubject(face=CaseImage(label="Man", data=_png((0, 0, 0))))]),  # case differs
    ],
)
def test_rejects_labels_not_verbatim(bad):
    fields = dict(case_id="x", caption="A man cooks.")
    fields.update(bad)
    with pytest.raises(ValidationError, match="verbatim"):
        OfficialCase(**fields)


def test_rejects_labels_the_official_reader_would_misread():
    with pytest.raises(ValidationError, match="'face'"):
        CaseSubject(
            face=CaseImage(label="man", data=b"x"), attributes=[CaseImage(label="face mask", data=b"x")]
        )
    with pytest.raises(ValidationError, match="'.'"):
        OfficialCase(
            case_id="x",
            caption="A man with a 2.5 kg bag.",
            objects=[CaseImage(label="2.5 kg bag", data=b"x")],
        )
    with pytest.raises(ValidationError, match="';'"):
        OfficialCase(
            case_id="a;b", caption="A man.", subjects=[CaseSubject(face=CaseImage(label="man", data=b"x"))]
        )
    with pytest.raises(ValidationError, match="file name"):
        CaseImage(label="a/b", data=b"x")
    with pytest.raises(ValidationError, match="exactly one"):
        CaseImage(label="a")


def test_read_errors(tmp_path):
    with pytest.raises(CaseFormatError, match="caption.txt"):
        read_case(tmp_path)
    (tmp_path / "caption.txt").write_text("no separator here")
    with pytest.raises(CaseFormatError, match="';'"):
        read_case(tmp_path)
    (tmp_path / "caption.txt").write_text("id;A man.\n")  # a trailing newline is tolerated on read
    with pytest.raises(CaseFormatError, match="no condition images"):
        read_case(tmp_path)
    (tmp_path / "subjects/1").mkdir(parents=True)
    (tmp_path / "subjects/1/hat.png").write_bytes(_png((0, 0, 0)))
    with pytest.raises(CaseFormatError, match="exactly one face"):
        read_case(tmp_path)
    (tmp_path / "subjects/1/face_man.png").write_bytes(_png((0, 0, 0)))
    with pytest.raises(CaseFormatError, match="verbatim"):
        read_case(tmp_path)  # "hat" is not in the caption: a bad folder is a CaseFormatError, labels included
    (tmp_path / "subjects/1/hat.png").unlink()
    (tmp_path / "subjects/1/face mask.png").write_bytes(_png((0, 0, 0)))
    with pytest.raises(CaseFormatError, match="contains 'face'"):
        read_case(tmp_path)  # "face mask.png" is a second face to the official reader
    (tmp_path / "subjects/1/face mask.png").unlink()
    (tmp_path / "subjects/man").mkdir()
    with pytest.raises(CaseFormatError, match="person number"):
        read_case(tmp_path)
    (tmp_path / "subjects/man").rmdir()
    (tmp_path / "subjects/01").mkdir()
    with pytest.raises(CaseFormatError, match="both subject 1"):
        read_case(tmp_path)


def test_finder_files_are_ignored_and_folder_numbers_kept(tmp_path):
    """The authors' data ships macOS AppleDouble files (`._face_man.png`) and .DS_Store; folders may skip
    numbers. Person numbers are the folder numbers, gaps included, and survive a write."""
    root = write_case(_case(), tmp_path / "case")
    (root / "subjects/2").rename(root / "subjects/3")
    for folder in ("subjects/1", "subjects/3", "objects", "background"):
        (root / folder / "._face_man.png").write_bytes(b"\x00\x05\x16\x07 Mac OS X resource fork")
        (root / folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "subjects/.hidden").mkdir()
    case = read_case(root)
    assert [(s.number, s.face.label) for s in case.subjects] == [(1, "man on the left"), (3, "woman")]
    assert [o.label for o in case.objects] == ["wooden cutting board"]
    assert case.subject_numbers() == [1, 3]
    again = read_case(write_case(case, tmp_path / "again"))
    assert [s.number for s in again.subjects] == [1, 3]
    assert _case().subject_numbers() == [1, 2]  # built in memory: numbered on write


def test_write_refuses_to_clobber(tmp_path):
    case = _case()
    write_case(case, tmp_path / "c")
    with pytest.raises(FileExistsError):
        write_case(case, tmp_path / "c")
    write_case(case, tmp_path / "c", overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
