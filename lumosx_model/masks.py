"""CSAM (which tokens a self-attention query may see) and MCAM (numeric bias on the text cross-attention).

Both are derived from :class:`~lumosx_model.layout.SampleLayout`, per sample, so a batch may mix samples with
different conditions (the released LumosX code assumes one layout per GPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .layout import SampleLayout

VIDEO = -1
"""Segment id of video tokens in :func:`token_segments`."""
PAD = -2
"""Segment id of padding tokens (empty condition slots, or tail padding up to ``seq_len``)."""


# ---------------------------------------------------------------------------------------------------- CSAM


def token_segments(
    layouts: Sequence[SampleLayout], video_grid: tuple[int, int, int], seq_len: int | None = None
) -> torch.Tensor:
    """Segment id of every token: :data:`VIDEO`, :data:`PAD`, or the CSAM block id (>= 0) of its condition.

    ``seq_len`` defaults to the video tokens plus as many condition frames as the largest layout has.

    Returns:
        LongTensor ``[B, seq_len]``.
    """
    t, h, w = video_grid
    num_video = t * h * w
    needed = num_video + max((len(lay) for lay in layouts), default=0) * h * w
    seq_len = needed if seq_len is None else seq_len
    if seq_len < needed:
        raise ValueError(f"seq_len={seq_len} is shorter than the {needed} tokens the largest layout needs")
    seg = torch.full((len(layouts), seq_len), PAD, dtype=torch.long)
    seg[:, :num_video] = VIDEO
    for b, layout in enumerate(layouts):
        for (start, end), block in zip(layout.token_ranges(video_grid), layout.block_ids(), strict=True):
            seg[b, start:end] = block
    return seg


def _allowed(seg_q: torch.Tensor, seg_k: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor, csam: bool):
    """The CSAM rule on broadcastable tensors (dense masks and FlexAttention ``mask_mod`` share it).

    A padding query keeps its own key so that its softmax row is never empty (no NaN); its output is
    discarded and no real token attends to it.
    """
    if csam:
        real = ((seg_q == VIDEO) & (seg_k != PAD)) | ((seg_q >= 0) & (seg_q == seg_k))
    else:
        real = (seg_q != PAD) & (seg_k != PAD)
    return real | (q_idx == k_idx)


def csam_dense(
    layouts: Sequence[SampleLayout],
    video_grid: tuple[int, int, int],
    seq_len: int | None = None,
    *,
    csam: bool = True,
) -> torch.Tensor:
    """Dense self-attention mask, ``True`` = may attend: ``[B, L, L]`` (query, key).

    Video queries see every video and every real condition token; a condition query sees only its own block
    (background, one object, or one whole subject group). Padding slots are seen by nobody and see only
    themselves. ``csam=False`` (ablation) lets every real token see every real token.
    """
    seg = token_segments(layouts, video_grid, seq_len)
    idx = torch.arange(seg.shape[1])
    return _allowed(seg[:, :, None], seg[:, None, :], idx[:, None], idx[None, :], csam)


def csam_block_mask(
    layouts: Sequence[SampleLayout],
    video_grid: tuple[int, int, int],
    seq_len: int,
    device: torch.device | str,
    *,
    csam: bool = True,
    block_size: int = 128,
):
    """The same mask as :func:`csam_dense` as a FlexAttention ``BlockMask`` (tiles fully masked are skipped).

    On CUDA the block mask is built with ``_compile=True`` so the ``L×L`` mask is never materialised (at Wan's
    480p/81-frame size L is ~40 k tokens).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    device = torch.device(device)
    seg = token_segments(layouts, video_grid, seq_len).to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        return _allowed(seg[b, q_idx], seg[b, kv_idx], q_idx, kv_idx, csam)

    return create_block_mask(
        mask_mod,
        len(layouts),
        None,
        seq_len,
        seq_len,
        device=device,
        BLOCK_SIZE=block_size,
        _compile=device.type == "cuda",
    )


# ---------------------------------------------------------------------------------------------------- MCAM


