"""Curated WebDataset shards -> training batches (video clip, condition images, layouts, prompt tokens).

Pipeline, per rank and per data-loader worker (all random choices seeded, so a run replays exactly)::

    shard stream        deterministic epochs (each a seeded permutation of the shards), endless, then
                        split by node and by worker -- or wds resampled shards (draws with replacement)
    tar -> samples      wds.tarfile_to_samples; broken tars are logged and skipped
    sample shuffle      seeded buffer
    light records       meta.json parsed, stage filter (number of persons), too-short clips and malformed
                        samples dropped with a warning; aspect bucket picked from the meta's size
    bucket batches      batch_size samples of the same bucket
    skip                on resume, the batches this worker already delivered (cheap: nothing decoded yet)
    decode + collate    mp4 -> 16 fps clip (PyAV, frames picked by timestamp), resize + center crop to the
                        bucket; conditions chosen, augmented, fitted on white; prompt tokenised; MCAM
                        templates; condition tensors zero-padded to the configured condition slots (or to
                        the batch's largest count)

The stream never ends: training length is counted in steps. Decoding runs after batching so that resuming
skips already-seen batches without decoding them.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import tempfile
import threading
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import av
import numpy as np
import torch
import webdataset as wds
from safetensors.torch import load_file, save_file

from lumosx_model.components import PromptTokenizer
from lumosx_model.conditions import (
    ConditionAugment,
    SampleFormatError,
    TooManyConditionsError,
    condition_pixels,
    conditions_from_meta,
    layout_of,
    mix_seed,
)
from lumosx_model.config import DataConfig
from lumosx_model.layout import SampleLayout
from lumosx_model.masks import mcam_template, pad_templates

log = logging.getLogger(__name__)


class ClipTooShortError(ValueError):
    """The video is shorter than the requested clip (num_frames at fps)."""


# ------------------------------------------------------------------------------------------------ video
def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) bucket whose aspect ratio is closest to the video's (in log space)."""
    ratio = math.log(height / width)
    return min(buckets, key=lambda hw: abs(math.log(hw[0] / hw[1]) - ratio))


def clip_start(
    duration: float, *, num_frames: int, fps: float, src_fps: float, mode: str, rng: random.Random | None
) -> float:
    """Start time of the clip inside a video of ``duration`` seconds."""
    length = (num_frames - 1) / fps
    # The last target must fall on or before the last source frame's timestamp.
    slack = duration - length - 1.0 / src_fps
    if duration - length < -1e-6:
        raise ClipTooShortError(
            f"video lasts {duration:.3f}s, a {num_frames}-frame clip at {fps} fps needs {length:.3f}s"
        )
    slack = max(0.0, slack)
    if mode == "start":
        return 0.0
    if mode == "center":
        return slack / 2
    if rng is None:
        raise ValueError("temporal_crop='random' needs an rng")
    return rng.uniform(0.0, slack)


