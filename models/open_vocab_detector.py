"""Open-vocabulary detection for the evaluation's two-tier metrics: a text query in, scored boxes out.

Backends (registered in `OPEN_VOCAB_DETECTORS`), both native transformers models (no remote code):

- ``owlv2``: `Owlv2ForObjectDetection` + `Owlv2Processor`, default ``google/owlv2-base-patch16-ensemble``; the
  paper's tier 2 (attributes inside a subject's crop, objects on the frame), score threshold 0.1 by default.
  Every query of an image is scored against every patch box in one forward pass.
- ``florence2``: `Florence2ForConditionalGeneration` with the ``<OPEN_VOCABULARY_DETECTION>`` task, the paper's
  tier 1 (a subject described as "<face label> with <attr 1> and <attr 2>"), default
  ``florence-community/Florence-2-large``: Microsoft's Florence-2-large weights converted to the transformers
  implementation (``microsoft/Florence-2-large`` itself ships its own model code, which this adapter does not
  run). One generation per (image, query); boxes are parsed from the generated location tokens by the
  processor's own post-processing. Florence-2 has no per-box confidence: every box of one answer gets the
  answer's score, the geometric-mean probability of its generated tokens (beam score), so ``threshold`` (default
  None) filters whole answers.

Both take RGB ``uint8`` arrays (H x W x 3) or PIL images and one list of query phrases per image, and return per
image `models.grounding.GroundedBox(phrase, box, score)` in that image's pixel coordinates, best first.
``random_init`` builds tiny random versions of both architectures with their real processors (tokenizers built
offline from a word list / bytes), so the whole code path runs in tests.

options: ``owlv2``: ``threshold`` (default 0.1), ``nms_iou`` (per-query NMS, default 0.3 as transformers' OWL
post-processing; 1.0 disables it). ``florence2``: ``threshold`` (default None), ``num_beams`` (default 3, as in
Microsoft's examples), ``max_new_tokens`` (default 1024).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from PIL import Image

from models.base import (
    ModelSpec,
    Registry,
    load_hf_model,
    model_info,
)
from models.grounding import GroundedBox
from models.image_features import ImageLike, to_pil
from models.qwen_vl import batched
from models.weights import DEFAULTS
from schemas.records import Box

logger = logging.getLogger(__name__)

OPEN_VOCAB_DETECTORS = Registry("open-vocabulary detector")

FLORENCE_TASK = "<OPEN_VOCABULARY_DETECTION>"


def _check_queries(images: Sequence[ImageLike], queries: Sequence[Sequence[str]]) -> None:
    if len(queries) != len(images):
        raise ValueError(f"{len(images)} images but {len(queries)} query lists")
    for i, qs in enumerate(queries):
        if isinstance(qs, str):
            raise ValueError(f"queries[{i}] is a string; pass a list of phrases per image")


def _clipped(xyxy, width: int, height: int) -> Box | None:
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    box = Box(x0=min(x0, x1), y0=min(y0, y1), x1=max(x0, x1), y1=max(y0, y1)).clip(width, height)
    return box if box.area > 0 else None


# ---------------------------------------------------------------------------------------------------------- OWLv2
@OPEN_VOCAB_DETECTORS.register("owlv2")
class Owlv2Detector:
    """OWLv2: per patch, a box and a similarity to every text query; a box is kept for its best query."""

    def __init__(self, model, processor, spec: ModelSpec, device: str, dtype):
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.batch_size = spec.batch_size
        self.threshold = float(spec.options.get("threshold", 0.1))
        self.nms_iou = float(spec.options.get("nms_iou", 0.3))
        self.info = model_info(spec, DEFAULTS["owlv2"])

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> Owlv2Detector:
        model, processor, device, dtype = load_hf_model(
            spec,
            family="OWLv2",
            default_weights=DEFAULTS["owlv2"],
            model_class="Owlv2ForObjectDetection",
            processor_class="Owlv2Processor",
            test_build=build_test_owlv2,
            options=frozenset({"threshold", "nms_iou"}),
        )
        return cls(model, processor, spec, device, dtype)

    def __call__(
        self,
        images: Sequence[ImageLike],
        queries: Sequence[Sequence[str]],
        threshold: float | None = None,
    ) -> list[list[GroundedBox]]:
        _check_queries(images, queries)
        threshold = self.threshold if threshold is None else float(threshold)
        jobs = [(i, [q for q in qs if q.strip()]) for i, qs in enumerate(queries)]
        jobs = [(i, qs) for i, qs in jobs if qs]
        results: list[list[GroundedBox]] = [[] for _ in images]
        for chunk in batched(jobs, self.batch_size):
            pils = [to_pil(images[i]) for i, _ in chunk]
            for (i, _), found in zip(chunk, self._detect(pils, [qs for _, qs in chunk], threshold)):
                results[i] = found
        return results

    detect = __call__

    @torch.inference_mode()
    def _detect(self, pils: list[Image.Image], queries: list[list[str]], threshold: float):
        from torchvision.ops import batched_nms

        # The processor pads every image's query list to the longest one of the batch (with blank queries).
        inputs = self.processor(text=queries, images=pils, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        outputs = self.model(**inputs)
        logits = outputs.logits.float()  # (B, patches, max queries)
        boxes = outputs.pred_boxes.float()  # (B, patches, 4) cxcywh relative to the padded square input
        out = []
        for b, (pil, qs) in enumerate(zip(pils, queries)):
            w, h = pil.size
            side = max(w, h)  # OWLv2 pads images to a square at the bottom / right before resizing
            probs = logits[b, :, : len(qs)].sigmoid()
            score, label = probs.max(dim=-1)
            keep = score >= threshold
            if not keep.any():
                out.append([])
                continue
            cx, cy, bw, bh = (boxes[b, keep] * side).unbind(-1)
            xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1).cpu()
            score, label = score[keep].cpu(), label[keep].cpu()
            order = (
                batched_nms(xyxy, score, label, self.nms_iou)
                if self.nms_iou < 1
                else score.argsort(descending=True)
            )
            found = []
            for k in order.tolist():
                box = _clipped(xyxy[k], w, h)
                if box is not None:
                    found.append(GroundedBox(qs[int(label[k])], box, float(score[k])))
            out.append(found)
        return out


def build_test_owlv2(seed: int = 0):
    """Tiny random OWLv2 (1 text and 1 vision layer, width 32, 64 px input with 16 px patches: 16 boxes) with
    the real `Owlv2ImageProcessor` (pad to square, resize, CLIP normalisation) at 64 px and a CLIP BPE tokenizer
    built offline from the project's word list (16 tokens per query, as OWLv2)."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    from models.tiny_vocab import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    tokenizer.model_max_length = 16
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=tokenizer
    )
    config = Owlv2Config(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
        ),
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Owlv2ForObjectDetection(config)
    return model.eval(), processor


