"""R2PE: relational 3D rotary positions of video and condition tokens, gathered from Wan's RoPE tables."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from .layout import SampleLayout


def _grid(t: int | torch.Tensor, h: int, w: int, h_shift: int = 0, w_shift: int = 0) -> torch.Tensor:
    """(t, h + h_shift, w + w_shift) for every token of one H×W frame, row-major like Wan's patch flatten."""
    hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    tt = torch.full_like(hh, int(t))
    return torch.stack([tt, hh + h_shift, ww + w_shift], dim=-1).reshape(-1, 3)


def r2pe_positions(
    layout: SampleLayout, video_grid: tuple[int, int, int], *, r2pe: bool = True
) -> torch.Tensor:
    """(t, h, w) rotary position of every token of one sample: video first, then each condition in order.

    R2PE (SPEC §2): background/object ``k`` sits at time ``T + k``; every image of subject group ``g`` shares
    time ``T + N_bo + g`` and image ``n`` of the group is shifted by ``(n·H', n·W')`` so a face and its
    attributes are neighbours in time yet distinct in space. With ``r2pe=False`` condition ``i`` gets time
    ``T + i`` and unshifted spatial indices.

    Returns:
        LongTensor ``[T·H'·W' + N·H'·W', 3]``.
    """
    t, h, w = video_grid
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    parts = [torch.stack([tt, hh, ww], dim=-1).reshape(-1, 3)]
    n_in_group = 0
    for i, cond in enumerate(layout.conditions):
        if not r2pe:
            parts.append(_grid(t + i, h, w))
        elif cond.kind in ("background", "object"):
            parts.append(_grid(t + i, h, w))  # background/objects come first, so i == k
        else:
            n_in_group = 0 if cond.kind == "face" else n_in_group + 1
            parts.append(_grid(t + layout.num_bo + cond.group, h, w, n_in_group * h, n_in_group * w))
    return torch.cat(parts).long()


def batch_positions(
    layouts: Sequence[SampleLayout], video_grid: tuple[int, int, int], num_slots: int, *, r2pe: bool = True
) -> torch.Tensor:
    """Positions of a batch whose samples are padded to ``num_slots`` condition slots: ``[B, L, 3]``.

    Padding slot ``j`` gets the unshifted frame at time ``T + j``: any in-range value works because a padding
    token only attends to itself (see :func:`lumosx_model.masks.csam_dense`).
    """
    t, h, w = video_grid
    out = []
    for layout in layouts:
        if len(layout) > num_slots:
            raise ValueError(f"a layout has {len(layout)} conditions but only {num_slots} slots were given")
        pad = [_grid(t + j, h, w) for j in range(len(layout), num_slots)]
        out.append(torch.cat([r2pe_positions(layout, video_grid, r2pe=r2pe), *pad]))
    return torch.stack(out)


def gather_rotary(rope: WanRotaryPosEmbed, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's rotary (cos, sin) at arbitrary integer ``positions`` ``[..., L, 3]``.

    Uses the module's own tables (split t/h/w like :meth:`WanRotaryPosEmbed.forward`), so gathering at the
    video grid reproduces the built-in embedding bit for bit. Returns tensors shaped ``[B, L, 1, D]``
    (``B = 1`` for an unbatched ``[L, 3]`` input), which broadcast over heads in Wan's attention processor.

    Raises:
        ValueError: a position is negative or beyond the tables (``rope_max_seq_len``).
    """
    if positions.ndim == 2:
        positions = positions[None]
    if positions.shape[-1] != 3:
        raise ValueError(
            f"positions must end with a (t, h, w) axis of size 3, got shape {tuple(positions.shape)}"
        )
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= rope.max_seq_len):
        raise ValueError(
            f"rotary positions must lie in [0, {rope.max_seq_len}); got max {int(positions.max())}. "
            "Raise rope_max_seq_len or use fewer/smaller conditions."
        )
    positions = positions.to(rope.freqs_cos.device)
    split = [rope.t_dim, rope.h_dim, rope.w_dim]
    out = []
    for table in (rope.freqs_cos, rope.freqs_sin):
        axes = table.split(split, dim=1)
        gathered = torch.cat([axes[a][positions[..., a]] for a in range(3)], dim=-1)
        out.append(gathered.unsqueeze(-2))
    return out[0], out[1]