def decode_clip(
    data: bytes,
    *,
    num_frames: int,
    fps: float,
    size: tuple[int, int],
    temporal_crop: str = "random",
    rng: random.Random | None = None,
) -> torch.Tensor:
    """Decode ``num_frames`` frames resampled to ``fps`` from mp4 bytes: ``uint8 [F, H, W, 3]``.

    Frame ``i`` is the source frame on screen at ``start + i / fps`` (picked by timestamp, so variable frame
    rates and 24/25/30/60 fps sources all resample correctly). Frames are scaled to cover ``size`` (h, w) by
    swscale while decoding and center-cropped.
    """
    height, width = size
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        src_fps = float(stream.average_rate or stream.guessed_rate or 25)
        time_base = float(stream.time_base)
        origin = float(stream.start_time * time_base) if stream.start_time is not None else 0.0
        if stream.duration is not None:
            duration = float(stream.duration * time_base)
        elif container.duration is not None:
            duration = container.duration / 1e6
        elif stream.frames:
            duration = stream.frames / src_fps
        else:
            raise SampleFormatError("cannot tell the video's duration")
        start = clip_start(
            duration, num_frames=num_frames, fps=fps, src_fps=src_fps, mode=temporal_crop, rng=rng
        )
        targets = [origin + start + i / fps for i in range(num_frames)]

        scale = max(height / stream.codec_context.height, width / stream.codec_context.width)
        sw = max(width, round(stream.codec_context.width * scale))
        sh = max(height, round(stream.codec_context.height * scale))
        top, left = (sh - height) // 2, (sw - width) // 2

        if start > 2.0:  # jump near the clip instead of decoding the whole prefix
            container.seek(int((origin + start) / time_base), stream=stream, backward=True)

        frames: list[np.ndarray] = []
        prev = None  # (frame, converted array or None)

        def pixels(entry) -> np.ndarray:
            if entry[1] is None:
                entry[1] = entry[0].to_ndarray(width=sw, height=sh, format="rgb24", interpolation="AREA")[
                    top : top + height, left : left + width
                ]
            return entry[1]

        last_time = None
        for frame in container.decode(stream):
            t = (
                frame.time
                if frame.time is not None
                else (last_time + 1 / src_fps if last_time is not None else origin)
            )
            last_time = t
            entry = [frame, None]
            while len(frames) < num_frames and targets[len(frames)] < t - 1e-4:
                frames.append(pixels(prev if prev is not None else entry))
            if len(frames) == num_frames:
                break
            prev = entry
        # Targets after the last frame's timestamp still fall inside its display interval (checked above).
        while (
            prev is not None and len(frames) < num_frames and targets[len(frames)] < last_time + 1.5 / src_fps
        ):
            frames.append(pixels(prev))
    if len(frames) < num_frames:
        raise ClipTooShortError(f"decoded {len(frames)} of {num_frames} frames")
    return torch.from_numpy(np.stack(frames))


def video_to_model_range(frames: torch.Tensor) -> torch.Tensor:
    """``uint8 [F, H, W, 3]`` -> float ``[3, F, H, W]`` in [-1, 1]."""
    return frames.permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


# ------------------------------------------------------------------------------------------------ cache
class LatentCache:
    """Video latents and text embeddings on disk (safetensors), so the frozen encoders run once per sample.

    Files live under ``root/<namespace>/<key>_<H>x<W>.safetensors``; the namespace hashes the encoders' id and
    the clip settings, so changing the VAE, the text encoder, the frame count or the fps never reuses stale
    entries. Writes are atomic (temp file + rename).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        encoder_fingerprint: str,
        num_frames: int,
        fps: float,
        temporal_crop: str,
    ) -> None:
        ns = hashlib.sha1(f"{encoder_fingerprint}|{num_frames}|{fps}|{temporal_crop}".encode()).hexdigest()[
            :16
        ]
        self.dir = Path(root) / ns

    def path(self, key: str, bucket: tuple[int, int]) -> Path:
        return self.dir / f"{key}_{bucket[0]}x{bucket[1]}.safetensors"

    def has(self, key: str, bucket: tuple[int, int]) -> bool:
        return self.path(key, bucket).is_file()

    def load(self, key: str, bucket: tuple[int, int], text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(video_latents [z, T, h, w], text_embeds [text_len, D])``."""
        t = load_file(self.path(key, bucket))
        text = t["text_embeds"]
        padded = text.new_zeros((text_len, text.shape[-1]))
        padded[: text.shape[0]] = text[:text_len]
        return t["video_latents"], padded

    def save(
        self,
        key: str,
        bucket: tuple[int, int],
        video_latents: torch.Tensor,
        text_embeds: torch.Tensor,
        text_length: int,
    ) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        target = self.path(key, bucket)
        fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
        os.close(fd)
        try:
            # Only the prompt's own tokens are stored; the rest of the row is zeros by construction.
            save_file(
                {
                    "video_latents": video_latents.detach().cpu().contiguous(),
                    "text_embeds": text_embeds[:text_length].detach().cpu().contiguous(),
                },
                tmp,
            )
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# ------------------------------------------------------------------------------------------------ records
@dataclass
class RawSample:
    """A sample after the cheap stages: parsed meta, raw member bytes, bucket; nothing decoded yet."""

    key: str
    caption: str
    meta: dict
    members: dict[str, bytes]
    bucket: tuple[int, int]
    index: int = 0  # position in this worker's stream; seeds the sample's random choices


