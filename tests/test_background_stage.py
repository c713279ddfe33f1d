"""Background stage: per-entity keyframe selection, one FLUX generation per plate, plate check with retries."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
from PIL import Image
from subject_fixtures import FakeGrounder, FakePlateDetector, FakeSegmenter, ScriptedEntities, build_world

from models.base import ModelSpec
from models.inpainter import INPAINTERS
from schemas.config import BackgroundConfig, CurateConfig, SelectConfig
from schemas.entities import EntitiesRecord
from schemas.records import FacesRecord, KeyframesRecord
from tasks.background import (
    BACKGROUND_KEY,
    BackgroundRecord,
    BackgroundStage,
    entity_candidates,
    select_entity_keyframes,
)
from tasks.base import VideoContext
from tasks.entities import EntitiesStage
from tasks.masks import MasksRecord, MasksStage
from tasks.runner import run_stage
from tasks.select import all_from_one_keyframe

CONFIG = CurateConfig(subjects=True, background=BackgroundConfig(max_retries=2, dilate_frac=0.01))


@pytest.fixture(scope="module")
def world(sample_videos):
    """Both scripted videos up to their masks record (object_0 of two_people is empty on keyframe 0)."""
    w = build_world(sample_videos, ("two_people", "astronaut_zoom"), CONFIG)
    vids = sorted(w.ids.values())  # the batch order decides which frame is the segmenter's n-th
    base = 3 * vids.index(w.ids["two_people"])
    items = sorted(w.items(), key=lambda c: c.video_id)
    for stage in (
        EntitiesStage(CONFIG, generator=ScriptedEntities()),
        MasksStage(CONFIG, grounder=FakeGrounder(), segmenter=FakeSegmenter({(base, 5): "empty"})),
    ):
        stats = run_stage(stage, items)
        assert all(c.failure is None for c in items), (stage.name, [c.failure for c in items])
        assert stats.ok == stats.processed == len(vids), stats
        assert all(stage.name in c.records for c in items)
    return w


class CountingPipe:
    """Wraps the FluxFillPipeline: counts pipeline calls and the images generated."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.calls: list[int] = []

    def __call__(self, **kwargs):
        self.calls.append(len(kwargs["prompt"]))
        return self.pipe(**kwargs)


@pytest.fixture(scope="module")
def flux():
    spec = ModelSpec(
        backend="flux-fill",
        random_init=True,
        device="cpu",
        options={"num_inference_steps": 2, "max_side": 64},
    )
    inpainter = INPAINTERS.build(spec)
    inpainter.pipe = CountingPipe(inpainter.pipe)
    return inpainter


def _contexts(world, names) -> list[VideoContext]:
    """Copies of the named videos' contexts (the stage adds its plates to them, never to the shared world)."""
    return [copy.deepcopy(world.contexts[n]) for n in names]


def _records(world, name):
    ctx = world.contexts[name]
    return (
        ctx.record("entities", EntitiesRecord),
        ctx.record("faces", FacesRecord),
        ctx.record("masks", MasksRecord),
    )


def test_selection_pins_faces_and_spreads_keyframes(world):
    vid = world.ids["two_people"]
    entities, faces, masks = _records(world, "two_people")
    cands = entity_candidates(entities, faces, masks, [0, 1, 2])
    assert cands["face_0"] == [1] and cands["face_1"] == [1]  # the faces stage's crop keyframe
    assert cands["object_0"] == [1, 2]  # its mask was empty on keyframe 0
    assert cands[BACKGROUND_KEY] == [0, 1, 2] and cands["person_0"] == [0, 1, 2]
    draws = [select_entity_keyframes(cands, f"{vid}\x1f{salt}") for salt in range(20)]
    for sel in draws:
        assert set(sel) == set(cands)
        assert all(sel[k] in cands[k] for k in sel)
        assert not all_from_one_keyframe(sel)
    assert draws[0] == select_entity_keyframes(cands, f"{vid}\x1f0")  # reproducible
    assert len({tuple(sorted(d.items())) for d in draws}) > 1  # the salt draws other keyframes


