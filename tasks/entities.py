"""Entities stage: subjects bound to person boxes, their attributes, objects and background, from the caption.

Qwen2.5-VL sees the keyframe(s) with every person that has a usable face boxed and NUMBERED by `person_id`
(the visual prior of paper section 3.2), plus the caption, and answers JSON. The numbers are what make binding
work when the caption repeats a noun ("a man on the left ... a man on the right"): the model points at a box,
not at a word.

Model output is untrusted. The answer is parsed leniently (code fences, prose around the JSON, trailing
commas, Python-style quotes) and then checked strictly: every phrase must occur verbatim in the caption (the
trainer's cross-attention mask finds labels by exact token match), person numbers must be JSON integers we drew.
A violation is shown to the model in a follow-up turn (`entities.max_retries` times); after that the video fails
with the reason of the last violation.

Captions are untrusted too (they come from the internet). The prompt (entities_v2.txt) carries the caption as a
JSON string, so quotes in it cannot close a delimiter; a caption with chat-control tokens, planted answer JSON
or "ignore previous instructions" fails the video before any model call (`caption_injection`); and the answer is
never a JSON object that was already in the prompt or the caption (a model that echoes its prompt does not hand
back JSON planted there).

A valid answer is then settled (`settle_answer`): an entity whose label could not be exported (schemas.labels:
an attribute "face mask", a background "St. Mark's Square", "/", "..", NUL, ...) is dropped with its reason and
the rest is kept; an attribute that is part of a longer attribute of the same person ("jacket" and "black
jacket") is dropped; a phrase bound to several persons is kept for each, dropped, or fails the answer
(`entities.shared_attributes`). The dropped entities are in the record, with their reasons.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from string import Template
from typing import Any, Protocol

from PIL import Image, ImageDraw, ImageFont
from pydantic import ValidationError

from models.base import Registry
from schemas.entities import (
    DroppedLabel,
    EntitiesAnswer,
    EntitiesRecord,
    EntitySubject,
    appears_verbatim,
)
from schemas.labels import label_problem
from schemas.records import Box, CaptionRecord, FacesRecord, KeyframesRecord, ModelInfo, Person
from tasks.base import Stage, StageError, VideoContext
from tasks.prompts import load_prompt

logger = logging.getLogger(__name__)

PRIOR_MAX_SIDE = 1024
"""The annotated keyframe is downscaled to this longer side: box labels stay legible and the image costs a
bounded number of vision tokens (Qwen2.5-VL: one token per 28x28 pixels)."""
MAX_ANSWER_CHARS = 20_000
"""Longer answers are degenerate generations; never feed them to a parser."""

# Distinct, saturated colours that stay visible on video frames; the label text is white on the colour.
_PALETTE = [
    (230, 25, 75),
    (0, 130, 200),
    (60, 180, 75),
    (245, 130, 48),
    (145, 30, 180),
    (0, 128, 128),
    (240, 50, 230),
    (128, 0, 0),
    (0, 0, 128),
    (128, 128, 0),
]


class TextGenerator(Protocol):
    """What the stage needs from models/qwen_vl.py (and what tests fake)."""

    info: ModelInfo

    def generate(self, messages_batch: list[list[dict[str, Any]]], max_new_tokens: int) -> list[str]: ...


# ---------------------------------------------------------------------------------------------- prompt
def render_prompt(
    template: str,
    caption: str,
    person_ids: list[int],
    num_images: int,
    max_subjects: int,
    max_attributes: int,
) -> str:
    # string.Template, not str.format: the prompt shows JSON whose braces must stay literal. The caption goes in
    # as a JSON string (v2 prompts): quotes, backslashes and line breaks in it are escaped, so it cannot end its
    # block and read as prompt text. v1 prompts still take it raw (${caption}).
    return Template(template).substitute(
        caption=caption,
        caption_json=json.dumps(caption, ensure_ascii=False),
        person_ids=", ".join(str(i) for i in person_ids),
        images_sentence=(
            "The images are frames of the video." if num_images > 1 else "The image is a frame of the video."
        ),
        max_subjects=max_subjects,
        max_attributes=max_attributes,
    )


_INJECTION_MARKERS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("a chat-control token", re.compile(r"<\|[^|<>]{1,40}\|>|\[/?INST\]|<</?SYS>>")),
    (
        "an instruction to the model",
        re.compile(
            r"\b(ignore|disregard|forget)\s+(all\s+|any\s+|the\s+|your\s+)*(previous|prior|above|earlier|"
            r"preceding)\s+(instructions?|prompts?|rules|messages?)",
            re.IGNORECASE,
        ),
    ),
    (
        "an answer in JSON",
        re.compile(r"\{\s*[\"']?(subjects|objects|background|person_id)[\"']?\s*:", re.IGNORECASE),
    ),
)


def injection_markers(caption: str) -> list[str]:
    """What in a caption addresses the model instead of describing a video (empty for a normal caption)."""
    return [what for what, pattern in _INJECTION_MARKERS if pattern.search(caption)]


# ---------------------------------------------------------------------------------------------- visual prior
def choose_prior_keyframes(persons: list[Person]) -> list[int]:
    """Fewest keyframes that show every person at least once (greedy cover), middle keyframe first on ties.

    One image is the common case; more only when some person is missing from the best frame. Fewer images
    means fewer vision tokens and no ambiguity about which frame a number refers to.
    """
    frames = sorted({k for p in persons for k in p.boxes})
    if not frames:
        return []
    middle = frames[len(frames) // 2]
    uncovered = {p.person_id for p in persons}
    chosen: list[int] = []
    while uncovered:
        best = max(
            (k for k in frames if k not in chosen),
            key=lambda k: (
                sum(1 for p in persons if p.person_id in uncovered and k in p.boxes),
                -abs(k - middle),
                -k,
            ),
        )
        gained = {p.person_id for p in persons if best in p.boxes} & uncovered
        if not gained:
            break
        chosen.append(best)
        uncovered -= gained
    return sorted(chosen)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow >= 10.1 ships a scalable default font: no system font needed.
    return ImageFont.load_default(size=size)


def draw_person_prior(
    image: Image.Image, boxes: list[tuple[int, Box]], max_side: int = PRIOR_MAX_SIDE
) -> Image.Image:
    """The frame with thick coloured boxes and a big number (the person_id) on each person."""
    image = image.convert("RGB")
    scale = min(1.0, max_side / max(image.size))
    if scale < 1.0:
        image = image.resize(
            (round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS
        )
    draw = ImageDraw.Draw(image)
    side = max(image.size)
    width = max(3, side // 150)
    font = _font(max(16, side // 20))
    for person_id, box in boxes:
        colour = _PALETTE[person_id % len(_PALETTE)]
        x0, y0, x1, y1 = (v * scale for v in box.as_tuple())
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        text = str(person_id)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        pad = width
        tw, th = right - left + 2 * pad, bottom - top + 2 * pad
        # Label inside the top-left corner, kept on the image when the box touches the border.
        lx = min(max(x0, 0), image.width - tw)
        ly = min(max(y0, 0), image.height - th)
        draw.rectangle((lx, ly, lx + tw, ly + th), fill=colour)
        draw.text((lx + pad - left, ly + pad - top), text, fill=(255, 255, 255), font=font)
    return image


# --------------------------------------------------------------------------------------------- answer parsing
class InvalidAnswer(ValueError):
    """The model's answer broke a rule. `reason` is the failure slug; `problems` are shown to the model."""

    def __init__(self, reason: str, problems: list[str]):
        super().__init__("; ".join(problems))
        self.reason = reason
        self.problems = problems


