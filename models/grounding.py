"""Open-vocabulary box detection: turn an entity phrase ("black watch", "wooden cutting board") into boxes.

Backend "grounding-dino": GroundingDINO through transformers' native implementation
(`AutoModelForZeroShotObjectDetection` + `AutoProcessor`), default weights
"IDEA-Research/grounding-dino-base".
The original `groundingdino` package does not run with transformers 5.

Two uses in the curation (SPEC §1, steps 3a/3b):
- attributes: search only inside the person's box (`regions`), so "black shirt" finds *this* person's shirt;
  boxes come back in frame coordinates, clipped to the region;
- objects: search the whole frame (region None).

Options (`ModelSpec.options`):
- ``box_threshold`` (0.35): minimum score of a box for its phrase (max sigmoid over the phrase's tokens);
- ``text_threshold`` (0.25): minimum mean token score of the phrase; a box that only matches one word of a
  multi-word phrase ("black" of "black watch") is not that phrase;
- ``nms_iou`` (0.5): per-phrase non-maximum suppression; GroundingDINO's 900 queries return many near-copies;
- ``max_per_phrase`` (None): keep at most this many boxes per phrase (best first).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from models.base import ModelLoadError, ModelSpec, Registry, model_info, resolve_device, resolve_dtype
from models.tiny_vocab import TINY_WORDS
from models.weights import DEFAULTS
from schemas.records import Box

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = DEFAULTS["grounding-dino"]

GROUNDERS = Registry("grounder")

_OPTIONS = {"box_threshold", "text_threshold", "nms_iou", "max_per_phrase"}


@dataclass(frozen=True)
class GroundedBox:
    phrase: str
    box: Box
    """in the coordinates of the full image passed to `detect`, never of the region crop"""
    score: float


def phrase_prompt(phrases: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """GroundingDINO's prompt format ("black shirt. red hat.") and each phrase's character span in it.

    The model was trained on lower-case, dot-separated category lists; a dot inside a phrase would split it in
    two, so dots are dropped from the phrases.
    """
    text, spans = "", []
    for phrase in phrases:
        clean = " ".join(phrase.replace(".", " ").lower().split())
        if text:
            text += " "
        spans.append((len(text), len(text) + len(clean)))
        text += clean + "."
    return text, spans


def phrase_token_indices(
    offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[list[int]]:
    """Token positions of each phrase, from the tokenizer's character offsets (special tokens have (0, 0))."""
    out: list[list[int]] = []
    for s0, s1 in spans:
        out.append([i for i, (t0, t1) in enumerate(offsets) if t1 > t0 and t0 < s1 and t1 > s0])
    return out