# ------------------------------------------------------------------------------------------------------ Florence-2
@OPEN_VOCAB_DETECTORS.register("florence2")
class Florence2Detector:
    """Florence-2 ``<OPEN_VOCABULARY_DETECTION>``: one beam-searched answer per (image, query)."""

    def __init__(self, model, processor, spec: ModelSpec, device: str, dtype):
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.batch_size = spec.batch_size
        opts = spec.options
        self.threshold = None if opts.get("threshold") is None else float(opts["threshold"])
        self.num_beams = int(opts.get("num_beams", 3))
        self.max_new_tokens = int(opts.get("max_new_tokens", 1024))
        self.info = model_info(spec, DEFAULTS["florence2"])

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> Florence2Detector:
        if spec.trust_remote_code:
            logger.info("florence2 is native to transformers: trust_remote_code is not needed and not used")
        model, processor, device, dtype = load_hf_model(
            spec,
            family="Florence-2",
            default_weights=DEFAULTS["florence2"],
            model_class="Florence2ForConditionalGeneration",
            processor_class="AutoProcessor",
            test_build=build_test_florence2,
            options=frozenset({"threshold", "num_beams", "max_new_tokens"}),
        )
        return cls(model, processor, spec, device, dtype)

    def __call__(
        self,
        images: Sequence[ImageLike],
        queries: Sequence[Sequence[str]],
        threshold: float | None = None,
    ) -> list[list[GroundedBox]]:
        _check_queries(images, queries)
        threshold = self.threshold if threshold is None else float(threshold)
        pils = {i: to_pil(images[i]) for i, qs in enumerate(queries) if any(q.strip() for q in qs)}
        jobs = [(i, q.strip()) for i, qs in enumerate(queries) for q in qs if q.strip()]
        results: list[list[GroundedBox]] = [[] for _ in images]
        for chunk in batched(jobs, self.batch_size):
            answers = self._generate([pils[i] for i, _ in chunk], [q for _, q in chunk])
            for (i, query), (text, score) in zip(chunk, answers):
                if threshold is not None and score < threshold:
                    continue
                results[i].extend(self.parse(text, query, score, pils[i].size))
        for found in results:
            found.sort(key=lambda g: -g.score)  # stable: an answer's boxes keep their generated order
        return results

    detect = __call__

    @torch.inference_mode()
    def _generate(self, pils: list[Image.Image], queries: list[str]) -> list[tuple[str, float]]:
        # A phrase with "<" would read as a task or location token: the model never saw one in a query.
        prompts = [FLORENCE_TASK + q.replace("<", " ").replace(">", " ") for q in queries]
        inputs = self.processor(text=prompts, images=pils, return_tensors="pt", padding=True).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        out = self.model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            do_sample=False,
            return_dict_in_generate=True,
            output_scores=True,
        )
        if self.num_beams > 1:
            logprob = (
                out.sequences_scores.float()
            )  # length-normalised sum of token log-probs of the best beam
        else:
            steps = self.model.compute_transition_scores(
                out.sequences, out.scores, normalize_logits=True
            ).float()
            generated = out.sequences[:, -steps.shape[1] :] != self.processor.tokenizer.pad_token_id
            logprob = (steps * generated).sum(1) / generated.sum(1).clamp(min=1)
        texts = self.processor.batch_decode(out.sequences, skip_special_tokens=False)
        return [(t, float(s)) for t, s in zip(texts, logprob.exp().cpu().tolist())]

    def parse(self, text: str, query: str, score: float, size: tuple[int, int]) -> list[GroundedBox]:
        """Boxes of one generated answer, by the processor's own parser (location bins -> pixels of `size`)."""
        w, h = size
        parsed = self.processor.post_process_generation(text=text, task=FLORENCE_TASK, image_size=(w, h))
        found = []
        for xyxy in parsed[FLORENCE_TASK]["bboxes"]:
            box = _clipped(xyxy, w, h)
            if box is not None:
                found.append(GroundedBox(query, box, score))
        return found