_FENCE = re.compile(r"```[ \t]*(?:json|JSON|javascript|python)?[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_TRAILING_COMMA = re.compile(r",(\s*[}\]])")
_JSON_WORDS = {"true": "True", "false": "False", "null": "None"}
_MAX_OBJECT_STARTS = 20
_ANSWER_KEYS = {"subjects", "objects", "background"}


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def _answer_objects(text: str) -> list[Any]:
    """Every object with an answer key that starts at one of the first `{` of `text` (lenient parse)."""
    starts = [m.start() for m in re.finditer(r"\{", text)][:_MAX_OBJECT_STARTS]
    found = []
    for start in starts:
        value = _decode_lenient(text[start:])
        if isinstance(value, dict) and _ANSWER_KEYS & value.keys():
            found.append(value)
    return found


def extract_json(text: str, echoes: Sequence[str] = ()) -> Any:
    """The first JSON object in a model answer that is the model's own.

    Tolerates what instruction-tuned VLMs actually produce: a ```json fence, prose before or after, trailing
    commas, Python-style single quotes and True/None. An object that also occurs in one of `echoes` (the prompt,
    the caption: text the model was shown) is not an answer: a model that repeats its prompt would otherwise
    hand back the prompt's format example, or JSON planted in the caption. Raises InvalidAnswer("empty_answer" |
    "invalid_json").
    """
    if text is None or not text.strip():
        raise InvalidAnswer("empty_answer", ["the answer was empty"])
    if len(text) > MAX_ANSWER_CHARS:
        raise InvalidAnswer(
            "invalid_json", [f"the answer is {len(text)} characters long; expected one short JSON object"]
        )
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced and "{" in fenced.group(1) else text
    starts = [m.start() for m in re.finditer(r"\{", body)][:_MAX_OBJECT_STARTS]
    if not starts:
        raise InvalidAnswer("invalid_json", ["the answer contains no JSON object"])
    # Each '{' may open the answer (prose such as "boxes {1} and {2}" can come first); inner objects (one
    # subject) also parse, so the answer is the first object that has one of the answer's keys.
    shown = {_canonical(v) for source in echoes for v in _answer_objects(source)}
    echoed = 0
    for start in starts:
        value = _decode_lenient(body[start:])
        if isinstance(value, dict) and _ANSWER_KEYS & value.keys():
            if _canonical(value) in shown:
                echoed += 1
                continue
            return value
    if echoed:
        raise InvalidAnswer(
            "invalid_json",
            ["the answer only repeats JSON from the prompt or the caption; answer with your own JSON object"],
        )
    raise InvalidAnswer(
        "invalid_json",
        ['the answer has no complete JSON object with "subjects" (was it cut off?)'],
    )