def test_one_flux_generation_per_plate_and_retry_when_a_person_remains(world, flux):
    flux.pipe.calls.clear()
    detector = FakePlateDetector(first_n=1)  # the first plate still "shows" a person
    stage = BackgroundStage(CONFIG, inpainter=flux, plate_detector=detector)
    two_ctx, astro_ctx = _contexts(world, ["two_people", "astronaut_zoom"])
    out = stage.process([two_ctx, astro_ctx])
    two, astro = out[world.ids["two_people"]], out[world.ids["astronaut_zoom"]]
    assert isinstance(two, BackgroundRecord) and isinstance(astro, BackgroundRecord)

    # The astronaut caption has no background phrase: skipped before any model call, selection still made.
    assert astro.status == "skipped" and astro.flux_calls == 0 and "no background phrase" in astro.reason
    assert astro.selection and BACKGROUND_KEY not in astro.selection
    assert astro.plate is None and astro.foreground_mask is None
    assert set(astro_ctx.media) == set(world.contexts["astronaut_zoom"].media)  # no image added

    # two_people: rejected once by the plate check, accepted with the next seed.
    assert two.status == "ok" and two.reason is None and two.label == "plain beige wall"
    assert two.flux_calls == 2 and len(two.attempts) == 2
    assert two.attempts[0].persons_found == 1 and two.attempts[1].persons_found == 0
    assert two.attempts[0].seed != two.attempts[1].seed
    assert flux.pipe.calls == [1, 1]  # only the background's keyframe is inpainted, once per attempt
    assert two.keyframe == two.selection[BACKGROUND_KEY]
    assert two.inpainter.random_weights and two.plate_checker.backend == "fake-plate-check"

    # The plate and its foreground mask are PNG bytes in the video's media, by the names the record gives.
    assert isinstance(two_ctx.media[two.plate], bytes)
    assert isinstance(two_ctx.media[two.foreground_mask], bytes)
    with Image.open(io.BytesIO(two_ctx.data(two.plate))) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        plate = np.asarray(im)
    fg = two_ctx.mask(two.foreground_mask)
    assert plate.shape == (360, 640, 3) and fg.shape == (360, 640)
    # Both persons (and their surroundings) were repainted; outside the foreground the frame is untouched.
    faces = two_ctx.record("faces", FacesRecord)
    for p in faces.persons:
        cx, cy = (int(v) for v in p.boxes[two.keyframe].center)
        assert fg[cy, cx]
    keyframes = two_ctx.record("keyframes", KeyframesRecord).keyframes
    frame = two_ctx.rgb(keyframes[two.keyframe].path)
    assert np.array_equal(plate[~fg], frame[~fg])


def test_plate_rejected_after_max_retries(world, flux):
    flux.pipe.calls.clear()
    stage = BackgroundStage(CONFIG, inpainter=flux, plate_detector=FakePlateDetector(first_n=99))
    (ctx,) = _contexts(world, ["two_people"])
    rec = stage.process([ctx])[world.ids["two_people"]]
    assert rec.status == "rejected" and rec.plate is None
    assert len(rec.attempts) == rec.flux_calls == CONFIG.background.max_retries + 1
    assert "person on the plate after 3 attempt(s)" in rec.reason
    assert len({a.seed for a in rec.attempts}) == 3
    assert set(ctx.media) == set(world.contexts["two_people"].media)  # no plate stored for a rejected one


def test_seed_salt_and_plate_check_are_in_the_fingerprint(world):
    up = {"masks": "m", "entities": "e", "keyframes": "k", "faces": "f"}
    base = BackgroundStage(CONFIG).fingerprint(up)
    salted = CONFIG.model_copy(update={"select": SelectConfig(seed_salt="x")})
    assert BackgroundStage(salted).fingerprint(up) != base
    stricter = CONFIG.model_copy(update={"persons": CONFIG.persons.model_copy(update={"min_score": 0.9})})
    assert BackgroundStage(stricter).fingerprint(up) != base
