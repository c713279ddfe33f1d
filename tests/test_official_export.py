"""Shard samples (v1 and v2) -> official case folders and back; unsafe labels and keys fail with a reason."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from schemas.official_case import CaseFormatError, read_case
from schemas.sample import SampleMeta, dump_sample_meta, load_sample_meta
from tasks.official_export import (
    ExportError,
    case_dir,
    check_case_id,
    check_label,
    export_cases,
    guess_subject_noun,
    import_case,
    iter_shard_samples,
)

CAPTION = (
    "A man on the left in a white jacket talks to a woman in a red dress at a wooden cutting board "
    "in a modern kitchen."
)


def png(colour, size=(12, 10)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def v2_sample(
    key: str,
    caption: str = CAPTION,
    persons=None,
    objects=None,
    background="modern kitchen",
    content_id: str | None = None,
) -> dict:
    """A v2 webdataset sample dict (member name -> bytes) with consistent meta.json."""
    persons = (
        persons if persons is not None else [("man on the left", ["white jacket"]), ("woman", ["red dress"])]
    )
    objects = objects if objects is not None else ["wooden cutting board"]
    members: dict[str, bytes] = {"mp4": b"\x00\x00\x00\x18ftypmp42", "caption.txt": caption.encode()}
    meta_persons = []
    for i, (label, attrs) in enumerate(persons):
        members[f"face_{i}.png"] = png((200, 150, 100 + i))
        meta_attrs = []
        for j, attr in enumerate(attrs):
            members[f"attr_{i}_{j}.png"] = png((250, 10 * j, 10 * i))
            members[f"attrmask_{i}_{j}.png"] = png((255, 255, 255))
            meta_attrs.append(
                {
                    "label": attr,
                    "kind": "top",
                    "image": f"attr_{i}_{j}.png",
                    "mask": f"attrmask_{i}_{j}.png",
                    "keyframe": j % 3,
                    "box": {"x0": 1, "y0": 2, "x1": 3, "y1": 4},
                    "score": 0.8,
                }
            )
        meta_persons.append(
            {
                "person_id": i,
                "label": label,
                "face": f"face_{i}.png",
                "face_keyframe": 1,
                "whole": None,
                "attributes": meta_attrs,
            }
        )
    meta_objects = []
    for j, obj in enumerate(objects):
        members[f"object_{j}.png"] = png((120, 80, 40 + j))
        members[f"objmask_{j}.png"] = png((255, 255, 255))
        meta_objects.append(
            {"label": obj, "image": f"object_{j}.png", "mask": f"objmask_{j}.png", "keyframe": 2}
        )
    bg = None
    if background:
        members["background.png"] = png((90, 90, 90), (32, 18))
        bg = {"label": background, "image": "background.png", "keyframe": 1}
    meta = SampleMeta.model_validate(
        {
            "schema_version": 2,
            "key": key,
            "caption": caption,
            "video": {"content_id": content_id or key, "fps": 16.0},
            "persons": meta_persons,
            "objects": meta_objects,
            "background": bg,
            "models": {"entities": {"backend": "qwen2.5-vl"}},
            "config_fingerprint": "abc",
        }
    )
    members["meta.json"] = dump_sample_meta(meta)
    return members


def v1_sample(key: str, caption: str, n_persons: int, content_id: str | None = None) -> dict:
    """A v1 identity-only sample, built with the v1 writer's own schema (schemas/sample.py)."""
    from schemas.records import Box
    from schemas.sample import SamplePerson, SampleVideo

    members = {"mp4": b"\x00", "caption.txt": caption.encode()}
    persons = []
    for i in range(n_persons):
        members[f"face_{i}.png"] = png((180, 140, 110 + i))
        persons.append(
            SamplePerson(
                person_id=i,
                face=f"face_{i}.png",
                face_keyframe=1,
                face_box=Box(x0=0, y0=0, x1=5, y1=5),
                face_score=0.9,
                boxes={1: Box(x0=0, y0=0, x1=9, y1=9)},
            )
        )
    meta = SampleMeta(
        schema_version=1,
        key=key,
        caption=caption,
        caption_source="sidecar",
        video=SampleVideo(
            uri="/v.mp4",
            content_id=content_id or key,
            fps=25.0,
            width=64,
            height=48,
            duration_s=2.0,
            num_frames=50,
            clip_width=64,
            clip_height=48,
            clip_reencoded=False,
        ),
        keyframes=[],
        persons=persons,
        models={},
        random_weights=False,
        config_fingerprint="x",
        stage_fingerprints={},
        producer="test",
    )
    members["meta.json"] = dump_sample_meta(meta)
    return members


