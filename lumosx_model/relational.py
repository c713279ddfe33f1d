"""Switches of the relational attention (R2PE, CSAM, MCAM) — the paper's ablation axes plus kernel choice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

MCAMMode = Literal["paper", "release", "exact"]
MCAM_MODES: tuple[str, ...] = ("paper", "release", "exact")


@dataclass
class RelationalConfig:
    """How the relational Wan transformer treats condition tokens (SPEC §2).

    Attributes:
        r2pe: relational rotary positions; ``False`` gives every condition image its own consecutive time
            index with unshifted spatial indices (the paper's "no R2PE" ablation).
        csam: causal self-attention mask (conditions see only their own block); ``False`` lets every real
            token attend to every real token (padding slots stay excluded).
        mcam: cross-attention bias ``r·|s|·M`` on the text logits of condition rows.
        mcam_ratio: ``r`` (the paper's best is 0.5).
        mcam_mode: ``"paper"`` approximates ``s`` from ``mcam_pool``×``mcam_pool`` average-pooled condition
            queries (the paper's method, border tiles averaged over their valid tokens); ``"release"`` is the
            same approximation with the released code's arithmetic (zero padding counted in the tile mean,
            crop after flatten), bit-compatible with the released weights' training code for single samples;
            ``"exact"`` uses the exact logit of every query/text-key pair (no pooling).
        mcam_pool: pooling window of the paper / release approximation, in latent tokens.
        backend: ``"dense"`` (SDPA with an explicit bool mask / float bias; differentiable everywhere),
            ``"flex"`` (FlexAttention block mask + score_mod; fused and sparse on CUDA, but its backward
            raises on CPU) or ``"auto"`` (flex on CUDA, dense elsewhere).
    """

    r2pe: bool = True
    csam: bool = True
    mcam: bool = True
    mcam_ratio: float = 0.5
    mcam_mode: MCAMMode = "paper"
    mcam_pool: int = 8
    backend: Literal["auto", "dense", "flex"] = "auto"

    def __post_init__(self) -> None:
        if self.mcam_mode not in MCAM_MODES:
            raise ValueError(f"mcam_mode must be one of {MCAM_MODES}, got {self.mcam_mode!r}")
        if self.backend not in ("auto", "dense", "flex"):
            raise ValueError(f"backend must be 'auto', 'dense' or 'flex', got {self.backend!r}")
        if self.mcam_pool < 1:
            raise ValueError(f"mcam_pool must be >= 1, got {self.mcam_pool}")

    def resolve_backend(self, device: torch.device) -> Literal["dense", "flex"]:
        """The kernel family actually used on ``device``."""
        if self.backend == "auto":
            return "flex" if torch.device(device).type == "cuda" else "dense"
        return self.backend