@dataclass
class Batch:
    """One training batch. Conditions are zero-padded to ``Nmax`` slots: ``DataConfig.num_condition_slots``
    when set (the same for every batch, so compiled kernels see one sequence length per bucket), else the
    batch's largest count.

    Either ``video`` (pixels) or ``video_latents`` (from the cache) is set, and likewise ``text_embeds`` is
    set only when cached; the trainer encodes what is missing.
    """

    keys: list[str]
    captions: list[str]
    layouts: list[SampleLayout]
    cond_pixels: torch.Tensor  # [B, Nmax, 3, H, W] in [-1, 1], zero padding
    cond_counts: torch.Tensor  # [B] long
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    mcam_templates: torch.Tensor  # [B, Nmax, L] float, zero padding
    video: torch.Tensor | None = None  # [B, 3, F, H, W] in [-1, 1]
    video_latents: torch.Tensor | None = None  # [B, z, T, h, w]
    text_embeds: torch.Tensor | None = None  # [B, L, D]

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str) -> Batch:
        moved = {
            f.name: (
                getattr(self, f.name).to(device)
                if isinstance(getattr(self, f.name), torch.Tensor)
                else getattr(self, f.name)
            )
            for f in fields(self)
        }
        return Batch(**moved)


def count_persons(meta: dict) -> int:
    return len(meta.get("persons") or [])


