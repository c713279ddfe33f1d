"""Relational attention kernels and the diffusers attention processor that applies them inside Wan blocks.

diffusers' ``WanTransformerBlock`` calls its attentions with ``attention_mask=None`` hard-coded, so the CSAM
mask and the MCAM templates cannot travel as arguments. ``RelationalWanTransformer.forward`` instead
activates a :class:`RelationalContext` for the duration of each block call (a :class:`contextvars.ContextVar`:
per thread, nestable, and re-activated when gradient checkpointing recomputes the block during backward).
:class:`RelationalAttnProcessor` reads it; with no active context it is exactly diffusers'
:class:`WanAttnProcessor`.

Two kernel families, same maths (checked against each other and a loop reference in the tests):

* ``dense``: PyTorch SDPA with an explicit bool mask (self-attention) and float bias (paper / release MCAM), or an
  explicit softmax (exact-mode MCAM). Differentiable on every device; O(L²) memory for the mask.
* ``flex``: FlexAttention with a ``BlockMask`` (CSAM tiles that are fully masked are skipped) and a
  ``score_mod`` adding ``r·|s|·M`` from the exact logit inside the fused kernel. Compiled on first use; its
  backward raises on CPU, so CPU training must use ``dense``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

from .masks import mcam_bias_paper, mcam_bias_release
from .relational import MCAMMode

Backend = Literal["dense", "flex"]


@dataclass(frozen=True, eq=False)  # holds tensors: compare by identity
class RelationalContext:
    """Everything the attention processors need for one forward pass of a batch.

    Attributes:
        num_video_tokens: T'·H'·W'; condition tokens follow them.
        grid_hw: (H', W') of one condition frame.
        backend: kernel family, already resolved for the device.
        self_mask: CSAM as a bool tensor ``[B, 1, L, L]`` (dense) or a FlexAttention ``BlockMask`` (flex).
        templates: MCAM templates ``[B, N, L_txt]`` or ``None`` to leave the cross-attention unbiased.
        mcam_ratio, mcam_mode, mcam_pool: see :class:`~lumosx_model.relational.RelationalConfig`.
        flex_compiled: run FlexAttention through ``torch.compile`` (always, outside tests).
    """

    num_video_tokens: int
    grid_hw: tuple[int, int]
    backend: Backend
    self_mask: Any
    templates: torch.Tensor | None = None
    mcam_ratio: float = 0.5
    mcam_mode: MCAMMode = "paper"
    mcam_pool: int = 8
    flex_compiled: bool = True


_ACTIVE: contextvars.ContextVar[RelationalContext | None] = contextvars.ContextVar(
    "lumosx_relational_context", default=None
)


@contextlib.contextmanager
def relational_context(ctx: RelationalContext | None) -> Iterator[None]:
    """Activate ``ctx`` for the attention processors of the current thread until the block exits."""
    token = _ACTIVE.set(ctx)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def current_context() -> RelationalContext | None:
    """The active :class:`RelationalContext`, or ``None`` (plain Wan attention)."""
    return _ACTIVE.get()


_FLEX_TILE = 128


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@functools.cache
def _flex_attention(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic=False: one kernel per shape. Keep the number of condition slots fixed across batches (pad them)
    # or torch.compile recompiles per distinct sequence length.
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


# ------------------------------------------------------------------------------------------------- kernels
# All kernels take and return diffusers' [B, L, heads, d] layout.


def masked_self_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, *, backend: Backend, compiled: bool = True
) -> torch.Tensor:
    """Self-attention under the CSAM; ``mask``: bool ``[B, 1, L, L]`` (dense) or a ``BlockMask`` (flex)."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    if backend == "flex":
        out = _flex_attention(compiled)(q, k, v, block_mask=mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.device))
    return out.transpose(1, 2)