def word_mask(prompt_ids: Sequence[int], label_ids: Sequence[int]) -> torch.Tensor:
    """Bool mask over the prompt tokens marking every contiguous exact occurrence of ``label_ids``.

    Occurrences may overlap. A label that does not occur gives an all-``False`` mask (callers that require
    every label to be found should check ``mask.any()``).

    Raises:
        ValueError: ``label_ids`` is empty (it would match everywhere).
    """
    prompt = list(prompt_ids)
    label = list(label_ids)
    if not label:
        raise ValueError("label_ids is empty; tokenize the label without special tokens")
    mask = torch.zeros(len(prompt), dtype=torch.bool)
    n = len(label)
    for start in range(len(prompt) - n + 1):
        if prompt[start : start + n] == label:
            mask[start : start + n] = True
    return mask


def mcam_template(
    layout: SampleLayout, prompt_ids: Sequence[int], label_ids: Sequence[Sequence[int] | None]
) -> torch.Tensor:
    """MCAM template ``M``: one row per condition, one column per prompt token (SPEC §2).

    * background / object image ``c``: its own word mask;
    * every image of subject group ``g``: ``M_g = T_g − Σ_{g'≠g} T_{g'} / (G−1)`` (``M_g = T_g`` when G = 1),
      where ``T_g`` is the union of the word masks of the group's face and attribute labels.

    ``label_ids[i]`` is the tokenized label of ``layout.conditions[i]`` (no special tokens), ``None`` for an
    unlabeled condition, which contributes nothing and gets a zero row when it is a background/object.

    Returns:
        FloatTensor ``[len(layout), len(prompt_ids)]`` with values in {1, 0, −1/(G−1), ...}.
    """
    if len(label_ids) != len(layout):
        raise ValueError(f"got {len(label_ids)} label token lists for a layout of {len(layout)} conditions")
    n_txt = len(prompt_ids)
    masks = [
        torch.zeros(n_txt, dtype=torch.bool) if ids is None else word_mask(prompt_ids, ids)
        for ids in label_ids
    ]
    groups = layout.num_groups
    union = torch.zeros(groups, n_txt, dtype=torch.bool)
    for cond, m in zip(layout.conditions, masks, strict=True):
        if cond.group >= 0:
            union[cond.group] |= m
    union_f = union.float()
    if groups >= 2:
        others = (union_f.sum(0, keepdim=True) - union_f) / (groups - 1)
        group_rows = union_f - others
    else:
        group_rows = union_f
    rows = [
        group_rows[c.group] if c.group >= 0 else m.float()
        for c, m in zip(layout.conditions, masks, strict=True)
    ]
    return torch.stack(rows) if rows else torch.zeros(0, n_txt)


def pad_templates(templates: Sequence[torch.Tensor], num_slots: int, text_len: int) -> torch.Tensor:
    """Stack per-sample templates ``[N_b, len(prompt_b)]`` into zero-padded ``[B, num_slots, text_len]``.

    ``text_len`` is the length of the text-encoder sequence the model sees (512 for Wan's UMT5 context);
    prompt tokens beyond it are cut, as the text encoder cuts them.
    """
    out = torch.zeros(len(templates), num_slots, text_len)
    for b, tmpl in enumerate(templates):
        if tmpl.shape[0] > num_slots:
            raise ValueError(f"sample {b} has {tmpl.shape[0]} template rows but only {num_slots} slots")
        n = min(tmpl.shape[1], text_len)
        out[b, : tmpl.shape[0], :n] = tmpl[:, :n]
    return out


def mcam_bias_paper(
    q: torch.Tensor,
    k_text: torch.Tensor,
    templates: torch.Tensor,
    grid_hw: tuple[int, int],
    *,
    ratio: float,
    pool: int = 8,
) -> torch.Tensor:
    """The paper's MCAM bias ``r·|s̃|·M`` with correct tile pooling (``mcam_mode="paper"``).

    ``s̃`` approximates the logit ``q·k/√d`` of each condition token by that of the mean query of its
    ``pool×pool`` tile of the condition's H'×W' latent (partial tiles at the border average their *valid*
    tokens only), broadcast back to every token of the tile. Since the logit is linear in ``q`` this equals the
    tile mean of the exact logits, at 1/pool² of the cost. This is the paper's method done right; the released
    code's arithmetic differs on grids that are not multiples of ``pool`` (see :func:`mcam_bias_release`).

    Args:
        q: condition queries ``[B, N·H'·W', heads, d]`` (after q-norm, as the attention sees them).
        k_text: text keys ``[B, L_txt, heads, d]``.
        templates: MCAM templates ``[B, N, L_txt]`` (zero rows for padding / unlabeled conditions).
        grid_hw: (H', W') of one condition frame.

    Returns:
        Float bias ``[B, heads, N·H'·W', L_txt]`` in ``q.dtype``, ready for SDPA's ``attn_mask``.
    """
    return _mcam_bias_pooled(q, k_text, templates, grid_hw, ratio=ratio, pool=pool, release=False)