def to_raw_sample(sample: dict, cfg: DataConfig) -> RawSample | None:
    """wds sample dict -> RawSample, or None (with a warning) if it is malformed or filtered out."""
    key = sample.get("__key__", "?")
    try:
        if "meta.json" not in sample or "mp4" not in sample:
            raise SampleFormatError("sample lacks meta.json or mp4")
        meta = json.loads(sample["meta.json"])
        caption = (
            sample["caption.txt"].decode("utf-8").strip() if "caption.txt" in sample else meta.get("caption")
        )
        if not caption:
            raise SampleFormatError("empty caption")
        persons = count_persons(meta)
        if persons < cfg.min_persons or (cfg.max_persons is not None and persons > cfg.max_persons):
            return None  # stage filter, not an error
        video = meta.get("video") or {}
        width, height = video.get("width"), video.get("height")
        if not width or not height:
            raise SampleFormatError("meta.video lacks width/height")
        duration = video.get("duration_s")
        if duration is not None and duration < (cfg.num_frames - 1) / cfg.fps:
            raise ClipTooShortError(
                f"{duration:.2f}s is shorter than {cfg.num_frames} frames at {cfg.fps} fps"
            )
        members = {k: v for k, v in sample.items() if not k.startswith("__") and isinstance(v, bytes)}
        return RawSample(key, caption, meta, members, nearest_bucket(width, height, cfg.buckets))
    except (ValueError, KeyError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        log.warning("skipping sample %s: %s: %s", key, type(err).__name__, err)
        return None


class SampleDecoder:
    """RawSample list (one bucket) -> :class:`Batch`. Lives in data-loader workers: holds no model weights."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: PromptTokenizer,
        *,
        seed: int,
        train: bool = True,
        cache: LatentCache | None = None,
    ) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.seed = seed
        self.train = train
        self.cache = cache

    def sample_rng(self, raw: RawSample) -> random.Random:
        return random.Random(mix_seed(self.seed, zlib.crc32(raw.key.encode()), raw.index))

    def conditions(self, raw: RawSample, rng: random.Random):
        cfg = self.cfg
        conds = conditions_from_meta(
            raw.meta,
            raw.members,
            rng=rng,
            max_subjects=cfg.max_subjects,
            max_attributes=cfg.max_attributes,
            max_objects=cfg.max_objects,
            whole_person_prob=cfg.whole_person_prob if self.train else 0.0,
            whole_person_as_object=cfg.whole_person_as_object,
            use_objects=cfg.use_objects,
            use_background=cfg.use_background,
        )
        augment = ConditionAugment(cfg.augment, raw.bucket) if (self.train and cfg.augment.enabled) else None
        return conds, condition_pixels(conds, raw.bucket, augment=augment, seed=rng.getrandbits(63))

    def __call__(self, raws: list[RawSample]) -> Batch | None:
        cached = self.cache is not None and all(self.cache.has(r.key, r.bucket) for r in raws)
        slots = self.cfg.num_condition_slots
        items = []
        for raw in raws:
            rng = self.sample_rng(raw)
            try:
                video = None
                if not cached:
                    # Same rng order whether or not cached: clip start first, then conditions.
                    frames = decode_clip(
                        raw.members["mp4"],
                        num_frames=self.cfg.num_frames,
                        fps=self.cfg.fps,
                        size=raw.bucket,
                        temporal_crop=self.cfg.temporal_crop,
                        rng=rng,
                    )
                    video = video_to_model_range(frames)
                conds, pixels = self.conditions(raw, rng)
                if slots is not None and len(conds) > slots:  # the config's caps rule this out
                    raise TooManyConditionsError(f"{len(conds)} conditions for {slots} condition slots")
            except (ValueError, KeyError, OSError, av.FFmpegError) as err:
                log.warning("skipping sample %s: %s: %s", raw.key, type(err).__name__, err)
                continue
            items.append((raw, video, conds, pixels))
        if not items:
            return None

        input_ids, attention_mask = self.tokenizer([raw.caption for raw, *_ in items])
        layouts, templates = [], []
        for i, (_, _, conds, _) in enumerate(items):
            layout = layout_of(conds)
            layouts.append(layout)
            label_ids = [self.tokenizer.label_ids(c.condition.label) for c in conds]
            templates.append(mcam_template(layout, input_ids[i].tolist(), label_ids))

        counts = torch.tensor([len(conds) for _, _, conds, _ in items], dtype=torch.long)
        n_max = slots if slots is not None else int(counts.max())
        h, w = items[0][0].bucket
        cond_pixels = torch.zeros((len(items), n_max, 3, h, w))
        for i, (_, _, _, pixels) in enumerate(items):
            cond_pixels[i, : len(pixels)] = pixels
        mcam = pad_templates(templates, n_max, input_ids.shape[1])

        batch = Batch(
            keys=[raw.key for raw, *_ in items],
            captions=[raw.caption for raw, *_ in items],
            layouts=layouts,
            cond_pixels=cond_pixels,
            cond_counts=counts,
            input_ids=input_ids,
            attention_mask=attention_mask,
            mcam_templates=mcam,
        )
        if cached:
            loaded = [self.cache.load(raw.key, raw.bucket, self.tokenizer.text_len) for raw, *_ in items]
            batch.video_latents = torch.stack([v for v, _ in loaded])
            batch.text_embeds = torch.stack([t for _, t in loaded])
        else:
            batch.video = torch.stack([video for _, video, _, _ in items])
        return batch


# ------------------------------------------------------------------------------------------------ stages
def expand_shards(patterns: Iterable[str]) -> list[str]:
    """Brace patterns and globs -> a sorted, de-duplicated list of shard URLs (remote URLs kept as given)."""
    import braceexpand

    urls: list[str] = []
    for pattern in patterns:
        for url in braceexpand.braceexpand(pattern):
            if "://" not in url and any(ch in url for ch in "*?["):
                urls.extend(sorted(glob.glob(url)))
            else:
                urls.append(url)
    urls = list(dict.fromkeys(urls))
    if not urls:
        raise FileNotFoundError(f"no shards match {list(patterns)}")
    return urls


class EpochShards(wds.pipeline.IterableDataset):
    """Endless stream of shard URLs, epoch after epoch, each epoch a permutation seeded by (seed, epoch).

    Split by node and worker *after* this stage, every rank and worker keeps receiving shards across epoch
    boundaries, so no rank runs dry while others train (the classic multi-GPU hang with finite shard lists).
    """

    def __init__(self, urls: Sequence[str], *, seed: int, shuffle: bool) -> None:
        super().__init__()
        self.urls = list(urls)
        self.seed = seed
        self.shuffle = shuffle

    def __iter__(self) -> Iterator[dict]:
        epoch = 0
        while True:
            order = list(self.urls)
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            for url in order:
                yield dict(url=url)
            epoch += 1


def _raw_samples(src: Iterator[dict], cfg: DataConfig) -> Iterator[RawSample]:
    index = 0
    for sample in src:
        raw = to_raw_sample(sample, cfg)
        if raw is not None:
            raw.index = index
            index += 1
            yield raw


def _bucket_batches(src: Iterator[RawSample], batch_size: int) -> Iterator[list[RawSample]]:
    pending: dict[tuple[int, int], list[RawSample]] = {}
    for raw in src:
        group = pending.setdefault(raw.bucket, [])
        group.append(raw)
        if len(group) == batch_size:
            yield pending.pop(raw.bucket)


def _worker_slot(batches_consumed: int) -> tuple[int, int]:
    """``(slot, num_workers)``: which share of the stream this data-loader worker serves.

    A torch DataLoader draws batches from its workers round-robin starting with worker 0. Without a resume the
    slot is the worker id; after ``n`` consumed batches, worker ``w`` takes the slot of the worker that would
    have delivered batch ``n + w``, so the resumed loader continues the very same sequence.
    """
    _, _, worker, num_workers = wds.utils.pytorch_worker_info()
    num_workers = max(1, num_workers)
    return (worker + batches_consumed) % num_workers, num_workers


def _split_by_worker_slot(src: Iterator, batches_consumed: int) -> Iterator:
    slot, num_workers = _worker_slot(batches_consumed)
    yield from itertools.islice(src, slot, None, num_workers)


def _skip_delivered(src: Iterator, batches_consumed: int) -> Iterator:
    """Drop the batches this worker's slot delivered before a resume (nothing is decoded at this point)."""
    slot, num_workers = _worker_slot(batches_consumed)
    yield from itertools.islice(src, len(range(slot, batches_consumed, num_workers)), None)


def _is_batch(batch: Batch | None) -> bool:
    return batch is not None


def _slot_seed(batches_consumed: int) -> int:
    rank, _, _, _ = wds.utils.pytorch_worker_info()
    return rank * 1000 + _worker_slot(batches_consumed)[0]


def build_pipeline(
    cfg: DataConfig,
    tokenizer: PromptTokenizer,
    *,
    seed: int,
    train: bool = True,
    cache: LatentCache | None = None,
    skip_batches: int = 0,
) -> wds.DataPipeline:
    """The endless training stream of :class:`Batch` for this rank (see module docstring)."""
    urls = expand_shards(cfg.shards)
    if cfg.resampled:
        stages: list = [
            wds.ResampledShards(
                urls, seed=seed, deterministic=True, worker_seed=functools.partial(_slot_seed, skip_batches)
            )
        ]
    else:
        stages = [
            EpochShards(urls, seed=seed, shuffle=cfg.shard_shuffle > 0),
            wds.split_by_node,
            wds.pipelinefilter(_split_by_worker_slot)(skip_batches),
        ]
        if cfg.shard_shuffle > 1:
            stages.append(
                wds.shuffle(cfg.shard_shuffle, initial=cfg.shard_shuffle, rng=random.Random(seed + 1))
            )
    stages.append(wds.tarfile_to_samples(handler=wds.warn_and_continue))
    if cfg.shuffle_buffer > 0:
        stages.append(
            wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=random.Random(seed + 2))
        )
    decoder = SampleDecoder(cfg, tokenizer, seed=seed, train=train, cache=cache)
    stages += [
        wds.pipelinefilter(_raw_samples)(cfg),
        wds.pipelinefilter(_bucket_batches)(cfg.batch_size),
        wds.pipelinefilter(_skip_delivered)(skip_batches),
        wds.map(decoder),
        wds.select(_is_batch),
    ]
    return wds.DataPipeline(*stages)


