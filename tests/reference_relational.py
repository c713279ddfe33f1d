"""Independent, slow, loop-based reference of LumosX relational attention, written from SPEC §2 alone.

It imports nothing from ``lumosx_model``: conditions are plain ``(kind, label, group)`` tuples in canonical
order, tokens are enumerated one by one, and attention is a per-query softmax. Tests compare the vectorised
implementation against it on random layouts.
"""

from __future__ import annotations

import math
import random

import torch

# ------------------------------------------------------------------------------------------ random layouts


def random_conditions(rng: random.Random, *, max_persons: int = 3) -> list[tuple[str, str, int]]:
    """1–max_persons persons with 0–3 attributes each, 0–3 objects, maybe a background; shuffled."""
    conds: list[tuple[str, str, int]] = []
    if rng.random() < 0.5:
        conds.append(("background", "garden", -1))
    for i in range(rng.randint(0, 3)):
        conds.append(("object", f"object{i}", -1))
    for g in range(rng.randint(1, max_persons)):
        group_id = 10 * g + rng.randint(0, 9)  # arbitrary ids: the layout renumbers them
        conds.append(("face", f"person{g}", group_id))
        for a in range(rng.randint(0, 3)):
            conds.append(("attribute", f"attr{g}_{a}", group_id))
    rng.shuffle(conds)
    return conds


# ------------------------------------------------------------------------------------------------- R2PE


def ref_positions(conds, T: int, H: int, W: int, r2pe: bool = True) -> list[tuple[int, int, int]]:
    """(t, h, w) of every token, conditions given in canonical order with groups numbered 0..G-1."""
    pos = [(t, h, w) for t in range(T) for h in range(H) for w in range(W)]
    n_bo = sum(1 for kind, _, _ in conds if kind in ("background", "object"))
    for i, (kind, _, group) in enumerate(conds):
        if not r2pe:
            t0, dh, dw = T + i, 0, 0
        elif kind in ("background", "object"):
            k = sum(1 for kk, _, _ in conds[:i] if kk in ("background", "object"))
            t0, dh, dw = T + k, 0, 0
        else:
            n = sum(1 for _, _, gg in conds[:i] if gg == group)  # images of this group before this one
            t0, dh, dw = T + n_bo + group, n * H, n * W
        pos += [(t0, h + dh, w + dw) for h in range(H) for w in range(W)]
    return pos


# ------------------------------------------------------------------------------------------------- CSAM


def _token_owner(conds_batch, T, H, W, seq_len):
    """Per sample, per token: "video", "pad", or a block key ("bg",) / ("obj", i) / ("grp", g)."""
    owners = []
    for conds in conds_batch:
        row = ["video"] * (T * H * W)
        for i, (kind, _, group) in enumerate(conds):
            key = ("bg",) if kind == "background" else ("obj", i) if kind == "object" else ("grp", group)
            row += [key] * (H * W)
        row += ["pad"] * (seq_len - len(row))
        owners.append(row)
    return owners


def ref_csam(conds_batch, T, H, W, seq_len, csam: bool = True) -> torch.Tensor:
    owners = _token_owner(conds_batch, T, H, W, seq_len)
    out = torch.zeros(len(conds_batch), seq_len, seq_len, dtype=torch.bool)
    for b, row in enumerate(owners):
        for q in range(seq_len):
            for k in range(seq_len):
                oq, ok = row[q], row[k]
                if q == k:
                    allowed = True  # a padded row keeps itself so its softmax is finite
                elif oq == "pad" or ok == "pad":
                    allowed = False
                elif not csam:
                    allowed = True
                elif oq == "video":
                    allowed = True  # video sees all video and all condition tokens
                else:
                    allowed = oq == ok  # a condition sees its own block only, never the video
                out[b, q, k] = allowed
    return out


# ------------------------------------------------------------------------------------------------- MCAM


def ref_word_mask(prompt, label) -> list[bool]:
    out = [False] * len(prompt)
    for s in range(len(prompt)):
        if list(prompt[s : s + len(label)]) == list(label):
            for j in range(s, s + len(label)):
                out[j] = True
    return out