def mcam_bias_release(
    q: torch.Tensor,
    k_text: torch.Tensor,
    templates: torch.Tensor,
    grid_hw: tuple[int, int],
    *,
    ratio: float,
    pool: int = 8,
) -> torch.Tensor:
    """The released LumosX code's MCAM bias, bit for bit in its arithmetic (``mcam_mode="release"``).

    Two differences from :func:`mcam_bias_paper`, both only when H' or W' is not a multiple of ``pool``:

    * **padding counts in the mean**: the H'×W' grid is zero-padded to multiples of ``pool`` and every tile is
      averaged over all ``pool²`` entries, so a border tile's mean is shrunk towards 0;
    * **crop after flatten**: the upsampled ``[H'_pad, W'_pad]`` bias is flattened row-major and its first
      H'·W' entries are kept, so token ``i`` (``i = y·W' + x``) takes the value of padded position
      ``(i // W'_pad, i % W'_pad)``, a tile shifted away from its own whenever ``W' != W'_pad``.

    Weights trained with the released code saw this arithmetic, so use this mode to run or fine-tune them
    faithfully. Unlike the released code it is computed per sample (the release mixes samples when B > 1).
    Arguments and result as :func:`mcam_bias_paper`; on grids that are multiples of ``pool`` both are equal.
    """
    return _mcam_bias_pooled(q, k_text, templates, grid_hw, ratio=ratio, pool=pool, release=True)


def _mcam_bias_pooled(
    q: torch.Tensor,
    k_text: torch.Tensor,
    templates: torch.Tensor,
    grid_hw: tuple[int, int],
    *,
    ratio: float,
    pool: int,
    release: bool,
) -> torch.Tensor:
    bsz, lq, heads, dim = q.shape
    hh, ww = grid_hw
    n = templates.shape[1]
    if lq != n * hh * ww:
        raise ValueError(f"q has {lq} rows, expected {n} conditions × {hh}×{ww} tokens")
    hp, wp = math.ceil(hh / pool) * pool, math.ceil(ww / pool) * pool
    x = q.reshape(bsz * n, hh, ww, heads * dim).permute(0, 3, 1, 2)
    x = F.pad(x, (0, wp - ww, 0, hp - hh))
    tiles = F.avg_pool2d(x, pool)  # zero padding included: mean over all pool² entries
    if not release:  # rescale to the mean over the valid tokens of each tile
        count = F.pad(q.new_ones(1, 1, hh, ww), (0, wp - ww, 0, hp - hh))
        tiles = tiles / F.avg_pool2d(count, pool)
    tiles_w = wp // pool
    tiles = tiles.reshape(bsz, n, heads, dim, (hp // pool) * tiles_w)
    s = torch.einsum("bnhdt,bkhd->bhntk", tiles, k_text) / math.sqrt(dim)
    # The tile every token reads its |s| from (nearest upsampling back to the token grid).
    flat = torch.arange(hh * ww, device=q.device)
    if release:  # position in the padded grid of the token's index in the flattened, cropped sequence
        row, col = flat // wp, flat % wp
    else:  # the token's own position
        row, col = flat // ww, flat % ww
    s = s[:, :, :, (row // pool) * tiles_w + col // pool]  # [B, heads, N, H'·W', L_txt]
    bias = ratio * s.abs() * templates.to(s.dtype)[:, None, :, None, :]
    return bias.reshape(bsz, heads, lq, -1).to(q.dtype)
