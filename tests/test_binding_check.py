"""The visual binding check on constructed frames: two real persons (from the group photo) in garments of known
colours, scripted entity answers through the public registry hook, real ingest/keyframes/masks/binding/sample
stages. A correct binding passes with its scores in meta.json; a swapped one is caught (colour matcher, real
pixels); the tiny CLIP build runs the same code path; a grounder that ignores the person box binds nothing."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from subject_fixtures import FakePlateDetector, FakeSegmenter, ingest_contexts

from flows.sample_data import write_video
from models.base import ModelSpec
from models.grounding import GroundedBox
from schemas.config import BindingConfig, CurateConfig, EntitiesConfig, ShardConfig
from schemas.entities import BindingRecord
from schemas.records import (
    Box,
    CaptionRecord,
    FaceDetection,
    FacesRecord,
    KeyframesRecord,
    ModelInfo,
    Person,
    PersonDetection,
    PersonsRecord,
)
from schemas.sample import load_sample_meta
from tasks.background import BackgroundStage
from tasks.base import VideoContext
from tasks.binding_check import BindingCheckStage, masked_crop
from tasks.entities import EntitiesStage, entity_models
from tasks.keyframes import KeyframesStage
from tasks.mask_ops import face_crop
from tasks.masks import OUTSIDE_PERSON, MasksStage
from tasks.runner import run_stage
from tasks.sample import SampleStage
from tests.binding_frames import GARMENT_BOXES, PERSON_BOXES, two_person_frame

FACES = {0: Box(x0=115, y0=40, x1=195, y1=130), 1: Box(x0=455, y0=45, x1=530, y1=125)}
SCRIPTED = ModelInfo(backend="scripted", model_id="test")

# name -> (garment colours, caption, the model's binding: person -> attributes)
VIDEOS = {
    "correct": (
        {0: "white", 1: "black"},
        "A woman in a white jacket holds playing cards next to a laughing man in a black jacket.",
        {0: ("woman", ["white jacket"]), 1: ("man", ["black jacket"])},
    ),
    "swapped": (
        {0: "white", 1: "black"},
        "Next to a laughing man in a black jacket, a woman in a white jacket holds playing cards.",
        {0: ("woman", ["black jacket"]), 1: ("man", ["white jacket"])},  # the model mixed them up
    ),
    "shared": (
        {0: "black", 1: "black"},
        "A woman and a man both wear black jackets and play cards.",
        {0: ("woman", ["black jackets"]), 1: ("man", ["black jackets"])},
    ),
}


class _ScriptedQwen:
    """Registered as an entities backend (`entity_models().register`): the stage builds it from its spec and
    it answers each video's prompt with that video's binding."""

    info = SCRIPTED

    @classmethod
    def from_spec(cls, spec):
        return cls()

    def generate(self, messages_batch, max_new_tokens):
        out = []
        for conversation in messages_batch:
            prompt = conversation[0]["content"][-1]["text"]
            _, caption, binding = next(v for v in VIDEOS.values() if json.dumps(v[1]) in prompt)
            subjects = [
                {"person_id": pid, "noun": noun, "attributes": [{"phrase": a, "kind": "top"} for a in attrs]}
                for pid, (noun, attrs) in binding.items()
            ]
            out.append(json.dumps({"subjects": subjects, "objects": [], "background": None}))
        return out


entity_models().register("scripted-bindings")(_ScriptedQwen)


class GarmentGrounder:
    """Finds "the jacket" inside the search region, whatever its colour: what GroundingDINO does when the phrase's
    colour is wrong but a jacket is there. So a swapped binding reaches the binding check with the OTHER colour's
    pixels. `region_blind`: answers in frame coordinates with the garment of the phrase's colour, wherever it is
    (the issue's grounder that ignored the person box)."""

    info = ModelInfo(backend="garment-grounder")

    def __init__(self, colours: dict[int, str], region_blind: bool = False):
        self.colours, self.region_blind = colours, region_blind

    def detect(self, images, phrases, regions=None):
        out = []
        for item, region in zip(phrases, regions or [None] * len(images)):
            found = []
            for phrase in item:
                for pid, box in GARMENT_BOXES.items():
                    if self.region_blind:
                        hit = self.colours[pid] in phrase
                    else:
                        hit = region is not None and box.fraction_inside(region) == 1.0
                    if hit:
                        found.append(GroundedBox(phrase, box, 0.8))
            out.append(found)
        return out


def _config(binding: BindingConfig | None = None) -> CurateConfig:
    return CurateConfig(
        subjects=True,
        entities=EntitiesConfig(model=ModelSpec(backend="scripted-bindings")),
        binding=binding or BindingConfig(model=ModelSpec(backend="colour", device="cpu")),
        shards=ShardConfig(include_random_weights=True),
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, VideoContext]:
    """Each constructed video after real ingest and keyframes, with scripted caption/persons/faces records and
    the entities stage run through the registry hook (contexts are deep-copied by the tests)."""
    root: Path = tmp_path_factory.mktemp("binding_videos")
    paths = []
    for n, (name, (colours, caption, _)) in enumerate(VIDEOS.items()):
        frame = two_person_frame(colours)
        # Different lengths: the videos' content ids differ (identical files would be one video).
        paths.append(write_video(root / f"{name}.mp4", [frame] * (20 + n), 16))
        (root / f"{name}.txt").write_text(caption)
    config = _config()
    items = ingest_contexts(paths, config)
    run_stage(KeyframesStage(config), items)
    contexts = {Path(c.uri).stem: c for c in items}
    for name, ctx in contexts.items():
        assert ctx.failure is None, ctx.failure
        ctx.records["caption"] = CaptionRecord(
            video_id=ctx.video_id, caption=VIDEOS[name][1], source="sidecar"
        )
        keyframes = ctx.record("keyframes", KeyframesRecord).keyframes
        persons = []
        for pid, box in PERSON_BOXES.items():
            crop = ctx.put(f"face_{pid}.png", face_crop(ctx.pil(keyframes[1].path), FACES[pid]))
            persons.append(
                Person(
                    person_id=pid,
                    boxes={k.index: box for k in keyframes},
                    scores={k.index: 0.9 for k in keyframes},
                    face=FaceDetection(keyframe=1, box=FACES[pid], score=0.99),
                    face_path=crop,
                )
            )
        detections = [
            PersonDetection(keyframe=k, box=b, score=0.9) for p in persons for k, b in p.boxes.items()
        ]
        ctx.records["persons"] = PersonsRecord(video_id=ctx.video_id, model=SCRIPTED, detections=detections)
        ctx.records["faces"] = FacesRecord(video_id=ctx.video_id, model=SCRIPTED, persons=persons)
    stats = run_stage(EntitiesStage(config), items)  # setup() builds the registered scripted backend
    assert stats.ok == len(items), [c.failure for c in items]
    return contexts


def _through_masks(world, name: str, **grounder) -> VideoContext:
    ctx = copy.deepcopy(world[name])
    stage = MasksStage(
        _config(), grounder=GarmentGrounder(VIDEOS[name][0], **grounder), segmenter=FakeSegmenter()
    )
    run_stage(stage, [ctx])
    assert ctx.failure is None, ctx.failure
    return ctx


def _check(ctx: VideoContext, config: CurateConfig) -> BindingRecord | None:
    run_stage(BindingCheckStage(config), [ctx])  # setup() builds the configured embedder from the registry
    return ctx.records.get("binding")  # type: ignore[return-value]


def _sample(ctx: VideoContext, config: CurateConfig):
    """Background (no background phrase: selection only) and the sample stage; the sample's meta."""
    run_stage(BackgroundStage(config, inpainter=object(), plate_detector=FakePlateDetector()), [ctx])
    run_stage(SampleStage(config), [ctx])
    assert ctx.failure is None, ctx.failure
    return load_sample_meta(ctx.output["meta.json"])


def test_correct_binding_passes_with_its_scores_recorded(world):
    ctx = _through_masks(world, "correct")
    record = _check(ctx, _config())
    by_label = {s.label: s for s in record.attributes}
    for label, other in (("white jacket", "black jacket"), ("black jacket", "white jacket")):
        s = by_label[label]
        assert s.verdict == "verified", s
        assert s.keyframes == [0, 1, 2] and s.other_phrase == other
        assert s.phrase_score > 0.9 and s.other_phrase_score < 0.1  # real pixels of a white / black garment
        assert (
            s.region_score > 0.8 and s.other_region_score == 0.0
        )  # on its own person (an ellipse mask here)
    assert record.model.backend == "colour" and not record.model.random_weights
    meta = _sample(ctx, _config())
    attrs = {a.label: a for p in meta.persons for a in p.attributes}
    assert set(attrs) == {"white jacket", "black jacket"} and meta.dropped == []
    assert attrs["white jacket"].binding == by_label["white jacket"]  # the scores travel to meta.json
    raw = json.loads(ctx.output["meta.json"])
    assert raw["persons"][0]["attributes"][0]["binding"]["verdict"] == "verified"
    assert meta.models["binding"].backend == "colour"


def test_swapped_binding_is_caught_and_dropped(world):
    ctx = _through_masks(world, "swapped")
    record = _check(ctx, _config())
    by_person = {s.person_id: s for s in record.attributes}
    assert by_person[0].label == "black jacket" and by_person[0].verdict == "failed"
    assert by_person[0].other_phrase == "white jacket" and "white jacket" in by_person[0].reason
    assert by_person[0].phrase_score < by_person[0].other_phrase_score
    assert by_person[1].verdict == "failed"
    meta = _sample(ctx, _config())
    assert all(p.attributes == [] for p in meta.persons)  # the faces stay: only the wrong bindings go
    dropped = {d.entity: d.reason for d in meta.dropped}
    assert set(dropped) == {"attr_0_0", "attr_1_0"}
    assert all(r.startswith("binding_unverified") for r in dropped.values())


def test_swapped_binding_fails_the_video_when_asked_to(world):
    ctx = _through_masks(world, "swapped")
    config = _config(BindingConfig(model=ModelSpec(backend="colour"), on_failure="fail"))
    assert _check(ctx, config) is None
    assert ctx.failure.stage == "binding" and ctx.failure.error_class == "binding_unverified"
    assert "'black jacket'" in ctx.failure.message


def test_region_blind_grounder_binds_nothing_outside_the_person(world):
    """The grounder finds "black jacket" on the man although it was asked inside the woman's box: the masks
    stage's own check rejects it, so no crop of another person ever stands for this person's attribute."""
    ctx = _through_masks(world, "swapped", region_blind=True)
    masks = ctx.records["masks"]
    assert masks.get("attr_0_0").reasons() == dict.fromkeys([0, 1, 2], OUTSIDE_PERSON)
    record = _check(ctx, _config())
    assert {s.key: s.verdict for s in record.attributes} == {"attr_0_0": "no_mask", "attr_1_0": "no_mask"}
    meta = _sample(ctx, _config())
    assert all(p.attributes == [] for p in meta.persons)
    assert all(OUTSIDE_PERSON in d.reason for d in meta.dropped)


class _RightGarmentGrounder:
    """Always finds the right-hand person's garment (for any region that contains it)."""

    info = ModelInfo(backend="right-garment")

    def detect(self, images, phrases, regions=None):
        box = GARMENT_BOXES[1]
        return [
            [GroundedBox(p, box, 0.8) for p in item if r is not None and box.fraction_inside(r) == 1.0]
            for item, r in zip(phrases, regions)
        ]


def test_region_check_says_whose_body_the_mask_is_on(world):
    """Person boxes that overlap (person 0's box spans the frame): the man's jacket is inside the woman's box, so
    containment passes, but most of its mask lies on the man's own (SAM) region: the binding fails on region."""
    ctx = copy.deepcopy(world["correct"])
    faces = ctx.records["faces"]
    wide = Box(x0=40, y0=0, x1=601, y1=360)
    faces.persons[0] = faces.persons[0].model_copy(
        update={"boxes": dict.fromkeys(faces.persons[0].boxes, wide)}
    )
    run_stage(MasksStage(_config(), grounder=_RightGarmentGrounder(), segmenter=FakeSegmenter()), [ctx])
    record = _check(ctx, _config())
    woman = next(s for s in record.attributes if s.person_id == 0)
    assert woman.verdict == "failed" and woman.other_region_person == 1
    assert woman.other_region_score > woman.region_score and "of its mask lies on person 1" in woman.reason
    man = next(s for s in record.attributes if s.person_id == 1)
    assert man.region_score >= man.other_region_score and man.verdict == "verified"


def test_shared_attribute_is_kept_for_both(world):
    """ "A woman and a man both wear black jackets": kept for each person (the default policy). The identical
    phrase is no evidence against itself, so the phrase comparison is empty ("unverified"), the region check
    still runs; and the trainer's MCAM gives the shared words level 0 for both groups."""
    from lumosx_model.layout import Condition, SampleLayout
    from lumosx_model.masks import mcam_template

    assert world["shared"].records["entities"].shared_attributes == {"black jackets": [0, 1]}
    ctx = _through_masks(world, "shared")
    record = _check(ctx, _config())
    for s in record.attributes:
        assert s.verdict == "unverified" and s.other_phrase is None, s
        assert (
            s.region_score > 0.8 and s.other_region_score == 0.0
        )  # on its own person (an ellipse mask here)
    meta = _sample(ctx, _config())
    assert [[a.label for a in p.attributes] for p in meta.persons] == [["black jackets"], ["black jackets"]]

    words = ["A", "woman", "and", "a", "man", "both", "wear", "black", "jackets", "and", "play", "cards", "."]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    ids = [vocab[w] for w in words]
    conditions = [
        Condition("face", "woman", 0),
        Condition("attribute", "black jackets", 0),
        Condition("face", "man", 1),
        Condition("attribute", "black jackets", 1),
    ]
    labels = [[vocab[w] for w in c.label.split()] for c in conditions]
    template = mcam_template(SampleLayout.from_conditions(conditions), ids, labels)
    shared = [i for i, w in enumerate(words) if w in ("black", "jackets")]
    assert template[:, shared].abs().sum() == 0  # level 0: the shared words favour neither group
    assert template[0, words.index("woman")] == 1 and template[0, words.index("man")] == -1


def test_tiny_clip_runs_the_same_code_path(world):
    """Random weights: the verdict means nothing, the fields must all be there and flagged."""
    ctx = _through_masks(world, "correct")
    config = _config(BindingConfig(model=ModelSpec(backend="clip", random_init=True, device="cpu")))
    record = _check(ctx, config)
    assert record.model.random_weights and record.model.backend == "clip"
    for s in record.attributes:
        assert s.verdict in ("verified", "failed") and s.keyframes == [0, 1, 2]
        for value in (s.phrase_score, s.other_phrase_score, s.region_score, s.other_region_score):
            assert isinstance(value, float) and -1.0 <= value <= 1.0
    meta = _sample(ctx, config)
    assert "binding" in meta.random_weight_stages and meta.random_weights
    kept = [a.binding for p in meta.persons for a in p.attributes]
    assert all(b is not None and b.verdict == "verified" for b in kept)
    assert len(kept) + len(meta.dropped) == 2


def test_masked_crop():
    frame = np.zeros((20, 30, 3), np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[5:10, 10:20] = True
    crop = masked_crop(frame, mask)
    assert crop.shape == (5, 10, 4) and (crop[..., 3] == 255).all()
    boxed = masked_crop(frame, None, Box(x0=0, y0=0, x1=4, y1=3))
    assert boxed.shape == (3, 4, 4)
    with pytest.raises(ValueError):
        masked_crop(frame, np.zeros((20, 30), bool))


def test_one_batch_for_several_videos_and_a_missing_mask_fails_only_its_video(world):
    broken, correct, swapped = (_through_masks(world, n) for n in ("correct", "correct", "swapped"))
    broken.video = broken.video.model_copy(update={"video_id": "vbroken"})  # a third video id in the batch
    broken.source = broken.source.model_copy(update={"video_id": "vbroken"})
    del broken.media[broken.records["masks"].get("attr_1_0").frames[0].mask]

    class Counting:
        def __init__(self, inner):
            self.inner, self.info, self.calls = inner, inner.info, []

        def embed_images(self, images):
            self.calls.append(len(images))
            return self.inner.embed_images(images)

        def embed_texts(self, texts):
            self.texts = list(texts)
            return self.inner.embed_texts(texts)

    from models.image_text import IMAGE_TEXT

    embedder = Counting(IMAGE_TEXT.build(ModelSpec(backend="colour")))
    stats = run_stage(BindingCheckStage(_config(), embedder=embedder), [broken, correct, swapped])
    assert embedder.calls == [12]  # one call: 2 attributes x 3 keyframes x 2 good videos
    assert embedder.texts == ["a photo of black jacket", "a photo of white jacket"]  # binding.text_template
    assert broken.failure is not None and broken.failure.error_class == "missing_media"
    assert {s.verdict for s in correct.records["binding"].attributes} == {"verified"}
    assert {s.verdict for s in swapped.records["binding"].attributes} == {"failed"}
    assert stats.ok == 2