def ref_template(conds, prompt, labels) -> torch.Tensor:
    """SPEC §2: group rows M_g = T_g − Σ_{g'≠g} T_g'/(G−1) (T_g if G = 1); background/object: own mask."""
    masks = [[False] * len(prompt) if lab is None else ref_word_mask(prompt, lab) for lab in labels]
    groups = sorted({g for kind, _, g in conds if kind == "face"})
    G = len(groups)

    def T(g, j):
        return 1.0 if any(masks[i][j] for i, (_, _, gg) in enumerate(conds) if gg == g) else 0.0

    out = torch.zeros(len(conds), len(prompt))
    for i, (kind, _, group) in enumerate(conds):
        for j in range(len(prompt)):
            if kind in ("background", "object"):
                out[i, j] = 1.0 if masks[i][j] else 0.0
            elif G == 1:
                out[i, j] = T(group, j)
            else:
                out[i, j] = T(group, j) - sum(T(g2, j) for g2 in groups if g2 != group) / (G - 1)
    return out


def ref_mcam_bias(q, k, templates, H, W, ratio, mode, pool=8) -> torch.Tensor:
    """Bias ``r·|s|·M`` per (b, head, condition row, text token), computed one token at a time.

    q: [B, N*H*W, heads, d] condition queries; k: [B, Ltxt, heads, d]; templates: [B, N, Ltxt].
    paper: s from the mean query of the pool×pool tile (valid tokens only) the row lies in.
    release: the grid is zero-padded to multiples of pool, tiles are averaged over all pool² entries, and the
    row at flat index i = y·W + x reads the tile of padded position (i // W_pad, i % W_pad).
    """
    B, Lq, heads, d = q.shape
    Ltxt = k.shape[1]
    out = torch.zeros(B, heads, Lq, Ltxt, dtype=torch.float64)
    qd, kd = q.double(), k.double()
    for b in range(B):
        for row in range(Lq):
            n, pix = divmod(row, H * W)
            y, x = divmod(pix, W)
            if mode == "exact":
                qrow = qd[b, row]
            elif mode == "release":
                w_pad = -(-W // pool) * pool
                py, px = divmod(pix, w_pad)
                members = [
                    n * H * W + yy * W + xx
                    for yy in range(H)
                    for xx in range(W)
                    if yy // pool == py // pool and xx // pool == px // pool
                ]
                qrow = qd[b, members].sum(0) / pool**2
            else:
                members = [
                    n * H * W + yy * W + xx
                    for yy in range(H)
                    for xx in range(W)
                    if yy // pool == y // pool and xx // pool == x // pool
                ]
                qrow = qd[b, members].mean(0)
            for h in range(heads):
                for j in range(Ltxt):
                    s = float(qrow[h] @ kd[b, j, h]) / math.sqrt(d)
                    out[b, h, row, j] = ratio * abs(s) * float(templates[b, n, j])
    return out


# -------------------------------------------------------------------------------------------- attention


def ref_attention(q, k, v, allowed=None, bias=None) -> torch.Tensor:
    """softmax(q·k/√d + bias) over allowed keys, one query row at a time. Layout [B, L, heads, d].

    allowed: [B, Lq, Lk] bool or None; bias: [B, heads, Lq, Lk] or None.
    """
    B, Lq, heads, d = q.shape
    out = torch.zeros(B, Lq, heads, v.shape[-1], dtype=torch.float64)
    qd, kd, vd = q.double(), k.double(), v.double()
    for b in range(B):
        for h in range(heads):
            for i in range(Lq):
                logits = kd[b, :, h] @ qd[b, i, h] / math.sqrt(d)
                if bias is not None:
                    logits = logits + bias[b, h, i].double()
                if allowed is not None:
                    logits = logits.masked_fill(~allowed[b, i], float("-inf"))
                out[b, i, h] = torch.softmax(logits, 0) @ vd[b, :, h]
    return out


def ref_exact_mcam_attention(q, k, v, templates, H, W, ratio) -> torch.Tensor:
    """Exact MCAM: logit s + r·|s|·M(row, token)."""
    return ref_attention(q, k, v, bias=ref_mcam_bias(q, k, templates, H, W, ratio, "exact"))
