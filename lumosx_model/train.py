"""Rectified-flow training of the relational Wan2.1 transformer on curated shards, with accelerate.

Objective (SPEC §2): ``x_t = (1 − σ) x0 + σ ε``, target ``v = ε − x0``, model timestep ``1000 σ``; σ is drawn
uniform then shifted, ``σ = s·u / (1 + (s − 1)·u)``. Only the video latents are noised; the condition latents
stay clean, share the sample's timestep, and the loss covers the video frames only (the model returns the
video prediction only). Text encoder and VAE are frozen; the DiT is fully fine-tuned.

One code path for one GPU, DDP and FSDP: ``accelerate launch`` with an accelerate config chooses; the data
pipeline splits shards by rank itself. Checkpoints hold accelerate's full state (weights as safetensors,
optimizer, scheduler, every RNG) plus the number of batches consumed, and resuming replays the run exactly:
the data stream skips the consumed batches and the RNGs continue where they stopped.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed

from lumosx_model.components import TRANSFORMER_CONFIG, FrozenEncoders, load_encoders, load_transformer
from lumosx_model.conditions import encode_conditions
from lumosx_model.config import TrainConfig
from lumosx_model.data import Batch, LatentCache, build_pipeline, make_loader

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"


def shifted_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Map uniform ``u`` in [0, 1] to σ with the flow shift (``shift > 1`` favours high noise levels)."""
    return shift * u / (1 + (shift - 1) * u)


@dataclass
class ModelInputs:
    """Everything the transformer needs besides the noisy latents; built once per batch."""

    latents: torch.Tensor  # clean video latents x0 [B, z, T, h, w]
    text_embeds: torch.Tensor  # [B, L, D]
    cond_latents: torch.Tensor  # [B, Nmax, z, h, w], zero padding
    layouts: list
    mcam_templates: torch.Tensor


def encode_batch(encoders: FrozenEncoders, batch: Batch, device: torch.device) -> ModelInputs:
    """Run the frozen encoders on what the cache did not provide."""
    batch = batch.to(device)
    latents = batch.video_latents if batch.video_latents is not None else encoders.encode_video(batch.video)
    text = (
        batch.text_embeds
        if batch.text_embeds is not None
        else encoders.encode_text(batch.input_ids, batch.attention_mask)
    )
    cond = encode_conditions(encoders, batch.cond_pixels, batch.cond_counts)
    return ModelInputs(latents.float(), text, cond.float(), batch.layouts, batch.mcam_templates)