def mcam_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    templates: torch.Tensor,
    grid_hw: tuple[int, int],
    *,
    ratio: float,
    mode: MCAMMode,
    pool: int = 8,
    backend: Backend = "dense",
    compiled: bool = True,
) -> torch.Tensor:
    """Text cross-attention of condition rows with the MCAM bias added to the logits.

    ``q`` holds only condition rows ``[B, N·H'·W', heads, d]``, row ``i`` belonging to condition
    ``i // (H'·W')``; ``templates`` is ``[B, N, L_txt]``. The biased logit is ``s + r·|s̃|·M`` with ``s̃`` the
    paper's pooled approximation (``mode="paper"``, or ``"release"`` with the released code's arithmetic;
    always SDPA with a float bias, as released) or the exact logit ``s`` (``mode="exact"``: FlexAttention
    ``score_mod`` on ``backend="flex"``, explicit softmax on ``dense``).
    """
    hw = grid_hw[0] * grid_hw[1]
    if mode in ("paper", "release"):
        pooled_bias = mcam_bias_release if mode == "release" else mcam_bias_paper
        bias = pooled_bias(q, k, templates, grid_hw, ratio=ratio, pool=pool)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias
        )
        return out.transpose(1, 2)
    if mode != "exact":
        raise ValueError(f"unknown MCAM mode {mode!r}")
    templates = templates.to(device=q.device, dtype=torch.float32)
    if backend == "flex":
        # Kernels run whole tiles; zero-pad the lookup so indices of the padded tail stay in bounds.
        lq, ltxt = q.shape[1], templates.shape[-1]
        rows = math.ceil(_round_up(lq, _FLEX_TILE) / hw)
        lookup = F.pad(templates, (0, _round_up(ltxt, _FLEX_TILE) - ltxt, 0, rows - templates.shape[1]))

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + ratio * score.abs() * lookup[b, q_idx // hw, kv_idx]

        out = _flex_attention(compiled)(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod
        )
        return out.transpose(1, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    m = templates.repeat_interleave(hw, dim=1)[:, None]
    probs = (scores + ratio * scores.abs() * m).softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).to(q.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding (pairs ``(x[2i], x[2i+1])``), for tables shaped ``[B, L, 1, d]``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


# ----------------------------------------------------------------------------------------------- processor


class RelationalAttnProcessor(WanAttnProcessor):
    """Wan attention processor that applies CSAM (self-attention) and MCAM (cross-attention) when a
    :class:`RelationalContext` is active, and behaves exactly like :class:`WanAttnProcessor` otherwise.

    Video rows of the cross-attention are never biased and go through diffusers' ``dispatch_attention_fn``
    (so a configured flash backend still serves them); only condition rows take the biased path.
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        ctx = current_context()
        cross = encoder_hidden_states is not None
        if ctx is None or (cross and ctx.templates is None):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if attn.add_k_proj is not None:
            raise NotImplementedError(
                "relational attention does not support Wan I2V image-context projections"
            )
        if attention_mask is not None:
            raise ValueError("relational attention builds its own masks; attention_mask must be None")

        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        if not cross:
            if rotary_emb is not None:
                query, key = apply_rotary(query, *rotary_emb), apply_rotary(key, *rotary_emb)
            out = masked_self_attention(
                query, key, value, ctx.self_mask, backend=ctx.backend, compiled=ctx.flex_compiled
            )
        else:
            nv = ctx.num_video_tokens
            video = dispatch_attention_fn(
                query[:, :nv],
                key,
                value,
                attn_mask=None,
                dropout_p=0.0,
                is_causal=False,
                backend=self._attention_backend,
            )
            cond = mcam_cross_attention(
                query[:, nv:],
                key,
                value,
                ctx.templates,
                ctx.grid_hw,
                ratio=ctx.mcam_ratio,
                mode=ctx.mcam_mode,
                pool=ctx.mcam_pool,
                backend=ctx.backend,
                compiled=ctx.flex_compiled,
            )
            out = torch.cat([video, cond.type_as(video)], dim=1)

        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)
