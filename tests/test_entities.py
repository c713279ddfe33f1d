"""Entities stage: answer parsing on realistic model outputs, binding rules, retries, the visual prior, Qwen
test build."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from models.base import ModelSpec
from schemas.config import CurateConfig, EntitiesConfig
from schemas.entities import EntitiesRecord
from schemas.records import (
    Box,
    CaptionRecord,
    FaceDetection,
    FacesRecord,
    Keyframe,
    KeyframesRecord,
    ModelInfo,
    Person,
    SourceFile,
    VideoRecord,
)
from tasks.base import StageError, VideoContext, encode_png
from tasks.entities import (
    _PALETTE,
    EntitiesStage,
    InvalidAnswer,
    choose_prior_keyframes,
    draw_person_prior,
    extract_json,
    load_prompt,
    parse_answer,
    settle_answer,
)
from tasks.keyframes import keyframe_name

CAPTION = (
    "A man on the left in a red jacket and a man on the right in a blue shirt talk next to a wooden table "
    "in a busy café. The man on the left holds a paper cup."
)
IDS = [1, 2]

GOOD = {
    "subjects": [
        {"person_id": 1, "noun": "man on the left", "attributes": [{"phrase": "red jacket", "kind": "top"}]},
        {"person_id": 2, "noun": "man on the right", "attributes": [{"phrase": "blue shirt", "kind": "top"}]},
    ],
    "objects": ["wooden table", "paper cup"],
    "background": "busy café",
}


def parse(text: str, caption: str = CAPTION, ids=IDS, **kw):
    return parse_answer(text, caption, ids, **kw)


def reason_of(text: str, caption: str = CAPTION, ids=IDS, **kw) -> str:
    with pytest.raises(InvalidAnswer) as info:
        parse(text, caption, ids, **kw)
    return info.value.reason


# ------------------------------------------------------------------------------------------ realistic answers
# Modelled on Qwen2.5-VL-7B-Instruct outputs: it fences JSON by default, often adds a sentence, sometimes uses
# Python quoting, and paraphrases when the caption is long.
FENCED = "```json\n" + json.dumps(GOOD, indent=2, ensure_ascii=False) + "\n```"

PROSE = (
    "Based on the image and the caption, here is the extracted information:\n\n"
    + json.dumps(GOOD, ensure_ascii=False)
    + "\n\nPerson 1 is the man on the left wearing the red jacket, and person 2 is on the right."
)

TRAILING_COMMAS = """```json
{
  "subjects": [
    {"person_id": 1, "noun": "man on the left", "attributes": [{"phrase": "red jacket", "kind": "top"},],},
    {"person_id": 2, "noun": "man on the right", "attributes": [{"phrase": "blue shirt", "kind": "top"}]},
  ],
  "objects": ["wooden table", "paper cup",],
  "background": "busy café",
}
```"""

SINGLE_QUOTES = (
    "{'subjects': [{'person_id': 1, 'noun': 'man on the left', 'attributes': [{'phrase': 'red jacket', "
    "'kind': 'top'}]}, {'person_id': 2, 'noun': 'man on the right', 'attributes': [{'phrase': "
    "'blue shirt', 'kind': 'top'}]}], 'objects': ['wooden table'], 'background': null}"
)

WRONG_PERSON = json.dumps(
    {**GOOD, "subjects": [GOOD["subjects"][0], {**GOOD["subjects"][1], "person_id": 3}]}
)

PARAPHRASED = json.dumps(
    {
        **GOOD,
        "subjects": [
            {
                "person_id": 1,
                "noun": "man on the left",
                "attributes": [{"phrase": "red coat", "kind": "top"}],
            },
            GOOD["subjects"][1],
        ],
    }
)

BOTH_RED = json.dumps(
    {
        **GOOD,
        "subjects": [
            {
                "person_id": 1,
                "noun": "man on the left",
                "attributes": [{"phrase": "red jacket", "kind": "top"}],
            },
            {
                "person_id": 2,
                "noun": "man on the right",
                "attributes": [
                    {"phrase": "red jacket", "kind": "top"},
                    {"phrase": "blue shirt", "kind": "top"},
                ],
            },
        ],
    }
)

TRUNCATED = FENCED[: len(FENCED) // 2]  # generation stopped at max_new_tokens

SAME_NOUN_CAPTION = "A man in a grey hoodie and a man in a black suit shake hands on a city street."
# Caption repeats the noun "man": only the numbered boxes tell the persons apart. Person 2 is on the left
# here.
SAME_NOUN = """```json
{"subjects": [
  {"person_id": 2, "noun": "man", "attributes": [{"phrase": "grey hoodie", "kind": "top"}]},
  {"person_id": 1, "noun": "man", "attributes": [{"phrase": "black suit", "kind": "top"}]}
 ],
 "objects": [],
 "background": "city street"}
```"""


def test_fenced_json():
    answer = parse(FENCED)
    assert [s.person_id for s in answer.subjects] == [1, 2]
    assert answer.background == "busy café" and answer.objects == ["wooden table", "paper cup"]


def test_prose_around_json():
    assert parse(PROSE).model_dump() == parse(FENCED).model_dump()


def test_trailing_commas():
    assert parse(TRAILING_COMMAS).model_dump() == parse(FENCED).model_dump()


def test_python_style_quotes():
    answer = parse(SINGLE_QUOTES)
    assert answer.subjects[1].attributes[0].phrase == "blue shirt" and answer.background is None


def test_wrong_person_id():
    with pytest.raises(InvalidAnswer) as info:
        parse(WRONG_PERSON)
    assert info.value.reason == "unknown_person"
    assert "person_id 3" in str(info.value) and "1, 2" in str(info.value)


def test_paraphrased_attribute():
    with pytest.raises(InvalidAnswer) as info:
        parse(PARAPHRASED)
    assert info.value.reason == "not_verbatim" and '"red coat"' in str(info.value)


def test_empty_answer():
    assert reason_of("") == "empty_answer"
    assert reason_of("  \n ") == "empty_answer"


def test_truncated_json():
    assert reason_of(TRUNCATED) == "invalid_json"


def test_prose_without_json():
    assert reason_of("I'm sorry, I cannot identify the people in this image.") == "invalid_json"


def test_same_noun_bound_by_boxes():
    answer = parse(SAME_NOUN, caption=SAME_NOUN_CAPTION)
    by_id = {s.person_id: [a.phrase for a in s.attributes] for s in answer.subjects}
    assert by_id == {2: ["grey hoodie"], 1: ["black suit"]}
    assert [s.noun for s in answer.subjects] == ["man", "man"]


def test_binding_keeps_attributes_apart():
    answer = parse(FENCED)
    by_id = {s.person_id: {a.phrase for a in s.attributes} for s in answer.subjects}
    assert by_id == {1: {"red jacket"}, 2: {"blue shirt"}}


def test_attribute_given_to_both_persons_fails_when_asked_to():
    with pytest.raises(InvalidAnswer) as info:
        parse(BOTH_RED, shared_attributes="fail")
    assert info.value.reason == "shared_attribute"
    assert '"red jacket" is given to person 1 and person 2' in str(info.value)


def test_shared_attribute_is_kept_for_both_or_dropped_for_both():
    """ "Two men both wear black jackets": the phrase is valid for both persons. `keep` (default) binds it to
    each (MCAM cancels its words to level 0, each group keeps its own image); `drop` removes it from both."""
    answer = parse(BOTH_RED)
    kept, dropped, shared = settle_answer(answer, "keep")
    assert [[a.phrase for a in s.attributes] for s in kept.subjects] == [
        ["red jacket"],
        ["red jacket", "blue shirt"],
    ]
    assert dropped == [] and shared == {"red jacket": [1, 2]}
    gone, dropped, shared = settle_answer(answer, "drop")
    assert [[a.phrase for a in s.attributes] for s in gone.subjects] == [[], ["blue shirt"]]
    assert [(d.person_id, d.label, d.reason) for d in dropped] == [
        (1, "red jacket", "shared_attribute"),
        (2, "red jacket", "shared_attribute"),
    ]
    assert shared == {}


def test_case_mismatch_is_not_verbatim_with_hint():
    text = FENCED.replace('"red jacket"', '"Red jacket"')
    with pytest.raises(InvalidAnswer) as info:
        parse(text)
    assert info.value.reason == "not_verbatim" and "upper/lower case" in str(info.value)


def test_word_boundaries():
    caption = "A woman in a red dress walks a dog."
    text = json.dumps({"subjects": [{"person_id": 1, "noun": "man", "attributes": []}]})
    assert reason_of(text, caption=caption, ids=[1]) == "not_verbatim"  # "man" only inside "woman"
    ok = json.dumps(
        {"subjects": [{"person_id": 1, "noun": "woman", "attributes": ["red dress"]}], "objects": ["dog"]}
    )
    assert parse(ok, caption=caption, ids=[1]).subjects[0].attributes[0].phrase == "red dress"


def test_lenient_shapes_are_normalised():
    # Bare attribute strings, synonyms for kinds, "none" background, extra keys.
    text = json.dumps(
        {
            "subjects": [
                {
                    "person_id": 1,
                    "noun": "man on the left",
                    "attributes": ["red jacket"],
                    "box": [1, 2, 3, 4],
                },
                {
                    "person_id": 2,
                    "noun": "man on the right",
                    "attributes": [{"phrase": "blue shirt", "kind": "Upper Body"}],
                },
            ],
            "objects": None,
            "background": "None",
            "reasoning": "...",
        }
    )
    answer = parse(text)
    assert answer.subjects[0].person_id == 1 and answer.subjects[0].attributes[0].kind == "other"
    assert answer.subjects[1].attributes[0].kind == "top"
    assert answer.objects == [] and answer.background is None


@pytest.mark.parametrize("pid", [True, "1", 1.0, "one", None, [1]])
def test_person_id_is_a_json_integer(pid):
    """true, "1" and 1.0 are not the number drawn on a box: strict types, shown to the model as a schema error."""
    text = json.dumps({**GOOD, "subjects": [{**GOOD["subjects"][0], "person_id": pid}, GOOD["subjects"][1]]})
    with pytest.raises(InvalidAnswer) as info:
        parse(text)
    assert info.value.reason == "invalid_schema" and "person_id" in str(info.value)


def test_phrases_are_json_strings():
    assert reason_of(json.dumps({**GOOD, "objects": [7]})) == "invalid_schema"
    assert reason_of(json.dumps({**GOOD, "background": 1})) == "invalid_schema"


def test_schema_errors():
    assert reason_of('{"subjects": "man on the left"}') == "invalid_schema"
    assert reason_of("[1, 2, 3]") == "invalid_json"  # no object at all
    assert reason_of('{"subjects": [{"noun": "man on the left"}]}') == "invalid_schema"  # no person_id


def test_no_subject_duplicate_and_limits():
    assert reason_of('{"subjects": [], "objects": ["wooden table"]}') == "no_subject"
    dup = {**GOOD, "subjects": [GOOD["subjects"][0], {**GOOD["subjects"][1], "person_id": 1}]}
    assert reason_of(json.dumps(dup)) == "duplicate_person"
    many = {
        **GOOD,
        "subjects": [{**GOOD["subjects"][0], "attributes": ["red jacket", "paper cup", "wooden table"]}],
        "objects": [],
    }
    assert reason_of(json.dumps(many), max_attributes=2) == "too_many_attributes"
    assert reason_of(FENCED, max_subjects=1) == "too_many_subjects"
    same_as_attr = {**GOOD, "objects": ["red jacket"]}
    assert reason_of(json.dumps(same_as_attr)) == "duplicate_phrase"


def test_all_problems_are_reported_at_once():
    bad = {
        **GOOD,
        "subjects": [{"person_id": 7, "noun": "guy", "attributes": ["crimson jacket"]}],
        "background": "coffee shop",
    }
    with pytest.raises(InvalidAnswer) as info:
        parse(json.dumps(bad))
    assert info.value.reason == "unknown_person"
    assert len(info.value.problems) == 4  # unknown person, noun, attribute, background


def test_braces_in_prose_before_the_json():
    text = "Persons are marked {1} and {2} on the image. Answer: " + FENCED.strip("`").removeprefix("json\n")
    assert parse(text).model_dump() == parse(FENCED).model_dump()


def test_first_of_repeated_objects_and_huge_answers():
    assert extract_json(FENCED + "\n" + FENCED)["background"] == "busy café"
    with pytest.raises(InvalidAnswer, match="characters long"):
        extract_json("{" + "x" * 30_000)


# ---------------------------------------------------------------------------------------------- visual prior
def _person(pid: int, boxes: dict[int, tuple], face: bool = True) -> Person:
    b = {k: Box.from_tuple(v) for k, v in boxes.items()}
    first = min(b)
    return Person(
        person_id=pid,
        boxes=b,
        scores=dict.fromkeys(b, 0.9),
        face=FaceDetection(keyframe=first, box=Box.from_tuple((0, 0, 10, 10)), score=0.9) if face else None,
        face_path=f"face_{pid}.png" if face else None,
    )


def test_choose_prior_keyframes_covers_everyone_with_fewest_frames():
    both_mid = [
        _person(1, {0: (0, 0, 5, 5), 1: (0, 0, 5, 5)}),
        _person(2, {1: (0, 0, 5, 5), 2: (0, 0, 5, 5)}),
    ]
    assert choose_prior_keyframes(both_mid) == [1]
    disjoint = [_person(1, {0: (0, 0, 5, 5)}), _person(2, {2: (0, 0, 5, 5)})]
    assert choose_prior_keyframes(disjoint) == [0, 2]
    everywhere = [_person(1, {0: (0, 0, 5, 5), 1: (0, 0, 5, 5), 2: (0, 0, 5, 5)})]
    assert choose_prior_keyframes(everywhere) == [1]  # the middle one on ties
    assert choose_prior_keyframes([]) == []


def test_draw_person_prior_numbers_boxes():
    frame = Image.new("RGB", (2000, 1000), (128, 128, 128))
    out = draw_person_prior(
        frame, [(1, Box.from_tuple((100, 100, 800, 900))), (2, Box.from_tuple((1200, 100, 1900, 900)))]
    )
    assert max(out.size) == 1024  # downscaled: bounded vision tokens
    scale = 1024 / 2000
    # Box outline in the person's colour, away from the label.
    assert out.getpixel((round(100 * scale) + 1, round(700 * scale))) == _PALETTE[1]
    assert out.getpixel((round(1900 * scale) - 1, round(700 * scale))) == _PALETTE[2]
    # The label: a filled block of the colour with white digits in it, at the top-left corner of the box.
    crop = out.crop(
        (round(100 * scale), round(100 * scale), round(100 * scale) + 40, round(100 * scale) + 60)
    )
    colours = set(crop.getdata())
    assert _PALETTE[1] in colours and (255, 255, 255) in colours
    assert frame.getpixel((150, 150)) == (128, 128, 128)  # input untouched


# ---------------------------------------------------------------------------------------------- the stage
class ScriptedGenerator:
    """Returns scripted answers per video (keyed by a caption substring) and records every call."""

    info = ModelInfo(backend="scripted", model_id="test", random_weights=False)

    def __init__(self, script: dict[str, list[str]]):
        self.script = {k: list(v) for k, v in script.items()}
        self.calls: list[list[list[dict]]] = []

    def generate(self, messages_batch, max_new_tokens):
        self.calls.append(messages_batch)
        out = []
        for conversation in messages_batch:
            prompt = conversation[0]["content"][-1]["text"]
            key = next(k for k in self.script if k in prompt)
            out.append(self.script[key].pop(0))
        return out


def _make_video(video_id: str, caption: str, persons: list[Person]) -> VideoContext:
    """A video after ingest, keyframes (arrays in memory), caption and faces (crops as PNG bytes)."""
    video = VideoRecord(
        video_id=video_id,
        uri=f"/videos/{video_id}.mp4",
        size_bytes=1,
        container="mp4",
        codec="h264",
        width=320,
        height=180,
        fps=25.0,
        duration_s=4.0,
        num_frames=100,
    )
    source = SourceFile(uri=video.uri, size=1, version="1:0", video_id=video_id)
    ctx = VideoContext(source=source, video=video, records={"ingest": video})
    keyframes = []
    for k, pos in enumerate((0.05, 0.5, 0.95)):
        path = ctx.put(keyframe_name(k), np.full((180, 320, 3), (40 * k, 90, 160), np.uint8))
        keyframes.append(
            Keyframe(
                index=k,
                position=pos,
                target_time_s=4 * pos,
                time_s=4 * pos,
                frame_index=int(100 * pos),
                path=path,
                width=320,
                height=180,
            )
        )
    for p in persons:
        if p.face_path is not None:
            ctx.put(p.face_path, encode_png(np.full((10, 10, 3), 200, np.uint8)))
    info = ModelInfo(backend="test")
    ctx.records["keyframes"] = KeyframesRecord(video_id=video_id, keyframes=keyframes)
    ctx.records["caption"] = CaptionRecord(video_id=video_id, caption=caption, source="sidecar")
    ctx.records["faces"] = FacesRecord(video_id=video_id, model=info, persons=persons)
    return ctx


TWO = [
    _person(1, {0: (10, 20, 150, 170), 1: (12, 20, 150, 170)}),
    _person(2, {1: (170, 20, 310, 170)}),
    _person(3, {1: (100, 50, 120, 90)}, face=False),
]


def _config(**entities) -> CurateConfig:
    return CurateConfig(entities=EntitiesConfig(**entities))


def test_stage_retries_with_error_feedback():
    ctx = _make_video("vid_a", CAPTION, TWO)
    keyframe_1 = ctx.rgb(keyframe_name(1)).copy()
    gen = ScriptedGenerator({"busy café": [PARAPHRASED, FENCED]})
    stage = EntitiesStage(_config(max_retries=2), generator=gen)
    out = stage.process([ctx])["vid_a"]
    assert isinstance(out, EntitiesRecord), out
    assert out.attempts == 2 and out.prompt_version == "entities_v2.txt"
    assert {s.person_id: [a.phrase for a in s.attributes] for s in out.answer.subjects} == {
        1: ["red jacket"],
        2: ["blue shirt"],
    }
    assert out.prior_keyframes == [1]  # both faced persons are on the middle keyframe
    # The prior image is not kept: it is keyframe 1 with the faced persons' numbered boxes, made in memory for
    # the model, and the keyframe itself is left as it was.
    (shown,) = [part["image"] for part in gen.calls[0][0][0]["content"] if part["type"] == "image"]
    want = draw_person_prior(Image.fromarray(keyframe_1), [(1, TWO[0].boxes[1]), (2, TWO[1].boxes[1])])
    assert shown.size == want.size == (320, 180)
    np.testing.assert_array_equal(np.asarray(shown), np.asarray(want))
    np.testing.assert_array_equal(ctx.rgb(keyframe_name(1)), keyframe_1)
    assert not np.array_equal(np.asarray(shown), keyframe_1)  # the boxes were drawn
    # The second call continued the conversation: the bad answer, then the rule it broke.
    second = gen.calls[1][0]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"][0]["text"] == PARAPHRASED
    assert '"red coat" is not written in the caption' in second[2]["content"][0]["text"]
    # The first turn showed the numbered image and only persons with a face.
    first_turn = gen.calls[0][0][0]["content"]
    assert isinstance(first_turn[0]["image"], Image.Image)
    assert "numbered persons are: 1, 2." in first_turn[-1]["text"] and CAPTION in first_turn[-1]["text"]


def test_stage_fails_with_reason_after_retries_and_batches_retries():
    a = _make_video("vid_a", CAPTION, TWO)
    b = _make_video("vid_b", SAME_NOUN_CAPTION, TWO[:2])
    gen = ScriptedGenerator({"busy café": [BOTH_RED, BOTH_RED], "city street": [SAME_NOUN]})
    out = EntitiesStage(_config(max_retries=1, shared_attributes="fail"), generator=gen).process([a, b])
    assert isinstance(out["vid_b"], EntitiesRecord) and out["vid_b"].attempts == 1
    err = out["vid_a"]
    assert isinstance(err, StageError) and err.reason == "shared_attribute"
    assert "after 2 attempt(s)" in str(err)
    assert [len(batch) for batch in gen.calls] == [2, 1]  # only the failing video was asked again


def test_stage_without_faces_fails_before_the_model():
    ctx = _make_video("vid_c", CAPTION, [TWO[2]])
    gen = ScriptedGenerator({})
    err = EntitiesStage(_config(), generator=gen).process([ctx])["vid_c"]
    assert isinstance(err, StageError) and err.reason == "no_face" and gen.calls == []


def test_missing_keyframe_image_fails_that_video_before_the_model():
    gone = _make_video("vid_gone", CAPTION, TWO)
    del gone.media[keyframe_name(1)]
    ok = _make_video("vid_b", SAME_NOUN_CAPTION, TWO[:2])
    gen = ScriptedGenerator({"city street": [SAME_NOUN]})
    out = EntitiesStage(_config(), generator=gen).process([gone, ok])
    assert isinstance(out["vid_gone"], StageError) and out["vid_gone"].reason == "missing_media"
    assert isinstance(out["vid_b"], EntitiesRecord)
    assert [len(batch) for batch in gen.calls] == [1]  # only the video with its keyframe was asked


def test_fingerprint_follows_prompt_text_and_config():
    up = {"faces": "f", "caption": "c"}
    base = EntitiesStage(_config())
    assert base.fingerprint(up) == EntitiesStage(_config()).fingerprint(up)
    assert base.fingerprint(up) != EntitiesStage(_config(max_attributes=2)).fingerprint(up)
    edited = EntitiesStage(_config())
    edited._template = base.template + "\nBe careful."
    assert edited.fingerprint(up) != base.fingerprint(up)
    with pytest.raises(ValueError, match="plain .txt"):
        load_prompt("../caption_v1.txt")


def test_stage_with_tiny_random_qwen_vl():
    """The real code path: registry -> QwenVL test build -> chat template -> generate -> parse -> retry ->
    fail."""
    ctx = _make_video("vid_q", CAPTION, TWO)
    spec = ModelSpec(backend="qwen2.5-vl", random_init=True, device="cpu", batch_size=2)
    stage = EntitiesStage(_config(model=spec, max_retries=1, max_new_tokens=12))
    stage.setup()
    assert stage.generator.info.random_weights
    calls = []
    real_generate = stage.generator.generate

    def spy(conversations, max_new_tokens):
        calls.append([len(c) for c in conversations])
        return real_generate(conversations, max_new_tokens=max_new_tokens)

    stage.generator.generate = spy
    err = stage.process([ctx])["vid_q"]
    assert isinstance(err, StageError), err
    assert err.reason in {"empty_answer", "invalid_json"}  # random weights emit random bytes
    assert "after 2 attempt(s)" in str(err)
    assert calls == [[1], [3]]  # the retry carried the answer and the feedback turn