FLORENCE_POST_PROCESSOR_CONFIG = {
    "description_with_bboxes_or_polygons": {},
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "bboxes": {},
    "pure_text": {},
}
"""The parse tasks the test build's processor knows (real checkpoints ship theirs in processor_config.json)."""


def build_test_florence2(seed: int = 0):
    """Tiny random Florence-2 (DaViT with one block per stage, 1-layer BART, width 32) and a real
    `Florence2Processor`: CLIP image processor at 64 x 64 (5 image tokens: the pooled token plus 2 x 2 patches)
    and a byte-level BART tokenizer carrying Florence's ``<image>``, ``<loc_0>``..``<loc_999>`` and region tokens,
    so prompts, generation and box parsing run as with the real model."""
    from transformers import (
        BartTokenizer,
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
    vocab["<mask>"] = len(vocab)
    tokenizer = BartTokenizer(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"})
    region_tokens = ["<od>", "</od>", "<ocr>", "</ocr>", "<poly>", "</poly>", "<sep>"]
    tokenizer.add_tokens([f"<loc_{i}>" for i in range(1000)] + region_tokens, special_tokens=True)
    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"height": 64, "width": 64},
        resample=3,
        do_center_crop=False,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    image_processor.image_seq_length = 5
    processor = Florence2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        post_processor_config=FLORENCE_POST_PROCESSOR_CONFIG,
    )
    config = Florence2Config(
        vision_config=dict(
            depths=[1, 1, 1, 1],
            embed_dim=[8, 16, 16, 32],
            num_heads=[1, 1, 1, 2],
            num_groups=[1, 1, 1, 2],
            window_size=2,
            projection_dim=32,
            drop_path_rate=0.0,
        ),
        text_config=dict(
            model_type="bart",
            vocab_size=len(tokenizer),
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=128,
            bos_token_id=0,
            pad_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=2,
        ),
        image_token_id=tokenizer.image_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Florence2ForConditionalGeneration(config)
    return model.eval(), processor