def _guard_inherited_exit_hooks(worker_id: int) -> None:
    """Worker init: hooks the parent registered for its thread shutdown may run here but not fail the worker.

    A forked worker inherits the parent's ``threading._register_atexit`` hooks, and ``multiprocessing`` runs
    them when the worker exits (``threading._shutdown``). They belong to the parent's threads, which do not
    exist in the worker; some are not fork-safe. Prefect 3's log/event services reset their state after a fork
    but leave their hook, which then fails an assertion: every worker of a process that ran a Prefect flow
    exited with code 1 when the loader shut down, and the parent reported "DataLoader worker exited
    unexpectedly" from the loader's ``__del__``. Hooks the worker registers itself are not touched.
    """
    hooks = getattr(threading, "_threading_atexits", None)  # private; if it goes away, nothing to guard
    if hooks:
        hooks[:] = [functools.partial(_run_quietly, hook) for hook in hooks]


def _run_quietly(hook) -> None:
    try:
        hook()
    except Exception as err:  # the parent's bookkeeping, meaningless in the worker
        log.debug("inherited thread-exit hook %r failed in a data-loader worker: %s", hook, err)


def make_loader(pipeline: wds.DataPipeline, num_workers: int, *, seed: int = 0) -> wds.WebLoader:
    """Batches come pre-assembled from the pipeline; the loader only parallelises decoding.

    The loader gets its own generator: by default a DataLoader draws its worker base seed from the global
    torch RNG, which would shift the training noise of a resumed run against the uninterrupted one. The
    stream never ends, so the loader is always abandoned mid-stream (end of training, end of a test); its
    workers then exit on the DataLoader's shutdown signal, which :func:`_guard_inherited_exit_hooks` keeps
    clean in processes that forked with foreign thread-exit hooks.
    """
    return wds.WebLoader(
        pipeline,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=2 if num_workers else None,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_guard_inherited_exit_hooks if num_workers else None,
    )


