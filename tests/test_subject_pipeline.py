"""Subject-consistent curation end to end: entities -> masks -> background -> v2 sample -> shard -> official case.

Models are scripted or fake where random weights would produce garbage (see subject_fixtures.py); FLUX Fill is
the real tiny test build, wrapped to count its calls. The sample stage builds each sample in memory
(`ctx.output`: member name -> bytes); the shard writer (`tasks.shards.PartitionWriter`) packs them into a
shard for the readers downstream (trainer, official export, manifest). The last tests run the whole Prefect
flow with the `test` profile (all random builds): failures must be recorded with reasons, nothing may crash.
"""

from __future__ import annotations

import copy
import io
import json
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from subject_fixtures import FakeGrounder, FakePlateDetector, FakeSegmenter, ScriptedEntities, build_world

from models.base import ModelSpec
from models.image_text import IMAGE_TEXT
from models.inpainter import INPAINTERS
from schemas.config import STAGE_NAMES, BackgroundConfig, ClipConfig, CurateConfig, ShardConfig
from schemas.entities import appears_verbatim
from schemas.sample import SampleMeta, SampleRecord, load_sample_meta
from tasks.background import BackgroundStage
from tasks.base import VideoContext
from tasks.binding_check import BindingCheckStage
from tasks.entities import EntitiesStage
from tasks.masks import MasksStage
from tasks.official_export import export_cases, import_case
from tasks.output import MANIFEST, SHARDS, OutputDir
from tasks.pipeline import Pipeline, stage_classes, stage_fingerprints
from tasks.runner import run_stage
from tasks.sample import SampleStage
from tasks.select import all_from_one_keyframe
from tasks.shards import PartitionWriter, finalize

# The tiny FLUX build has random weights: its samples are written (flagged) only when asked for.
CONFIG = CurateConfig(
    subjects=True,
    clip=ClipConfig(max_side=320),
    background=BackgroundConfig(max_retries=1),
    shards=ShardConfig(include_random_weights=True),
)


class CountingPipe:
    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __call__(self, **kwargs):
        self.calls.append(len(kwargs["prompt"]))
        return self.pipe(**kwargs)


def _stages(flux) -> list:
    return [
        EntitiesStage(CONFIG, generator=ScriptedEntities()),
        MasksStage(CONFIG, grounder=FakeGrounder(), segmenter=FakeSegmenter()),
        # The offline colour matcher checks the bindings (CONFIG's CLIP is not on this machine).
        BindingCheckStage(CONFIG, embedder=IMAGE_TEXT.build(ModelSpec(backend="colour"))),
        BackgroundStage(CONFIG, inpainter=flux, plate_detector=FakePlateDetector(first_n=0)),
    ]


@pytest.fixture(scope="module")
def curated(tmp_path_factory, sample_videos):
    """Run every stage on two_people (2 subjects, objects, background) and astronaut_zoom (no background),
    then pack both samples into one shard with the shard writer (the world's contexts keep their `output`)."""
    root = tmp_path_factory.mktemp("subjects")
    w = build_world(sample_videos, ("two_people", "astronaut_zoom"), CONFIG)
    flux = INPAINTERS.build(
        ModelSpec(
            backend="flux-fill",
            random_init=True,
            device="cpu",
            options={"num_inference_steps": 2, "max_side": 64},
        )
    )
    flux.pipe = CountingPipe(flux.pipe)
    pipeline = Pipeline.of(CONFIG, stage_classes(CONFIG))
    items = sorted(w.items(), key=lambda c: c.video_id)
    for ctx in items:
        ctx.fingerprints = dict(pipeline.fingerprints)  # as the executor starts every context
    for stage in [*_stages(flux), SampleStage(CONFIG)]:
        stats = run_stage(stage, items)
        assert all(c.failure is None for c in items), (stage.name, [c.failure for c in items])
        assert stats.ok == stats.processed == len(items), stats
    outputs = {ctx.video_id: dict(ctx.output) for ctx in items}

    # The writer empties `ctx.output` once the bytes are in the tar: give it copies.
    output = OutputDir(str(root / "out"))
    writer = PartitionWriter(output, pipeline, partition=0, start_seq=0, cfg=CONFIG.shards)
    commits = writer.add(0, [copy.copy(ctx) for ctx in items])
    commits += writer.close()
    assert sum(c.samples for c in commits) == 2 and not any(c.failed for c in commits), commits
    assert all(ctx.output == outputs[ctx.video_id] for ctx in items)
    return w, root, flux


def _meta(w, name) -> tuple[SampleMeta, dict[str, bytes]]:
    """The sample's meta (validated by the one reader of meta.json) and its members (name -> bytes)."""
    ctx = w.contexts[name]
    assert ctx.output is not None
    return load_sample_meta(ctx.output["meta.json"]), ctx.output