def _decode_lenient(text: str) -> Any:
    """A JSON value at the start of `text`, tolerating trailing commas and Python literals; None if none."""
    try:
        return json.JSONDecoder().raw_decode(text)[0]
    except json.JSONDecodeError:
        pass
    end = text.rfind("}")
    if end < 0:
        return None
    repaired = _TRAILING_COMMA.sub(r"\1", text[: end + 1])
    try:
        return json.JSONDecoder().raw_decode(repaired)[0]
    except json.JSONDecodeError:
        pass
    # Python literal syntax ('single quotes', True, None): ast.literal_eval evaluates literals, never code.
    pythonic = re.sub(r"\b(true|false|null)\b", lambda m: _JSON_WORDS[m.group(1)], repaired)
    try:
        return ast.literal_eval(pythonic)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _quote(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def validate_answer(
    data: Any,
    caption: str,
    person_ids: list[int],
    *,
    max_subjects: int,
    max_attributes: int,
    shared_attributes: str = "keep",
) -> EntitiesAnswer:
    """Schema + binding rules. Collects every violation so one retry can fix them all.

    `shared_attributes="fail"` makes one attribute phrase given to two persons a violation; otherwise it is
    valid here and `settle_answer` keeps or drops it.
    """
    if not isinstance(data, dict):
        raise InvalidAnswer("invalid_schema", [f"expected one JSON object, got {type(data).__name__}"])
    try:
        answer = EntitiesAnswer.model_validate(data)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'answer'}: {e['msg']}" for e in exc.errors()[:5]]
        raise InvalidAnswer("invalid_schema", problems) from None

    problems: list[tuple[str, str]] = []

    def verbatim(phrase: str, what: str) -> None:
        if not appears_verbatim(phrase, caption):
            hint = " (check upper/lower case)" if appears_verbatim(phrase.lower(), caption.lower()) else ""
            problems.append(
                (
                    "not_verbatim",
                    f"{what} {_quote(phrase)} is not written in the caption{hint}; copy the exact words",
                )
            )

    if not answer.subjects:
        problems.append(
            ("no_subject", "no subject: give at least one numbered person the caption talks about")
        )
    if len(answer.subjects) > max_subjects:
        problems.append(("too_many_subjects", f"{len(answer.subjects)} subjects; at most {max_subjects}"))
    valid_ids = set(person_ids)
    seen_ids: set[int] = set()
    owner: dict[str, int] = {}
    for subject in answer.subjects:
        pid = subject.person_id
        if pid not in valid_ids:
            problems.append(
                (
                    "unknown_person",
                    f"person_id {pid} is not a number drawn on the image; the numbers "
                    f"are {', '.join(map(str, person_ids))}",
                )
            )
        if pid in seen_ids:
            problems.append(("duplicate_person", f"person_id {pid} is listed twice; list each person once"))
        seen_ids.add(pid)
        verbatim(subject.noun, f"noun of person {pid}")
        if len(subject.attributes) > max_attributes:
            problems.append(
                (
                    "too_many_attributes",
                    f"person {pid} has {len(subject.attributes)} attributes; at most {max_attributes}",
                )
            )
        own: set[str] = set()
        for attr in subject.attributes:
            verbatim(attr.phrase, f"attribute of person {pid}")
            if attr.phrase in own:
                problems.append(("duplicate_attribute", f"person {pid} lists {_quote(attr.phrase)} twice"))
            elif shared_attributes == "fail" and attr.phrase in owner and owner[attr.phrase] != pid:
                problems.append(
                    (
                        "shared_attribute",
                        f"{_quote(attr.phrase)} is given to person {owner[attr.phrase]} and person {pid}; "
                        "an attribute belongs to exactly one person: look at the boxes",
                    )
                )
            own.add(attr.phrase)
            owner.setdefault(attr.phrase, pid)
    taken = {s.noun for s in answer.subjects} | set(owner)
    seen_objects: set[str] = set()
    for obj in answer.objects:
        verbatim(obj, "object")
        if obj in seen_objects:
            problems.append(("duplicate_phrase", f"object {_quote(obj)} is listed twice"))
        elif obj in taken:
            problems.append(
                ("duplicate_phrase", f"{_quote(obj)} is already a subject or attribute; not an object")
            )
        seen_objects.add(obj)
    if answer.background is not None:
        verbatim(answer.background, "background")
    if problems:
        raise InvalidAnswer(problems[0][0], [message for _, message in problems])
    return answer


