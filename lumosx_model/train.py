"""Rectified-flow training of the relational Wan2.1 transformer on curated shards, with accelerate.

Objective (SPEC §2): ``x_t = (1 − σ) x0 + σ ε``, target ``v = ε − x0``, model timestep ``1000 σ``; σ is drawn
uniform then shifted, ``σ = s·u / (1 + (s − 1)·u)``. Only the video latents are noised; the condition latents
stay clean, share the sample's timestep, and the loss covers the video frames only (the model returns the
video prediction only). Text encoder and VAE are frozen; the DiT is fully fine-tuned.

One code path for one GPU, DDP and FSDP: ``accelerate launch`` with an accelerate config chooses; the data
pipeline splits shards by rank itself. Checkpoints hold accelerate's full state (weights as safetensors,
optimizer, scheduler, every RNG) plus the number of batches consumed, and resuming replays the run exactly:
the data stream skips the consumed batches and the RNGs continue where they stopped. With ``ema.enabled`` the
checkpoint also holds the EMA weights (``ema.safetensors`` + ``ema.json``), so a resumed run averages exactly as
an uninterrupted one.

Ergonomics as in diffusers' example trainers: LR schedule by name (``get_scheduler``), EMA (``EMAModel``), loss /
LR / steps/s / samples/s / ETA logged on the main process (accelerate's logger) and to the tracker (TensorBoard or
Weights & Biases), and validation videos every N steps from a fixed list of official case folders.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed

from lumosx_model.components import TRANSFORMER_CONFIG, FrozenEncoders, load_encoders, load_transformer
from lumosx_model.conditions import encode_conditions
from lumosx_model.config import TrainConfig
from lumosx_model.data import Batch, LatentCache, build_pipeline, make_loader

log = get_logger(__name__)  # logs on the main process only (unless main_process_only=False)

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
EMA_WEIGHTS = "ema.safetensors"
EMA_STATE = "ema.json"


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


def _tensorboard_gif(writer, tag: str, frames: torch.Tensor, step: int, fps: float) -> None:
    """An animated GIF image summary, which TensorBoard's image tab plays: what ``add_video`` writes, without
    the moviepy dependency it needs to encode one. Falls back to the first / middle / last frames."""
    import io

    from PIL import Image

    array = frames.numpy()  # uint8 [F, H, W, 3]
    try:
        from tensorboard.compat.proto.summary_pb2 import Summary

        images = [Image.fromarray(f) for f in array]
        buf = io.BytesIO()
        images[0].save(
            buf, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0
        )
        image = Summary.Image(
            height=array.shape[1], width=array.shape[2], colorspace=3, encoded_image_string=buf.getvalue()
        )
        writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
    except (ImportError, AttributeError):  # internals moved: still log something viewable
        picks = sorted({0, len(array) // 2, len(array) - 1})
        writer.add_images(tag, array[picks], step, dataformats="NHWC")


class _Autocast(torch.nn.Module):
    """Runs the wrapped transformer under ``autocast`` (mixed precision) and nothing else."""

    def __init__(self, model: torch.nn.Module, autocast) -> None:
        super().__init__()
        self.model = model
        self._autocast = autocast

    def forward(self, *args, **kwargs):
        with self._autocast():
            return self.model(*args, **kwargs)


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
        if cfg.tracker == "wandb" and importlib.util.find_spec("wandb") is None:
            raise ImportError("tracker 'wandb' needs the wandb package: pip install wandb")
        self.accelerator = accelerator or Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.grad_accum,
            log_with=None if cfg.tracker == "none" else cfg.tracker,
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
        from diffusers.optimization import get_scheduler

        scheduler = get_scheduler(
            o.scheduler,
            optimizer,
            num_warmup_steps=o.warmup_steps * acc.num_processes,
            num_training_steps=cfg.max_steps * acc.num_processes,
            num_cycles=o.num_cycles,
            power=o.power,
        )
        if fsdp:
            self.model = model
            self.optimizer, self.scheduler = acc.prepare(optimizer, scheduler)
        else:
            self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        self.state = TrainerState()
        self.weight_dtype = weight_dtype
        if (cfg.ema.enabled or cfg.validation.every) and fsdp:
            raise ValueError("ema and validation need full weights on one process: use DDP, not FSDP")
        self.ema = None
        self._ema_params = list(acc.unwrap_model(self.model).parameters())
        if cfg.ema.enabled:
            from diffusers.training_utils import EMAModel

            e = cfg.ema
            self.ema = EMAModel(
                self._ema_params,
                decay=e.decay,
                min_decay=e.min_decay,
                update_after_step=e.update_after_step,
                use_ema_warmup=e.use_ema_warmup,
                inv_gamma=e.inv_gamma,
                power=e.power,
            )

        resume = self._resume_dir()
        if resume is not None:
            self.state = TrainerState(**json.loads((resume / STATE_FILE).read_text()))
            acc.load_state(str(resume))
            if self.ema is not None:
                self._load_ema(resume)
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
                    "mcam_mode": cfg.model.relational.mcam_mode,
                    "lr_scheduler": o.scheduler,
                    "ema_decay": cfg.ema.decay if cfg.ema.enabled else 0.0,
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
        if self.ema is not None:  # one optimizer step was taken (gradients synced on the last micro-batch)
            self.ema.step(self._ema_params)
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
        samples_per_step = cfg.data.batch_size * cfg.grad_accum * acc.num_processes
        losses = []
        clock, clock_step = time.perf_counter(), self.state.step
        while self.state.step < max_steps:
            loss = self.train_step()
            losses.append(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {self.state.step}")
            step = self.state.step
            if step % cfg.log_every == 0 or step == max_steps:
                now = time.perf_counter()
                steps_per_s = (step - clock_step) / max(now - clock, 1e-9)
                eta = datetime.timedelta(seconds=round((max_steps - step) / max(steps_per_s, 1e-9)))
                lr = self.scheduler.get_last_lr()[0]
                acc.log(
                    {
                        "train/loss": loss,
                        "train/lr": lr,
                        "train/steps_per_s": steps_per_s,
                        "train/samples_per_s": steps_per_s * samples_per_step,
                    },
                    step=step,
                )
                log.info(
                    "step %d/%d loss %.4f lr %.3g | %.2f steps/s, %.2f samples/s, ETA %s",
                    step,
                    max_steps,
                    loss,
                    lr,
                    steps_per_s,
                    steps_per_s * samples_per_step,
                    eta,
                )
                clock, clock_step = now, step
            if step % cfg.checkpoint_every == 0 or step == max_steps:
                self.save_checkpoint()
            if cfg.validation.every and (step % cfg.validation.every == 0 or step == max_steps):
                started = time.perf_counter()
                self.validate()
                clock += time.perf_counter() - started  # keep validation out of the speed and ETA
        if self.state.step >= cfg.max_steps:
            with self.ema_weights(cfg.ema.export):
                self.export(self.output_dir / "transformer")
        acc.wait_for_everyone()
        return losses

    # ------------------------------------------------------------------------------------------ EMA
    @contextlib.contextmanager
    def ema_weights(self, use: bool = True) -> Iterator[None]:
        """Inside, the model holds the EMA weights (if EMA is on and ``use``); its own weights again after."""
        if self.ema is None or not use:
            yield
            return
        self.ema.store(self._ema_params)
        self.ema.copy_to(self._ema_params)
        try:
            yield
        finally:
            self.ema.restore(self._ema_params)

    def _ema_names(self) -> list[str]:
        return [name for name, _ in self.accelerator.unwrap_model(self.model).named_parameters()]

    def _save_ema(self, path: Path) -> None:
        from safetensors.torch import save_file

        state = self.ema.state_dict()
        shadow = state.pop("shadow_params")
        names = self._ema_names()
        save_file(
            {n: t.detach().contiguous().cpu() for n, t in zip(names, shadow, strict=True)}, path / EMA_WEIGHTS
        )
        (path / EMA_STATE).write_text(json.dumps(state))

    def _load_ema(self, path: Path) -> None:
        from safetensors.torch import load_file

        if not (path / EMA_WEIGHTS).is_file():
            raise FileNotFoundError(f"{path}: ema.enabled but the checkpoint has no {EMA_WEIGHTS}")
        shadow = load_file(str(path / EMA_WEIGHTS))
        state = json.loads((path / EMA_STATE).read_text())
        params = [
            shadow[n].to(p.device, p.dtype) for n, p in zip(self._ema_names(), self._ema_params, strict=True)
        ]
        self.ema.load_state_dict({**state, "shadow_params": params})

    # ------------------------------------------------------------------------------------------ validation
    def validate(self) -> list[Path]:
        """Generate the validation cases with the current weights (EMA weights if enabled) on the main process;
        write ``<output_dir>/validation/step-N/<case>.mp4`` and log frames / videos to the tracker."""
        from lumosx_model.inference import LumosXGenerator, write_mp4
        from schemas.official_case import read_case

        cfg, acc, v = self.cfg, self.accelerator, self.cfg.validation
        written: list[Path] = []
        if acc.is_main_process and v.cases:
            model = acc.unwrap_model(self.model)
            was_training = model.training
            height, width = v.height or cfg.data.buckets[0][0], v.width or cfg.data.buckets[0][1]
            out_dir = self.output_dir / "validation" / f"step-{self.state.step:07d}"
            with self.ema_weights():
                # fp32 master weights under the run's autocast; the frozen encoders keep their own dtypes
                # (the VAE decodes in fp32).
                generator = LumosXGenerator(
                    _Autocast(model, acc.autocast),
                    self.encoders,
                    self.relational,
                    device=acc.device,
                    dtype=torch.float32,
                )
                try:
                    for case_dir in v.cases:
                        name = Path(case_dir).name
                        try:
                            frames = generator.generate(
                                read_case(case_dir),
                                height=height,
                                width=width,
                                num_frames=v.num_frames or cfg.data.num_frames,
                                steps=v.steps,
                                shift=v.shift,
                                guidance_scale=v.guidance_scale,
                                negative_prompt=v.negative_prompt,
                                negative_mcam=v.negative_mcam,
                                seed=v.seed,
                            )
                        except ValueError as err:  # a malformed case is reported; the others still run
                            log.warning(
                                "validation case %s skipped: %s: %s", case_dir, type(err).__name__, err
                            )
                            continue
                        path = write_mp4(frames, out_dir / f"{name}.mp4", fps=cfg.data.fps)
                        written.append(path)
                        self._log_video(name, frames, path)
                finally:
                    model.train(was_training)
            log.info("validation at step %d: %d videos in %s", self.state.step, len(written), out_dir)
        acc.wait_for_everyone()
        return written

    def _log_video(self, name: str, frames: torch.Tensor, path: Path) -> None:
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                _tensorboard_gif(
                    tracker.writer, f"validation/{name}", frames, self.state.step, self.cfg.data.fps
                )
            elif tracker.name == "wandb":
                import wandb

                tracker.log(
                    {f"validation/{name}": wandb.Video(str(path), format="mp4")}, step=self.state.step
                )

    # ------------------------------------------------------------------------------------------ saving
    def save_checkpoint(self) -> Path:
        """``<output>/checkpoints/step-N``: accelerate state + trainer state; older ones pruned."""
        acc = self.accelerator
        path = self.output_dir / CHECKPOINTS / f"step-{self.state.step:07d}"
        acc.save_state(str(path))  # weights (safetensors), optimizer, scheduler, RNG states of every process
        if acc.is_main_process:
            (path / TRANSFORMER_CONFIG).write_text(json.dumps(self._transformer_config, default=list))
            if self.ema is not None:
                self._save_ema(path)
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
        """The trained transformer in diffusers format (loadable by from_pretrained and Wan pipelines), and with
        ``export_wan`` also in the original Wan2.1 layout in ``<output_dir>/transformer_wan/``."""
        acc = self.accelerator
        state_dict = acc.get_state_dict(self.model)  # gathers FSDP shards
        if acc.is_main_process:
            acc.unwrap_model(self.model).save_pretrained(
                str(path), state_dict=state_dict, safe_serialization=True
            )
            if self.cfg.export_wan:
                from lumosx_model.wan_original import export_original_transformer

                export_original_transformer(
                    state_dict, self.output_dir / "transformer_wan", config=self._transformer_config
                )

    def close(self) -> None:
        self.accelerator.end_training()


def train(cfg: TrainConfig) -> list[float]:
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.close()
