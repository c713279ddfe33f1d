"""Caption stage: one dense caption per video (paper section 3.2, step 1a), from a sidecar or a captioner.

The caption replaces the dataset's original one: later stages extract the entity words from it, and the
trainer's cross-attention mask finds condition labels in it verbatim. `caption.source` says where it comes
from:

  sidecar           the caption ingest attached (Panda-70M table or <video>.txt); a video without one fails
  model             always the captioner model (`caption.model`), on `num_frames` frames spread over the video
  sidecar_or_model  the sidecar when there is one, the model otherwise

The prompt (flows/prompts/<caption.prompt_file>) is part of the stage fingerprint: editing it recaptions.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from schemas.records import CaptionRecord
from tasks.base import Stage, StageError, TransientError, VideoContext
from tasks.keyframes import sample_frames
from tasks.prompts import load_prompt

logger = logging.getLogger(__name__)

FRAME_MAX_SIDE = 1024
"""Frames are decoded at most this large: both captioners downscale far below it (NVILA tiles of 448 px,
Qwen2.5-VL at most 768 tokens of 28x28 pixels per frame), and it bounds host memory for 4K sources."""

_WHITESPACE = re.compile(r"\s+")


def normalize_caption(text: str) -> str:
    """One line, single spaces: captions go to one-line caption.txt files and are matched token by token."""
    return _WHITESPACE.sub(" ", text).strip()


def uniform_times(duration_s: float, num_frames: int) -> list[float]:
    """Centres of `num_frames` equal slices of the video: spread over all of it, clear of fades at ends."""
    return [(i + 0.5) * duration_s / num_frames for i in range(num_frames)]


def too_long(ctx: VideoContext, caption: str, max_chars: int, source: str) -> StageError:
    return StageError(
        "caption_too_long",
        f"{ctx.video.uri}: the {source} caption has {len(caption)} characters, more than caption.max_chars="
        f"{max_chars} (cut, a label past the trainer's 512 text tokens could not be found)",
    )


class CaptionStage(Stage[CaptionRecord]):
    """Dense caption of each video, from its sidecar or from a video captioner (NVILA / Qwen2.5-VL)."""

    name = "caption"
    version = "2"  # 2: max_chars
    record_type = CaptionRecord
    requires = ("ingest",)
    uses_gpu = True

    def __init__(self, config):
        super().__init__(config)
        self.prompt = load_prompt(config.caption.prompt_file)
        self._captioner = None

    def settings(self) -> Any:
        return {
            "caption": self.config.caption.model_dump(mode="json"),
            "prompt": self.prompt,
            "frame_max_side": FRAME_MAX_SIDE,
        }

    def setup(self) -> None:
        # With sidecar_or_model the model may never be needed (all videos have sidecars): load on first use.
        if self.config.caption.source == "model":
            self.captioner()

    def captioner(self):
        if self._captioner is None:
            from models.captioner import (
                CAPTIONERS,
            )  # heavy (transformers): imported in the worker that needs it

            self._captioner = CAPTIONERS.get(self.config.caption.model)
        return self._captioner

    def process(self, videos: list[VideoContext]) -> dict[str, CaptionRecord | StageError]:
        cfg = self.config.caption
        out: dict[str, CaptionRecord | StageError] = {}
        to_model: list[VideoContext] = []
        for ctx in videos:
            sidecar = normalize_caption(ctx.video.sidecar_caption or "")
            if sidecar and len(sidecar) > cfg.max_chars and cfg.source != "model":
                out[ctx.video_id] = too_long(ctx, sidecar, cfg.max_chars, "sidecar")
                continue
            if sidecar and cfg.source in ("sidecar", "sidecar_or_model"):
                out[ctx.video_id] = CaptionRecord(video_id=ctx.video_id, caption=sidecar, source="sidecar")
            elif cfg.source == "sidecar":
                out[ctx.video_id] = StageError(
                    "no_caption", f"{ctx.video.uri}: no sidecar caption, and caption.source is 'sidecar'"
                )
            else:
                to_model.append(ctx)
        if to_model:
            out.update(self._caption_with_model(to_model))
        return out

    def _caption_with_model(self, videos: list[VideoContext]) -> dict[str, CaptionRecord | StageError]:
        cfg = self.config.caption
        out: dict[str, CaptionRecord | StageError] = {}
        ready: list[tuple[VideoContext, float, list[float], list]] = []
        for ctx in videos:
            v = ctx.video
            duration = v.duration_s if v.duration_s > 0 else v.num_frames / max(v.fps, 1e-6)
            times = uniform_times(duration, cfg.num_frames)
            try:
                ready.append((ctx, duration, times, sample_frames(v.uri, times, max_side=FRAME_MAX_SIDE)))
            except StageError as e:
                out[ctx.video_id] = e
        if not ready:
            return out

        import torch  # loaded with the captioner anyway

        captioner = self.captioner()
        try:
            texts = captioner(
                [frames for *_, frames in ready],
                self.prompt,
                max_new_tokens=cfg.max_new_tokens,
                # rate of the sampled frames: a model with time-aligned positions (Qwen2.5-VL) sees real time
                sample_fps=[len(times) / duration for _, duration, times, _ in ready],
            )
        except torch.OutOfMemoryError as e:
            # Under contention for the GPU a retry of the batch may fit; anything else is a bug or bad model.
            raise TransientError(f"captioner out of memory: {e}") from e
        if len(texts) != len(ready):
            raise RuntimeError(f"captioner returned {len(texts)} captions for {len(ready)} videos")

        for (ctx, _, times, _), text in zip(ready, texts, strict=True):
            caption = normalize_caption(text)
            if not caption:
                out[ctx.video_id] = StageError(
                    "empty_caption",
                    f"{ctx.video.uri}: the captioner ({captioner.info.backend}) returned no text",
                )
                continue
            if len(caption) > cfg.max_chars:
                out[ctx.video_id] = too_long(ctx, caption, cfg.max_chars, "model")
                continue
            out[ctx.video_id] = CaptionRecord(
                video_id=ctx.video_id,
                caption=caption,
                source="model",
                model=captioner.info,
                frame_times_s=[round(t, 6) for t in times],
            )
        return out