def write_shard(path: Path, samples: dict[str, dict]) -> str:
    with wds.TarWriter(str(path)) as sink:
        for key, members in samples.items():
            sink.write({"__key__": key, **members})
    return str(path)


def files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_subject_and_identity_export(tmp_path):
    sample = v2_sample("vid_001")
    shard = write_shard(tmp_path / "shard-000000.tar", {"vid_001": sample})
    report = export_cases(shard, tmp_path / "subject", task="subject")
    assert report.failures == [] and list(report.written) == ["vid_001"]
    root = report.written["vid_001"]
    assert files(root) == [
        "background/modern kitchen.png",
        "caption.txt",
        "objects/wooden cutting board.png",
        "subjects/1/face_man on the left.png",
        "subjects/1/white jacket.png",
        "subjects/2/face_woman.png",
        "subjects/2/red dress.png",
    ]
    assert (root / "caption.txt").read_bytes() == f"vid_001;{CAPTION}".encode()
    assert (root / "subjects/2/red dress.png").read_bytes() == sample["attr_1_0.png"]  # byte-exact cut-out
    case = read_case(root)
    assert [s.face.label for s in case.subjects] == ["man on the left", "woman"]

    ident = export_cases(tmp_path / "shard-000000.tar", tmp_path / "identity", task="identity")
    assert files(ident.written["vid_001"]) == [
        "caption.txt",
        "subjects/1/face_man on the left.png",
        "subjects/2/face_woman.png",
    ]


def test_shard_directory_keys_filter_and_not_found(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "shard-000000.tar", {"a_1": v2_sample("a_1"), "a_2": v2_sample("a_2")})
    write_shard(shards / "shard-000001.tar", {"b_1": v2_sample("b_1")})
    report = export_cases(shards, tmp_path / "out", keys=["a_2", "b_1", "zzz"])
    assert sorted(report.written) == ["a_2", "b_1"]
    assert [(f.key, f.reason) for f in report.failures] == [("zzz", "not_found")]
    again = export_cases(shards, tmp_path / "out", keys=["a_2"])
    assert again.reasons() == {"exists": 1}
    assert list(export_cases(shards, tmp_path / "out", keys=["a_2"], overwrite=True).written) == ["a_2"]


def test_cases_do_not_read_clips_or_masks(tmp_path):
    shard = write_shard(tmp_path / "s.tar", {"vid_001": v2_sample("vid_001")})
    from tasks.official_export import _needed_for_cases

    (sample,) = iter_shard_samples(shard, select_members=_needed_for_cases)
    assert "mp4" not in sample.members and not any("mask" in m for m in sample.members)
    assert "meta.json" in sample.members and "attr_0_0.png" in sample.members


def test_v1_samples_are_identity_cases_only(tmp_path):
    shard = write_shard(
        tmp_path / "v1.tar",
        {
            "one": v1_sample("one", "A young woman with curly hair smiles at the camera.", 1),
            "two": v1_sample("two", "Two people, a man and a woman, dance in a hall.", 2),
        },
    )
    ident = export_cases(shard, tmp_path / "identity", task="identity")
    assert list(ident.written) == ["one"]
    assert files(ident.written["one"]) == ["caption.txt", "subjects/1/face_woman.png"]
    assert [(f.key, f.reason) for f in ident.failures] == [("two", "unlabelled_person")]
    subj = export_cases(shard, tmp_path / "subject", task="subject")
    assert subj.written == {} and subj.reasons() == {"identity_only": 2}