def parse_answer(
    text: str,
    caption: str,
    person_ids: list[int],
    *,
    max_subjects: int = 3,
    max_attributes: int = 3,
    shared_attributes: str = "keep",
    echoes: Sequence[str] = (),
) -> EntitiesAnswer:
    """Model answer text -> validated entities, or InvalidAnswer with the reason and every problem.

    `echoes`: text the model was shown besides the caption (the prompt); JSON found there or in the caption is
    never taken for the answer.
    """
    return validate_answer(
        extract_json(text, echoes=(caption, *echoes)),
        caption,
        person_ids,
        max_subjects=max_subjects,
        max_attributes=max_attributes,
        shared_attributes=shared_attributes,
    )


def _contains_words(longer: str, shorter: str) -> bool:
    return longer != shorter and appears_verbatim(shorter, longer)


def settle_answer(
    answer: EntitiesAnswer, shared_attributes: str = "keep"
) -> tuple[EntitiesAnswer, list[DroppedLabel], dict[str, list[int]]]:
    """Drop the entities of a valid answer that cannot be used, keep the rest.

    Returns the settled answer, what was dropped (with reasons) and the attribute phrases kept for several
    persons. Dropping is entity by entity, because that is sound: an attribute or object without an image, or a
    sample without a background plate, is still a correct sample; a subject whose noun cannot be a label is
    left unbound (like a person the caption does not mention). The caller fails the video if no subject is left.
    """
    dropped: list[DroppedLabel] = []

    def drop(role, label: str, reason: str, message: str, person_id: int | None = None) -> None:
        dropped.append(
            DroppedLabel(role=role, person_id=person_id, label=label, reason=reason, message=message)
        )

    owners: dict[str, list[int]] = {}
    for subject in answer.subjects:
        for attr in subject.attributes:
            owners.setdefault(attr.phrase, []).append(subject.person_id)
    shared = {phrase: pids for phrase, pids in owners.items() if len(pids) > 1}

    subjects: list[EntitySubject] = []
    for subject in answer.subjects:
        pid = subject.person_id
        problem = label_problem(subject.noun, "subject")
        if problem is not None:
            drop("subject", subject.noun, problem.reason, problem.message, pid)
            for attr in subject.attributes:
                drop(
                    "attribute",
                    attr.phrase,
                    problem.reason,
                    f"its subject was dropped: {problem.message}",
                    pid,
                )
            continue
        phrases = [a.phrase for a in subject.attributes]
        attributes = []
        for attr in subject.attributes:
            problem = label_problem(attr.phrase, "attribute")
            longer = next((p for p in phrases if _contains_words(p, attr.phrase)), None)
            if problem is not None:
                drop("attribute", attr.phrase, problem.reason, problem.message, pid)
            elif longer is not None:
                drop(
                    "attribute",
                    attr.phrase,
                    "overlapping_phrase",
                    f"attribute {attr.phrase!r} is part of {longer!r} of the same person: one thing, kept once "
                    "under its longer name",
                    pid,
                )
            elif attr.phrase in shared and shared_attributes == "drop":
                drop(
                    "attribute",
                    attr.phrase,
                    "shared_attribute",
                    f"attribute {attr.phrase!r} is bound to persons {shared[attr.phrase]} "
                    "(entities.shared_attributes = drop)",
                    pid,
                )
            else:
                attributes.append(attr)
        subjects.append(subject.model_copy(update={"attributes": attributes}))

    objects = []
    for obj in answer.objects:
        problem = label_problem(obj, "object")
        if problem is not None:
            drop("object", obj, problem.reason, problem.message)
        else:
            objects.append(obj)
    background = answer.background
    if background is not None and (problem := label_problem(background, "background")) is not None:
        drop("background", background, problem.reason, problem.message)
        background = None

    kept: dict[str, list[int]] = {}
    for subject in subjects:
        for attr in subject.attributes:
            if attr.phrase in shared:
                kept.setdefault(attr.phrase, []).append(subject.person_id)
    kept = {phrase: pids for phrase, pids in kept.items() if len(pids) > 1}
    settled = answer.model_copy(update={"subjects": subjects, "objects": objects, "background": background})
    return settled, dropped, kept