def iterate_samples_once(cfg: DataConfig) -> Iterator[RawSample]:
    """Every sample passing the stage filter, once, in shard order (for caching); split by rank and worker."""
    urls = expand_shards(cfg.shards)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.pipelinefilter(_raw_samples)(cfg),
    )
    yield from pipeline


def fill_cache(cfg: DataConfig, encoders, cache: LatentCache) -> tuple[int, int]:
    """Encode every sample's clip and caption once into ``cache``; returns ``(written, skipped)``.

    Runs per rank under ``accelerate launch`` (shards are split by node); existing entries are kept, so an
    interrupted run resumes where it stopped. The clip is the deterministic one of ``cfg.temporal_crop``.
    """
    tokenizer = encoders.prompt_tokenizer
    written = skipped = 0
    for raw in iterate_samples_once(cfg):
        if cache.has(raw.key, raw.bucket):
            continue
        try:
            frames = decode_clip(
                raw.members["mp4"],
                num_frames=cfg.num_frames,
                fps=cfg.fps,
                size=raw.bucket,
                temporal_crop=cfg.temporal_crop,
            )
        except (ValueError, KeyError, OSError, av.FFmpegError) as err:
            log.warning("not caching %s: %s: %s", raw.key, type(err).__name__, err)
            skipped += 1
            continue
        latents = encoders.encode_video(video_to_model_range(frames).unsqueeze(0))[0]
        input_ids, attention_mask = tokenizer([raw.caption])
        text = encoders.encode_text(input_ids, attention_mask)[0]
        cache.save(raw.key, raw.bucket, latents, text, int(attention_mask.sum()))
        written += 1
    return written, skipped