def test_v1_meta_reads_with_its_provenance():
    raw = json.loads(v1_sample("one", "A man runs.", 1)["meta.json"])
    # Plain-json readers find the v2 keys in a v1 meta too, empty.
    assert raw["objects"] == [] and raw["background"] is None and raw["persons"][0]["attributes"] == []
    meta = load_sample_meta(raw)
    assert meta.schema_version == 1 and meta.random_weights is False and not meta.has_subject_conditions
    assert meta.persons[0].face == "face_0.png" and meta.persons[0].label is None
    assert meta.video.content_id == "one" and meta.producer == "test"
    assert meta.persons[0].boxes[1].x1 == 9
    assert dump_sample_meta(meta) == dump_sample_meta(load_sample_meta(dump_sample_meta(meta)))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"schema_version": 3}, "unsupported meta.json schema_version 3"),
        ({"schema_version": None}, "unsupported meta.json schema_version None"),
        ({"surprise": 1}, "surprise"),  # a new key needs a new schema_version
        ({"objects": [{"label": "man", "image": "object_0.png"}]}, "faces only"),  # v1 has no conditions
    ],
)
def test_meta_reader_rejects_what_it_does_not_know(change, match):
    raw = json.loads(v1_sample("one", "A man runs.", 1)["meta.json"])
    with pytest.raises(ValueError, match=match):
        load_sample_meta({**raw, **change})


@pytest.mark.parametrize(
    "label, reason",
    [
        ("AC/DC shirt", "path_separator"),
        (
            "face mask",
            "face_in_attribute",
        ),  # the official reader takes any file with "face" in it for the face
    ],
)
def test_bad_attribute_labels_fail_with_reason(tmp_path, label, reason):
    caption = f"A man in a {label} walks a dog in a park."
    shard = write_shard(
        tmp_path / "s.tar",
        {"k_1": v2_sample("k_1", caption, persons=[("man", [label])], objects=["dog"], background="park")},
    )
    report = export_cases(shard, tmp_path / "out")
    assert report.written == {} and [f.reason for f in report.failures] == [reason]
    assert not (tmp_path / "out" / "k_1").exists()
    assert files(tmp_path / "out") == []  # nothing half-written


def test_object_label_with_dot_and_dotdot(tmp_path):
    caption = "A man reads the St. Louis Post next to a sign saying open..now in a park."
    samples = {
        "k_1": v2_sample(
            "k_1", caption, persons=[("man", [])], objects=["St. Louis Post"], background="park"
        ),
        "k_2": v2_sample("k_2", caption, persons=[("man", [])], objects=["open..now"], background="park"),
    }
    report = export_cases(write_shard(tmp_path / "s.tar", samples), tmp_path / "out")
    assert {f.key: f.reason for f in report.failures} == {"k_1": "dot_in_label", "k_2": "dot_path"}
    # The identity task has no object labels: both cases are fine there.
    assert len(export_cases(tmp_path / "s.tar", tmp_path / "ident", task="identity").written) == 2


def test_label_and_key_checks():
    for bad in [
        "",
        " man",
        "..",
        "../etc",
        "a/b",
        "a\\b",
        "x\x00y",
        "line\nbreak",
        ".hidden",
        "a:b",
        "x" * 300,
    ]:
        with pytest.raises(ExportError):
            check_label(bad)
    assert check_label("man on the left") == "man on the left"
    assert check_label("café crème") == "café crème"
    for bad in ["..", "../x", "a/b", "a.b", "", "a b", "x" * 200]:
        with pytest.raises(ExportError) as info:
            check_case_id(bad)
        assert info.value.reason == "unsafe_key"
    assert case_dir(Path("/tmp/out"), "vid_1") == Path("/tmp/out/vid_1").resolve()