def feedback_message(error: InvalidAnswer) -> str:
    lines = "\n".join(f"- {p}" for p in error.problems[:10])
    return (
        f"Your answer breaks these rules:\n{lines}\n"
        "Answer again with ONE corrected JSON object only, copying every phrase exactly from the caption."
    )


# ---------------------------------------------------------------------------------------------- the stage
_ENTITY_MODELS: Registry | None = None


def entity_models() -> Registry:
    """Backends that can answer the entities prompt (loaded once per worker process, shared by spec)."""
    global _ENTITY_MODELS
    if _ENTITY_MODELS is None:
        from models.qwen_vl import QwenVL  # heavy (transformers): imported in the worker that needs it

        registry = Registry("entities model")
        registry.register("qwen2.5-vl")(QwenVL)
        _ENTITY_MODELS = registry
    return _ENTITY_MODELS


@dataclass
class _Job:
    video_id: str
    caption: str
    person_ids: list[int]
    prior_keyframes: list[int]
    messages: list[dict[str, Any]]
    prompt: str
    """the rendered prompt text: JSON in it is never the answer"""
    answers: list[str] = field(default_factory=list)


class EntitiesStage(Stage[EntitiesRecord]):
    name = "entities"
    version = "3"  # 2: no prior images kept; 3: settled answers (label rules, overlaps, shared attributes)
    record_type = EntitiesRecord
    requires = ("faces", "caption")
    uses_gpu = True

    def __init__(self, config, generator: TextGenerator | None = None):
        super().__init__(config)
        self.generator = generator
        self._template: str | None = None

    @property
    def template(self) -> str:
        if self._template is None:
            self._template = load_prompt(self.config.entities.prompt_file)
        return self._template

    def settings(self) -> dict[str, Any]:
        cfg = self.config.entities
        # The prompt's text, not only its file name: editing the prompt reruns this stage.
        return {
            "entities": cfg.model_dump(mode="json"),
            "prompt_sha256": hashlib.sha256(self.template.encode("utf-8")).hexdigest(),
            "prior_max_side": PRIOR_MAX_SIDE,
        }

    def setup(self) -> None:
        if self.generator is None:
            self.generator = entity_models().get(self.config.entities.model)

    # -- one video -> first conversation
    def _prepare(self, ctx: VideoContext) -> _Job:
        caption = ctx.record("caption", CaptionRecord).caption
        if self.config.entities.refuse_injected_captions and (markers := injection_markers(caption)):
            raise StageError(
                "caption_injection",
                f"the caption contains {' and '.join(markers)}: it addresses the model instead of describing "
                "the video (entities.refuse_injected_captions)",
            )
        faces = ctx.record("faces", FacesRecord)
        keyframes = {k.index: k for k in ctx.record("keyframes", KeyframesRecord).keyframes}
        persons = [p for p in faces.persons_with_face if p.boxes]
        if not persons:
            raise StageError("no_face", "no person with a usable face to bind entities to")
        frames = [k for k in choose_prior_keyframes(persons) if k in keyframes]
        if not frames:
            raise StageError("no_keyframe", "the persons' keyframes are missing from the keyframes record")
        images = [
            draw_person_prior(
                ctx.pil(keyframes[k].path), [(p.person_id, p.boxes[k]) for p in persons if k in p.boxes]
            )
            for k in frames
        ]
        cfg = self.config.entities
        person_ids = sorted(p.person_id for p in persons)
        text = render_prompt(
            self.template, caption, person_ids, len(images), cfg.max_subjects, cfg.max_attributes
        )
        content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
        return _Job(ctx.video_id, caption, person_ids, frames, [{"role": "user", "content": content}], text)

    def process(self, videos: list[VideoContext]) -> dict[str, EntitiesRecord | StageError]:
        if self.generator is None:
            self.setup()
        assert self.generator is not None
        cfg = self.config.entities
        results: dict[str, EntitiesRecord | StageError] = {}
        pending: list[_Job] = []
        for ctx in videos:
            try:
                pending.append(self._prepare(ctx))
            except StageError as exc:
                results[ctx.video_id] = exc
        attempt = 0
        while pending:
            attempt += 1
            # One batched call per round: retries of several videos share a forward pass.
            answers = self.generator.generate(
                [job.messages for job in pending], max_new_tokens=cfg.max_new_tokens
            )
            if len(answers) != len(pending):
                raise RuntimeError(
                    f"generator returned {len(answers)} answers for {len(pending)} conversations"
                )
            retry: list[_Job] = []
            for job, text in zip(pending, answers, strict=True):
                job.answers.append(text)
                try:
                    answer = parse_answer(
                        text,
                        job.caption,
                        job.person_ids,
                        max_subjects=cfg.max_subjects,
                        max_attributes=cfg.max_attributes,
                        shared_attributes=cfg.shared_attributes,
                        echoes=(job.prompt,),
                    )
                except InvalidAnswer as exc:
                    if attempt <= cfg.max_retries:
                        job.messages = job.messages + [
                            {"role": "assistant", "content": [{"type": "text", "text": text}]},
                            {"role": "user", "content": [{"type": "text", "text": feedback_message(exc)}]},
                        ]
                        retry.append(job)
                    else:
                        shown = text.strip().replace("\n", " ")[:200]
                        results[job.video_id] = StageError(
                            exc.reason,
                            f"no valid entities after {attempt} attempt(s): {exc}; last answer: {shown!r}",
                        )
                    continue
                answer, dropped, shared = settle_answer(answer, cfg.shared_attributes)
                if not answer.subjects:
                    # Every subject's noun broke a label rule: nothing left to bind, say which rule.
                    why = "; ".join(d.message for d in dropped if d.role == "subject")
                    results[job.video_id] = StageError(
                        dropped[0].reason, f"no usable subject label is left: {why}"
                    )
                    continue
                if dropped:
                    logger.info(
                        "%s: dropped %s",
                        job.video_id,
                        ", ".join(f"{d.label!r} ({d.reason})" for d in dropped),
                    )
                results[job.video_id] = EntitiesRecord(
                    video_id=job.video_id,
                    model=self.generator.info,
                    prompt_version=cfg.prompt_file,
                    answer=answer,
                    attempts=attempt,
                    prior_keyframes=job.prior_keyframes,
                    dropped=dropped,
                    shared_attributes=shared,
                )
            pending = retry
        return results
