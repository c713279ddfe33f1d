"""Wan2.1 DiT with LumosX relational attention (R2PE + CSAM + MCAM), weight-compatible with diffusers.

No parameter is added: condition images are patch-embedded by the video's own patch embedding and appended to
the sequence; only positions and attention change (SPEC §2). The state dict therefore matches
:class:`diffusers.WanTransformer3DModel` key for key, and real Wan2.1 checkpoints load unchanged::

    model = RelationalWanTransformer.from_pretrained(
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", subfolder="transformer", torch_dtype=torch.bfloat16)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils import apply_lora_scale

from .attention import RelationalAttnProcessor, RelationalContext, relational_context
from .layout import SampleLayout
from .masks import csam_block_mask, csam_dense
from .positions import batch_positions, gather_rotary
from .relational import RelationalConfig


def _run_block(block: torch.nn.Module, ctx: RelationalContext, *args: torch.Tensor) -> torch.Tensor:
    # A free function taking ctx as an argument, so gradient checkpointing re-activates the context when it
    # recomputes the block during backward (the forward's `with` has exited by then).
    with relational_context(ctx):
        return block(*args)


class RelationalWanTransformer(WanTransformer3DModel):
    """:class:`WanTransformer3DModel` that also attends to clean condition latents with relational attention.

    Every attention uses :class:`~lumosx_model.attention.RelationalAttnProcessor` (replacing it with
    ``set_attn_processor`` disables the relational part). Without ``cond_latents`` the model computes exactly
    what :class:`WanTransformer3DModel` computes.
    """

    # Same signature as the parent (``wraps`` exposes it), so diffusers' config machinery sees every argument.
    @functools.wraps(WanTransformer3DModel.__init__)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.set_attn_processor(RelationalAttnProcessor())

    @staticmethod
    def full_config() -> dict[str, Any]:
        """Config of Wan2.1-T2V-1.3B (the LumosX backbone)."""
        return dict(
            patch_size=(1, 2, 2),
            num_attention_heads=12,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=8960,
            num_layers=30,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            rope_max_seq_len=1024,
        )

    @staticmethod
    def tiny_config() -> dict[str, Any]:
        """A ~130k-parameter config of the same architecture for tests (head dim 32 splits 12/10/10)."""
        return {
            **RelationalWanTransformer.full_config(),
            "num_attention_heads": 2,
            "attention_head_dim": 32,
            "text_dim": 32,
            "freq_dim": 32,
            "ffn_dim": 64,
            "num_layers": 2,
        }

    @apply_lora_scale("attention_kwargs")  # PEFT LoRA ``scale`` works on both paths, as in the parent
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *,
        cond_latents: torch.Tensor | None = None,
        layouts: Sequence[SampleLayout] | None = None,
        mcam_templates: torch.Tensor | None = None,
        relational: RelationalConfig | None = None,
        return_dict: bool = False,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor | Transformer2DModelOutput:
        """Predict the flow velocity of the video latents, attending to the condition latents.

        Args:
            hidden_states: noisy video latents ``[B, C, T, H, W]``.
            timestep: ``[B]`` (condition tokens are clean but share the video's timestep, as in the paper).
            encoder_hidden_states: text embeddings ``[B, L_txt, text_dim]``.
            cond_latents: clean condition latents ``[B, N, C, H, W]`` (one latent frame each, same H×W as the
                video); slots beyond a sample's own conditions are padding (their content is ignored).
            layouts: one :class:`SampleLayout` per sample, ``len(layout) <= N``.
            mcam_templates: ``[B, N, L_txt]`` float MCAM templates (see
                :func:`~lumosx_model.masks.mcam_template` and :func:`~lumosx_model.masks.pad_templates`);
                required when ``relational.mcam`` is on.
            relational: switches; default :class:`RelationalConfig()`.
            return_dict: ``True`` wraps the result in ``Transformer2DModelOutput``.
            attention_kwargs: as in diffusers; only its LoRA ``scale`` is used on the relational path.

        Returns:
            The prediction for the video tokens only, ``[B, C_out, T, H, W]`` (a tensor, not a tuple, when
            ``return_dict`` is False).
        """
        if cond_latents is None:
            kwargs = dict(return_dict=False, attention_kwargs=attention_kwargs)
            out = super().forward(hidden_states, timestep, encoder_hidden_states, **kwargs)[0]
            return Transformer2DModelOutput(sample=out) if return_dict else out

        cfg = relational or RelationalConfig()
        bsz, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        grid = (frames // p_t, height // p_h, width // p_w)
        self._check_inputs(
            hidden_states, timestep, cond_latents, layouts, mcam_templates, encoder_hidden_states, cfg
        )
        num_slots = cond_latents.shape[1]
        num_video = math.prod(grid)
        seq_len = num_video + num_slots * grid[1] * grid[2]
        device = hidden_states.device

        # 1. Tokens: video, then every condition frame through the same patch embedding.
        video = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2)
        cond = cond_latents.flatten(0, 1).unsqueeze(2).to(hidden_states.dtype)  # [B*N, C, 1, H, W]
        cond = self.patch_embedding(cond).flatten(2).transpose(1, 2).reshape(bsz, -1, video.shape[-1])
        tokens = torch.cat([video, cond], dim=1).contiguous()

        # 2. R2PE rotary from Wan's own tables.
        positions = batch_positions(layouts, grid, num_slots, r2pe=cfg.r2pe)
        rotary_emb = gather_rotary(self.rope, positions.to(device))

        # 3. Masks and templates for the attention processors.
        backend = cfg.resolve_backend(device)
        if backend == "flex":
            self_mask = csam_block_mask(layouts, grid, seq_len, device, csam=cfg.csam)
        else:
            self_mask = csam_dense(layouts, grid, seq_len, csam=cfg.csam)[:, None].to(device)
        templates = None
        if cfg.mcam:
            templates = mcam_templates.to(device=device, dtype=torch.float32).clone()
            for b, layout in enumerate(layouts):
                templates[b, len(layout) :] = 0  # padding slots must never be biased
        ctx = RelationalContext(
            num_video_tokens=num_video,
            grid_hw=grid[1:],
            backend=backend,
            self_mask=self_mask,
            templates=templates,
            mcam_ratio=cfg.mcam_ratio,
            mcam_mode=cfg.mcam_mode,
            mcam_pool=cfg.mcam_pool,
        )

        # 4. Time and text embeddings: one timestep per sample, shared by video and condition tokens.
        temb, timestep_proj, encoder_hidden_states, _ = self.condition_embedder(
            timestep, encoder_hidden_states, None
        )
        timestep_proj = timestep_proj.unflatten(1, (6, -1))

        # 5. Blocks.
        for block in self.blocks:
            args = (tokens, encoder_hidden_states, timestep_proj, rotary_emb)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = self._gradient_checkpointing_func(_run_block, block, ctx, *args)
            else:
                tokens = _run_block(block, ctx, *args)

        # 6. Output head on the video tokens only (condition tokens carry no loss), unpatchify like Wan.
        tokens = tokens[:, :num_video]
        shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        tokens = (self.norm_out(tokens.float()) * (1 + scale.to(device)) + shift.to(device)).type_as(tokens)
        tokens = self.proj_out(tokens)
        tokens = tokens.reshape(bsz, *grid, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = tokens.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return Transformer2DModelOutput(sample=out) if return_dict else out

    def _check_inputs(
        self, hidden_states, timestep, cond_latents, layouts, mcam_templates, text, cfg
    ) -> None:
        bsz, channels, _, height, width = hidden_states.shape
        if self.config.patch_size[0] != 1:
            raise ValueError("condition frames need a temporal patch size of 1 (Wan2.1 uses (1, 2, 2))")
        if (
            cond_latents.ndim != 5
            or cond_latents.shape[0] != bsz
            or cond_latents.shape[2:] != (channels, height, width)
        ):
            raise ValueError(
                f"cond_latents must be [B={bsz}, N, C={channels}, H={height}, W={width}], "
                f"got {tuple(cond_latents.shape)}"
            )
        if timestep.ndim != 1:
            raise ValueError("relational attention needs one timestep per sample (timestep of shape [B])")
        if layouts is None or len(layouts) != bsz:
            raise ValueError(f"layouts must hold one SampleLayout per sample ({bsz})")
        for b, layout in enumerate(layouts):
            if not isinstance(layout, SampleLayout):
                raise TypeError(f"layouts[{b}] must be a SampleLayout, got {type(layout).__name__}")
            if len(layout) > cond_latents.shape[1]:
                raise ValueError(
                    f"sample {b} has {len(layout)} conditions but cond_latents has {cond_latents.shape[1]}"
                )
        if cfg.mcam:
            expected = (bsz, cond_latents.shape[1], text.shape[1])
            if mcam_templates is None:
                raise ValueError(
                    "mcam_templates are required when relational.mcam is on (or pass mcam=False)"
                )
            if tuple(mcam_templates.shape) != expected:
                raise ValueError(
                    f"mcam_templates must be [B, N, L_txt] = {expected}, got {tuple(mcam_templates.shape)}"
                )