def assign_phrases(
    token_probs: torch.Tensor,
    phrase_tokens: Sequence[Sequence[int]],
    box_threshold: float,
    text_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give each query box at most one phrase.

    token_probs: (Q, T) sigmoid scores of every query against every text token.
    Returns (query indices kept, their phrase index, their score).
    A query's score for a phrase is the max over the phrase's tokens; the query goes to its best phrase, and
    is kept when that score reaches `box_threshold` and the phrase's mean token score reaches
    `text_threshold`.
    """
    q = token_probs.shape[0]
    best = torch.full((q,), -1.0)
    best_mean = torch.zeros(q)
    best_phrase = torch.full((q,), -1, dtype=torch.long)
    for p, idx in enumerate(phrase_tokens):
        if not idx:
            continue
        sub = token_probs[:, list(idx)].float().cpu()
        score, mean = sub.max(dim=1).values, sub.mean(dim=1)
        better = score > best
        best = torch.where(better, score, best)
        best_mean = torch.where(better, mean, best_mean)
        best_phrase = torch.where(better, torch.full_like(best_phrase, p), best_phrase)
    keep = (best_phrase >= 0) & (best >= box_threshold) & (best_mean >= text_threshold)
    kept = keep.nonzero(as_tuple=True)[0]
    return kept, best_phrase[kept], best[kept]


@GROUNDERS.register("grounding-dino")
class GroundingDinoDetector:
    """Batched GroundingDINO: images × phrase lists (× optional search regions) → boxes per phrase."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        *,
        spec: ModelSpec,
        device: str,
        dtype: torch.dtype,
    ):
        self.model = model
        self.processor = processor
        self.info = model_info(spec, DEFAULT_WEIGHTS)
        self.device = device
        self.dtype = dtype
        self.batch_size = spec.batch_size
        opts = spec.options
        self.box_threshold = float(opts.get("box_threshold", 0.35))
        self.text_threshold = float(opts.get("text_threshold", 0.25))
        self.nms_iou = float(opts.get("nms_iou", 0.5))
        max_per_phrase = opts.get("max_per_phrase")
        self.max_per_phrase = None if max_per_phrase is None else int(max_per_phrase)

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> GroundingDinoDetector:
        unknown = set(spec.options) - _OPTIONS
        if unknown:  # checked before loading, so a typo costs no download
            raise ModelLoadError(f"unknown grounding-dino options: {sorted(unknown)}")
        device = resolve_device(spec.device)
        dtype = resolve_dtype(spec.dtype, device)
        if spec.random_init:
            model, processor = _tiny_grounding_dino()
        else:
            from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

            weights = spec.weights or DEFAULT_WEIGHTS
            try:
                processor = AutoProcessor.from_pretrained(
                    weights, revision=spec.revision, trust_remote_code=spec.trust_remote_code
                )
                model = AutoModelForZeroShotObjectDetection.from_pretrained(
                    weights, revision=spec.revision, dtype=dtype, trust_remote_code=spec.trust_remote_code
                )
            except Exception as e:  # hub, filesystem and config errors all mean the same thing here
                raise ModelLoadError(
                    f"cannot load GroundingDINO weights {weights!r} (revision {spec.revision!r}): {e}. "
                    "Set the grounder's `weights` to a local directory holding a transformers GroundingDINO "
                    f"checkpoint (e.g. `huggingface-cli download {DEFAULT_WEIGHTS} --local-dir DIR`) "
                    "or to a hub id reachable from this machine."
                ) from e
        model = model.to(device=device, dtype=dtype).eval()
        return cls(model, processor, spec=spec, device=device, dtype=dtype)

    def detect(
        self,
        images: Sequence[Image.Image],
        phrases: Sequence[Sequence[str]],
        regions: Sequence[Box | None] | None = None,
    ) -> list[list[GroundedBox]]:
        """Boxes for each image's phrases, best first, in full-image pixel coordinates.

        `regions[i]` restricts image i's search to that box: the crop is what the model sees (a person fills
        the model's input instead of being a few dozen pixels of a wide frame), and boxes are mapped back and
        clipped to the region. An image without phrases, or whose region is empty, gets no boxes.
        """
        if len(phrases) != len(images):
            raise ValueError(f"{len(images)} images but {len(phrases)} phrase lists")
        if regions is None:
            regions = [None] * len(images)
        if len(regions) != len(images):
            raise ValueError(f"{len(images)} images but {len(regions)} regions")

        jobs: list[tuple[int, Image.Image, list[str], tuple[int, int], Box]] = []
        for i, (image, item_phrases, region) in enumerate(zip(images, phrases, regions)):
            item_phrases = [p for p in item_phrases if p.strip()]
            if not item_phrases:
                continue
            w, h = image.size
            if region is None:
                jobs.append((i, image.convert("RGB"), item_phrases, (0, 0), Box(x0=0, y0=0, x1=w, y1=h)))
                continue
            x0, y0, x1, y1 = region.pixel_bounds(w, h)
            if x1 <= x0 or y1 <= y0:
                logger.debug("region %s of image %d is empty; no boxes", region.as_tuple(), i)
                continue
            clip = Box(x0=max(region.x0, 0), y0=max(region.y0, 0), x1=min(region.x1, w), y1=min(region.y1, h))
            jobs.append((i, image.convert("RGB").crop((x0, y0, x1, y1)), item_phrases, (x0, y0), clip))

        results: list[list[GroundedBox]] = [[] for _ in images]
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start : start + self.batch_size]
            for (i, *_), found in zip(batch, self._detect_batch(batch)):
                results[i] = found
        return results

    __call__ = detect

    @torch.inference_mode()
    def _detect_batch(self, batch) -> list[list[GroundedBox]]:
        from torchvision.ops import batched_nms

        prompts = [phrase_prompt(item_phrases) for _, _, item_phrases, _, _ in batch]
        max_len = self.model.config.max_text_len
        texts = [text for text, _ in prompts]
        inputs = self.processor(
            images=[crop for _, crop, _, _, _ in batch],
            text=texts,
            padding="longest",
            truncation=True,
            max_length=max_len,
            return_tensors="pt",
        ).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        outputs = self.model(**inputs)
        probs = outputs.logits.sigmoid()  # (B, Q, max_text_len)
        boxes_cxcywh = outputs.pred_boxes.float()  # (B, Q, 4), relative to each (unpadded) input image

        found: list[list[GroundedBox]] = []
        for b, ((_, crop, item_phrases, (ox, oy), clip), (text, spans)) in enumerate(zip(batch, prompts)):
            # Same text, tokenizer and truncation as the batch above: offsets line up with input_ids[b].
            offsets = self.processor.tokenizer(
                text, return_offsets_mapping=True, truncation=True, max_length=max_len
            )["offset_mapping"]
            tokens = phrase_token_indices(offsets, spans)
            for phrase, idx in zip(item_phrases, tokens):
                if not idx:
                    logger.warning(
                        "phrase %r was truncated away (prompt longer than %d tokens)", phrase, max_len
                    )
            kept, phrase_idx, scores = assign_phrases(
                probs[b], tokens, self.box_threshold, self.text_threshold
            )
            if kept.numel() == 0:
                found.append([])
                continue
            cw, ch = crop.size
            cx, cy, bw, bh = boxes_cxcywh[b, kept].cpu().unbind(-1)
            xyxy = torch.stack(
                [
                    (cx - bw / 2) * cw + ox,
                    (cy - bh / 2) * ch + oy,
                    (cx + bw / 2) * cw + ox,
                    (cy + bh / 2) * ch + oy,
                ],
                dim=-1,
            )
            xyxy[:, 0::2] = xyxy[:, 0::2].clamp(clip.x0, clip.x1)
            xyxy[:, 1::2] = xyxy[:, 1::2].clamp(clip.y0, clip.y1)
            area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
            valid = area > 0  # a box entirely outside the region collapses to a line after clipping
            xyxy, phrase_idx, scores = xyxy[valid], phrase_idx[valid], scores[valid]
            order = batched_nms(xyxy, scores, phrase_idx, self.nms_iou)  # sorted by decreasing score
            per_phrase: dict[int, int] = {}
            item: list[GroundedBox] = []
            for k in order.tolist():
                p = int(phrase_idx[k])
                per_phrase[p] = per_phrase.get(p, 0) + 1
                if self.max_per_phrase is not None and per_phrase[p] > self.max_per_phrase:
                    continue
                item.append(GroundedBox(item_phrases[p], Box.from_tuple(xyxy[k].tolist()), float(scores[k])))
            found.append(item)
        return found


# Test build ------------------------------------------------------------------------------------------------


def _tiny_grounding_dino():
    """GroundingDINO with a tiny Swin backbone and a tiny BERT text encoder, random weights, no download.

    The processor is the real GroundingDINO processor over a WordPiece vocabulary built from a word list
    (unknown words become [UNK], which still yields one token per word, so phrase spans behave as with the
    real vocab).
    """
    from transformers import (
        AutoModelForZeroShotObjectDetection,
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "-"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(specials + list(TINY_WORDS)))}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 128})
    processor = GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            embed_dim=8,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1],
            window_size=4,
            image_size=64,
            out_features=["stage2", "stage3", "stage4"],
            out_indices=[2, 3, 4],
        ),
        text_config=BertConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        ),
        d_model=64,  # GroupNorm(32, d_model) in the input projections: >= 2 channels per group for 1x1 maps
        encoder_layers=1,
        decoder_layers=2,  # the box heads of decoder layers > 0 are tied to layer 0's
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=2,
        decoder_n_points=2,
        num_queries=20,
        max_text_len=32,
    )
    torch.manual_seed(0)
    model = AutoModelForZeroShotObjectDetection.from_config(config)
    return model, processor