def test_unsafe_key_missing_member_bad_meta_and_corrupt_shard(tmp_path):
    bad_key = v2_sample("evil_key")
    bad_key["meta.json"] = bad_key["meta.json"].replace(b'"evil_key"', b'"ev il"')
    missing = v2_sample("missing_1")
    del missing["attr_0_0.png"]
    garbage = v2_sample("garbage_1")
    garbage["meta.json"] = b"{not json"
    good = write_shard(
        tmp_path / "a.tar",
        {"ev il": bad_key, "missing_1": missing, "garbage_1": garbage, "fine_1": v2_sample("fine_1")},
    )
    corrupt = tmp_path / "b.tar"
    corrupt.write_bytes(b"this is not a tar file" * 100)
    report = export_cases([good, str(corrupt)], tmp_path / "out")
    assert list(report.written) == ["fine_1"]
    assert report.reasons() == {
        "unsafe_key": 1,
        "missing_member": 1,
        "invalid_meta": 1,
        "unreadable_shard": 1,
    }
    assert files(tmp_path / "out")[0].startswith("fine_1/")
    assert not any("ev il" in f for f in files(tmp_path))


def test_import_round_trip(tmp_path):
    sample = v2_sample("vid_007")
    report = export_cases(write_shard(tmp_path / "s.tar", {"vid_007": sample}), tmp_path / "out")
    meta, members = import_case(report.written["vid_007"])
    assert meta.key == "vid_007" and meta.caption == CAPTION
    assert [(p.person_id, p.label, [a.label for a in p.attributes]) for p in meta.persons] == [
        (1, "man on the left", ["white jacket"]),
        (2, "woman", ["red dress"]),
    ]
    assert [o.label for o in meta.objects] == ["wooden cutting board"]
    assert meta.background is not None and meta.background.label == "modern kitchen"
    assert (
        members["face_1.png"] == sample["face_0.png"]  # folder 1 = person 1 (the sample's person 0)
        and members["background.png"] == sample["background.png"]
    )
    assert set(meta.members()) == set(members)
    # And back out again: the same folder, byte for byte.
    again = write_shard(
        tmp_path / "again.tar", {"vid_007": {**members, "meta.json": meta.model_dump_json().encode()}}
    )
    second = export_cases(again, tmp_path / "out2")
    first_root, second_root = report.written["vid_007"], second.written["vid_007"]
    assert files(first_root) == files(second_root)
    assert all((first_root / f).read_bytes() == (second_root / f).read_bytes() for f in files(first_root))


def test_import_keeps_folder_numbers_and_ignores_finder_files(tmp_path):
    """Subject folders 1 and 3 are persons 1 and 3 (not renumbered); macOS `._*` files are not images."""
    report = export_cases(
        write_shard(tmp_path / "s.tar", {"vid_007": v2_sample("vid_007")}), tmp_path / "out"
    )
    root = report.written["vid_007"]
    (root / "subjects/2").rename(root / "subjects/3")
    (root / "subjects/1/._face_man on the left.png").write_bytes(b"\x00\x05\x16\x07Mac OS X")
    (root / "subjects/3/._red dress.png").write_bytes(b"\x00\x05\x16\x07Mac OS X")
    (root / ".DS_Store").write_bytes(b"Bud1")
    meta, members = import_case(root)
    assert [(p.person_id, p.label, p.face) for p in meta.persons] == [
        (1, "man on the left", "face_1.png"),
        (3, "woman", "face_3.png"),
    ]
    assert meta.persons[1].attributes[0].image == "attr_3_0.png" and set(meta.members()) == set(members)
    (root / "subjects/three").mkdir()
    with pytest.raises(CaseFormatError, match="person number"):
        import_case(root)


def test_guess_subject_noun():
    assert guess_subject_noun("A woman and her dog walk.") == "woman"
    assert guess_subject_noun("Close-up of a Man smiling; a boy waves.") == "Man"
    assert guess_subject_noun("A red car drives by.") is None