def flow_matching_loss(
    model, inputs: ModelInputs, relational, *, shift: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Rectified-flow MSE on the video latents of one batch (noise and σ from ``generator`` or global RNG)."""
    x0 = inputs.latents
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    sigma = shifted_sigmas(torch.rand((b,), generator=generator, device=x0.device), shift)
    s = sigma.view(b, 1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * noise
    pred = model(
        noisy,
        sigma * 1000,
        inputs.text_embeds,
        cond_latents=inputs.cond_latents,
        layouts=inputs.layouts,
        mcam_templates=inputs.mcam_templates,
        relational=relational,
    )
    return F.mse_loss(pred.float(), (noise - x0).float())


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    batches_consumed: int = 0  # batches drawn from this rank's stream (the resume skip)


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    root = Path(output_dir) / CHECKPOINTS
    done = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()] if root.is_dir() else []
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


class Trainer:
    """Builds models, data and optimizer from a :class:`TrainConfig`; runs, checkpoints, resumes training."""

    def __init__(self, cfg: TrainConfig, *, accelerator: Accelerator | None = None) -> None:
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.accelerator = accelerator or Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.grad_accum,
            log_with="tensorboard",
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
        )
        acc = self.accelerator
        set_seed(cfg.seed, device_specific=True)
        weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision, torch.float32)

        self.encoders = load_encoders(cfg.model, device=acc.device, dtype=weight_dtype)
        self.relational = cfg.model.relational
        model = load_transformer(
            cfg.model, torch_dtype=torch.float32
        )  # fp32 master weights; autocast does bf16
        if cfg.model.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        self._transformer_config = dict(model.config)

        o = cfg.optim
        fsdp = acc.distributed_type == DistributedType.FSDP
        if fsdp:  # FSDP flattens/shards parameters: wrap first, then build the optimizer on the wrapped ones
            model = acc.prepare(model)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps
        )
        # The prepared scheduler steps once per process per optimizer step, hence the scaling (as diffusers).
        warmup = o.warmup_steps * acc.num_processes
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup)))
        if fsdp:
            self.model = model
            self.optimizer, self.scheduler = acc.prepare(optimizer, scheduler)
        else:
            self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        self.state = TrainerState()

        resume = self._resume_dir()
        if resume is not None:
            self.state = TrainerState(**json.loads((resume / STATE_FILE).read_text()))
            acc.load_state(str(resume))
            log.info("resumed from %s at step %d", resume, self.state.step)

        cache = None
        if cfg.data.cache_dir is not None:
            cache = LatentCache(
                cfg.data.cache_dir,
                encoder_fingerprint=self.encoders.fingerprint,
                num_frames=cfg.data.num_frames,
                fps=cfg.data.fps,
                temporal_crop=cfg.data.temporal_crop,
            )
        # Each rank has its own seeded stream (split_by_node); the seed is shared so epochs permute alike.
        pipeline = build_pipeline(
            cfg.data,
            self.encoders.prompt_tokenizer,
            seed=cfg.seed,
            cache=cache,
            skip_batches=self.state.batches_consumed,
        )
        self.loader = make_loader(pipeline, cfg.data.num_workers, seed=cfg.seed)
        self._batches: Iterator[Batch] | None = None

        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            cfg.to_yaml(self.output_dir / "config.yaml")
            acc.init_trackers(
                cfg.stage,
                config={
                    "lr": o.lr,
                    "batch_size": cfg.data.batch_size,
                    "grad_accum": cfg.grad_accum,
                    "num_frames": cfg.data.num_frames,
                    "sigma_shift": cfg.sigma_shift,
                    "seed": cfg.seed,
                    "r2pe": cfg.model.relational.r2pe,
                    "csam": cfg.model.relational.csam,
                    "mcam": cfg.model.relational.mcam,
                    "mcam_ratio": cfg.model.relational.mcam_ratio,
                    "max_persons": cfg.data.max_persons if cfg.data.max_persons is not None else -1,
                },
            )

    def _resume_dir(self) -> Path | None:
        if self.cfg.resume_from is None:
            return None
        if self.cfg.resume_from == "latest":
            return find_latest_checkpoint(self.output_dir)
        path = Path(self.cfg.resume_from)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a training checkpoint (no {STATE_FILE})")
        return path

    # ------------------------------------------------------------------------------------------ steps
    def next_batch(self) -> Batch:
        if self._batches is None:
            self._batches = iter(self.loader)
        self.state.batches_consumed += 1
        return next(self._batches)

    def train_step(self) -> float:
        """One optimizer step (``grad_accum`` micro-batches); returns the mean loss over all processes."""
        acc = self.accelerator
        total = torch.zeros((), device=acc.device)
        for _ in range(self.cfg.grad_accum):
            inputs = encode_batch(self.encoders, self.next_batch(), acc.device)
            # The prepared model runs its forward under autocast when mixed precision is on.
            with acc.accumulate(self.model):
                loss = flow_matching_loss(self.model, inputs, self.relational, shift=self.cfg.sigma_shift)
                acc.backward(loss)
                if acc.sync_gradients and self.cfg.optim.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            total += loss.detach() / self.cfg.grad_accum
        self.state.step += 1
        return acc.gather(total.reshape(1)).mean().item()

    @torch.no_grad()
    def evaluate(self, batch: Batch, *, seed: int = 0) -> float:
        """Loss on ``batch`` with fixed noise and σ (comparable across steps; the model's mode is kept)."""
        acc = self.accelerator
        inputs = encode_batch(self.encoders, batch, acc.device)
        generator = torch.Generator(device=acc.device).manual_seed(seed)
        return flow_matching_loss(
            self.model, inputs, self.relational, shift=self.cfg.sigma_shift, generator=generator
        ).item()

    def fit(self, max_steps: int | None = None) -> list[float]:
        """Train until ``max_steps`` (default ``cfg.max_steps``); returns the losses of the steps run here."""
        cfg, acc = self.cfg, self.accelerator
        max_steps = cfg.max_steps if max_steps is None else max_steps
        losses = []
        while self.state.step < max_steps:
            loss = self.train_step()
            losses.append(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {self.state.step}")
            if self.state.step % cfg.log_every == 0 or self.state.step == max_steps:
                acc.log(
                    {"train/loss": loss, "train/lr": self.scheduler.get_last_lr()[0]}, step=self.state.step
                )
                log.info("step %d loss %.4f", self.state.step, loss)
            if self.state.step % cfg.checkpoint_every == 0 or self.state.step == max_steps:
                self.save_checkpoint()
        if self.state.step >= cfg.max_steps:
            self.export(self.output_dir / "transformer")
        acc.wait_for_everyone()
        return losses

    # ------------------------------------------------------------------------------------------ saving
    def save_checkpoint(self) -> Path:
        """``<output>/checkpoints/step-N``: accelerate state + trainer state; older ones pruned."""
        acc = self.accelerator
        path = self.output_dir / CHECKPOINTS / f"step-{self.state.step:07d}"
        acc.save_state(str(path))  # weights (safetensors), optimizer, scheduler, RNG states of every process
        if acc.is_main_process:
            (path / TRANSFORMER_CONFIG).write_text(json.dumps(self._transformer_config, default=list))
            # Written last: a checkpoint without it is incomplete and ignored by resume.
            (path / STATE_FILE).write_text(json.dumps(asdict(self.state)))
            done = sorted(
                (p for p in path.parent.glob("step-*") if (p / STATE_FILE).is_file()),
                key=lambda p: int(p.name.split("-")[1]),
            )
            for old in done[: max(0, len(done) - self.cfg.keep_checkpoints)]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return path

    def export(self, path: Path) -> None:
        """The trained transformer in diffusers format (loadable by from_pretrained and Wan pipelines)."""
        acc = self.accelerator
        state_dict = acc.get_state_dict(self.model)  # gathers FSDP shards
        if acc.is_main_process:
            acc.unwrap_model(self.model).save_pretrained(
                str(path), state_dict=state_dict, safe_serialization=True
            )

    def close(self) -> None:
        self.accelerator.end_training()


def train(cfg: TrainConfig) -> list[float]:
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.close()