def _shard_members(root: Path) -> dict[str, dict[str, bytes]]:
    """key -> {member -> bytes} of every sample in the shards, as a tar reader sees them."""
    out: dict[str, dict[str, bytes]] = {}
    for shard in sorted((root / "out" / SHARDS).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar:
                key, _, member = info.name.partition(".")
                out.setdefault(key, {})[member] = tar.extractfile(info).read()  # type: ignore[union-attr]
    return out


def _white_outside(members: dict[str, bytes], image_name: str, mask_name: str) -> None:
    image = np.asarray(Image.open(io.BytesIO(members[image_name])).convert("RGB"))
    mask = np.asarray(Image.open(io.BytesIO(members[mask_name])).convert("L")) > 0
    assert image.shape[:2] == mask.shape, (image_name, image.shape, mask.shape)
    assert mask.any() and (~mask).any(), "an ellipse cut-out has both inside and outside pixels"
    assert (image[~mask] == 255).all(), f"{image_name} is not white outside its mask"
    # Tight crop: the mask touches every border of the cut-out.
    assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()


def test_v2_sample_formats_and_relation_graph(curated):
    w, root, flux = curated
    meta, d = _meta(w, "two_people")
    assert meta.schema_version == 2
    assert [(p.person_id, p.label) for p in meta.persons] == [(0, "woman"), (1, "man")]
    assert [[a.label for a in p.attributes] for p in meta.persons] == [
        ["black top", "long strawberry-blonde hair"],
        ["dark red shirt"],
    ]
    assert [o.label for o in meta.objects] == ["playing cards", "blue poker chip"]
    assert meta.background is not None and meta.background.label == "plain beige wall"

    # The sample record lists the members the shard gets; the shard holds exactly those bytes.
    record = w.contexts["two_people"].record("sample", SampleRecord)
    assert record.key == meta.key == w.ids["two_people"] and record.schema_version == 2
    assert record.members == list(d) == sorted(d)
    assert _shard_members(root)[w.ids["two_people"]] == d

    # Every label verbatim in the caption, every member present, exactly one face per group.
    for label in meta.labels():
        assert appears_verbatim(label, meta.caption), label
    assert d["caption.txt"].decode("utf-8") == meta.caption
    members = set(d)
    assert {"mp4", "caption.txt", "meta.json"} <= members
    assert set(meta.members()) <= members
    assert sorted(m for m in members if m.startswith("face_")) == sorted(p.face for p in meta.persons)
    assert len({p.face for p in meta.persons}) == len(meta.persons) == 2

    for p in meta.persons:
        assert p.face_keyframe == 1 and p.face_box is not None
        # Attribute: white-background cut-out of its mask, grounded inside ITS person's box on its keyframe.
        for a in p.attributes:
            _white_outside(d, a.image, a.mask)
            assert a.box.fraction_inside(p.boxes[a.keyframe]) == 1.0
            assert a.keyframe == meta.selection[f"attr_{p.person_id}_{p.attributes.index(a)}"]
        assert p.whole == f"person_{p.person_id}.png" and p.whole_mask == f"personmask_{p.person_id}.png"
        _white_outside(d, p.whole, p.whole_mask)
        assert p.whole_keyframe == meta.selection[f"person_{p.person_id}"]
    for o in meta.objects:
        _white_outside(d, o.image, o.mask)
    assert {
        "attrmask_0_0.png",
        "attrmask_0_1.png",
        "attrmask_1_0.png",
        "objmask_0.png",
        "objmask_1.png",
        "personmask_0.png",
        "personmask_1.png",
        "background.png",
    } <= members

    # One keyframe per entity, not all from the same one; the plate is the selected background keyframe's.
    assert not all_from_one_keyframe(meta.selection)
    assert meta.background.keyframe == meta.selection["background"]
    plate = Image.open(io.BytesIO(d["background.png"]))
    assert plate.size == (640, 360)
    # FLUX Fill: one generation for this sample, none for the astronaut (no background phrase).
    assert meta.background_status.flux_calls == 1 and meta.background_status.status == "ok"
    assert flux.pipe.calls == [1]
    assert meta.dropped == []
    # Every attribute carries its visual binding check (the colour matcher: real, no random weights).
    bindings = {a.label: a.binding for p in meta.persons for a in p.attributes}
    assert all(b is not None and b.verdict != "failed" for b in bindings.values()), bindings
    assert bindings["long strawberry-blonde hair"].verdict == "unverified"  # no colour word: no evidence
    assert meta.models["binding"].backend == "colour" and "binding" not in meta.random_weight_stages
    assert meta.random_weights and "background" in meta.random_weight_stages  # tiny FLUX
    assert record.random_weights
    assert meta.video.content_id == w.ids["two_people"]


def test_v2_sample_without_background(curated):
    w, _, _ = curated
    meta, d = _meta(w, "astronaut_zoom")
    assert meta.background is None and "background.png" not in d
    status = meta.background_status
    assert status.status == "skipped" and "no background phrase" in status.reason
    assert status.flux_calls == 0
    assert [p.label for p in meta.persons] == ["woman astronaut"]
    assert meta.has_subject_conditions


def test_random_weight_samples_are_refused_unless_asked_for(curated):
    """The same videos without `shards.include_random_weights`: the tiny FLUX build's samples are refused."""
    w, _, _ = curated
    strict = CONFIG.model_copy(update={"shards": ShardConfig()})
    items: list[VideoContext] = []
    for name in ("two_people", "astronaut_zoom"):
        ctx = copy.deepcopy(w.contexts[name])
        ctx.records.pop("sample")
        ctx.output = None
        items.append(ctx)
    stats = run_stage(SampleStage(strict), items)
    two, astro = items
    assert two.failure is not None and two.failure.stage == "sample"
    assert two.failure.error_class == "random_weights" and "background" in two.failure.message
    assert two.output is None and "sample" not in two.records
    # The astronaut's sample used no random-weight model (its background was skipped): written as usual.
    assert astro.failure is None and astro.output is not None
    assert stats.ok == 1 and stats.failed == {"random_weights": 1}


def test_trainer_reads_the_v2_sample(curated):
    from lumosx_model.conditions import conditions_from_meta

    w, root, _ = curated
    members = _shard_members(root)[w.ids["two_people"]]  # what the trainer's loader gets from the shard
    raw = json.loads(members["meta.json"])
    conds = conditions_from_meta(raw, members, rng=random.Random(0), whole_person_prob=0.0)
    kinds = [c.condition.kind for c in conds]
    assert kinds.count("face") == 2 and kinds.count("attribute") == 3
    assert kinds.count("object") == 2 and kinds.count("background") == 1


def test_export_official_case_round_trip(curated):
    w, root, _ = curated
    cases = root / "cases"
    report = export_cases(root / "out" / SHARDS, cases, task="subject")
    assert not report.failures, report.failures
    assert sorted(report.written) == sorted(w.ids.values())
    case = cases / w.ids["two_people"]
    assert sorted(p.name for p in (case / "subjects" / "1").iterdir()) == [
        "black top.png",
        "face_woman.png",
        "long strawberry-blonde hair.png",
    ]
    assert (case / "background" / "plain beige wall.png").is_file()
    assert sorted(p.name for p in (case / "objects").iterdir()) == [
        "blue poker chip.png",
        "playing cards.png",
    ]

    meta, d = _meta(w, "two_people")
    imported, members = import_case(case)
    assert imported.caption == meta.caption
    assert sorted(imported.labels()) == sorted(meta.labels())  # the layout keeps objects in file-name order
    for orig, back in zip(meta.persons, imported.persons):
        assert members[back.face] == d[orig.face]  # PNGs pass through byte for byte
        for a, b in zip(orig.attributes, back.attributes):
            assert members[b.image] == d[a.image]
    objects = {o.label: members[o.image] for o in imported.objects}
    assert objects == {o.label: d[o.image] for o in meta.objects}
    assert members[imported.background.image] == d["background.png"]


def test_manifest_reads_v2_samples(curated):
    w, root, _ = curated
    output = OutputDir(str(root / "out"))
    summary = finalize(output, {c.uri for c in w.contexts.values()}, [])
    # Only two_people's sample used a random-weight model (tiny FLUX): the astronaut's background was skipped.
    assert summary.samples == 2 and summary.random_weight_samples == 1 and not summary.failures
    rows = pq.read_table(output.path(MANIFEST)).to_pylist()
    assert len(rows) == 2
    by_key = {r["key"]: r for r in rows}
    assert set(by_key) == set(w.ids.values())
    two = by_key[w.ids["two_people"]]
    assert (
        two["schema_version"] == 2
        and two["num_faces"] == 2
        and two["caption"] == w.contexts["two_people"].record("caption").caption
    )


def test_pipeline_order_follows_the_switch():
    names = [c.name for c in stage_classes(CONFIG)]
    v1_names = ["ingest", "keyframes", "caption", "persons", "faces"]
    assert names == [*v1_names, "entities", "masks", "binding", "background", "sample"]
    v1 = CONFIG.model_copy(update={"subjects": False})
    assert [c.name for c in stage_classes(v1)] == [*v1_names, "sample"]
    # The v1 sample fingerprint ignores the subject stages; the v2 one covers them.
    up = {s: s for s in ["caption", "keyframes", "faces", "entities", "masks", "binding", "background"]}
    for stage in ("masks", "binding"):
        changed = dict(up, **{stage: "other"})
        assert SampleStage(v1).fingerprint(up) == SampleStage(v1).fingerprint(changed)
        assert SampleStage(CONFIG).fingerprint(up) != SampleStage(CONFIG).fingerprint(changed)
    # And so do the pipeline's fingerprints: a masks setting changes the v2 sample's, not the v1 one's.
    masks = CONFIG.masks.model_copy(update={"min_area_frac": 0.5 * CONFIG.masks.min_area_frac})

    def sample_fp(cfg: CurateConfig) -> str:
        return stage_fingerprints(cfg)["sample"]

    assert sample_fp(v1) == sample_fp(v1.model_copy(update={"masks": masks}))
    assert sample_fp(CONFIG) != sample_fp(CONFIG.model_copy(update={"masks": masks}))


def _shard_metas(out: Path) -> list[SampleMeta]:
    metas = []
    for shard in sorted((out / SHARDS).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar:
                if info.name.endswith(".meta.json"):
                    metas.append(load_sample_meta(tar.extractfile(info).read()))  # type: ignore[union-attr]
    return metas


def _two_people_input(sample_videos, tmp_path) -> Path:
    videos = tmp_path / "videos"
    videos.mkdir()
    for p in sample_videos:
        if p.stem == "two_people":
            shutil.copy(p, videos / p.name)
            shutil.copy(p.with_suffix(".txt"), videos / f"{p.stem}.txt")
    return videos


def test_flow_with_random_test_builds_records_failures(prefect_harness, sample_videos, tmp_path):
    """Profile `test` (random builds) for the subject stages, real offline detectors before them so the video
    reaches the entities model. The flow must finish and say why the video did not become a sample."""
    from flows.curate import curate
    from schemas.config import load_config

    videos = _two_people_input(sample_videos, tmp_path)
    offline = load_config("offline")
    overrides = {
        "caption": {"source": "sidecar"},
        "persons": offline.persons.model_dump(mode="json"),
        "faces": offline.faces.model_dump(mode="json"),
    }
    out = tmp_path / "out"
    report = curate(
        input=str(videos),
        output=str(out),
        profile="test",
        overrides=overrides,
        progress=False,
        executor="local",
    )
    stages = report["stages"]
    assert list(stages) == list(STAGE_NAMES)  # every stage, subject stages included, in run order
    assert report["videos_found"] == 1
    failed = {name: s["failed"] for name, s in stages.items() if s["failed"]}
    # Either the video made it to a (flagged) sample or one stage recorded why it did not.
    assert report["samples"] == 1 or len(failed) == 1, report
    for reasons in failed.values():
        assert all(isinstance(r, str) and r for r in reasons)
    metas = _shard_metas(out)
    assert len(metas) == report["samples"]
    if report["samples"]:
        assert report["random_weight_samples"] == 1
        assert "entities" in metas[0].random_weight_stages
    else:
        assert report["videos_failed"] == 1


class _ScriptedBackend:
    """Registry backend standing in for Qwen2.5-VL inside the flow: the stage builds it from the spec."""

    @classmethod
    def from_spec(cls, spec):
        return ScriptedEntities()


def test_flow_makes_v2_samples_with_scripted_entities(prefect_harness, sample_videos, tmp_path, monkeypatch):
    """The whole flow with real offline detectors, scripted entity answers and random GroundingDINO, SAM and
    FLUX builds: the subject stages run inside the flow (in-process executor, so the scripted backend is the
    one the stage builds) and the run ends with v2 samples in shards."""
    import tasks.entities
    from flows.curate import curate
    from models.base import Registry
    from schemas.config import load_config

    registry = Registry("entities model")
    registry.register("qwen2.5-vl")(_ScriptedBackend)
    monkeypatch.setattr(tasks.entities, "_ENTITY_MODELS", registry)
    videos = _two_people_input(sample_videos, tmp_path)
    offline = load_config("offline")
    overrides = {
        "caption": {"source": "sidecar"},
        "persons": offline.persons.model_dump(mode="json"),
        "faces": offline.faces.model_dump(mode="json"),
        "masks": {"grounder": {"options": {"box_threshold": 0.0, "text_threshold": 0.0}}},
    }
    out = tmp_path / "out"
    report = curate(
        input=str(videos),
        output=str(out),
        profile="test",
        overrides=overrides,
        progress=False,
        executor="local",
    )
    metas = _shard_metas(out)
    assert len(metas) == 1, metas
    meta = metas[0]
    assert meta.schema_version == 2 and [p.label for p in meta.persons] == ["woman", "man"]
    assert meta.random_weights and {"entities", "masks", "background"} & set(meta.random_weight_stages)
    assert report["stages"]["entities"]["ok"] == 1, report
    assert report["samples"] == 1, report
