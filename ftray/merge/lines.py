"""LiNeS (Wang et al., "LiNeS: Post-training layer scaling prevents forgetting and enhances model
merging", 2410.17146): scale each block's task vector linearly with depth.

θ = θ₀ + λ(ℓ)·Σ_t τ_t with λ(ℓ) = α + β·ℓ/(L−1) for block ℓ ∈ {0, …, L−1} (the paper's
α + β(ℓ−1)/(L−1) with 1-based ℓ). Shallow blocks stay near the base (less forgetting), deep blocks
keep their update.

Keys outside the transformer blocks — token embeddings, the final norm and lm_head — get the minimum
scale α, as every non-block key does in the authors' code (for CLIP: embeddings, ln_pre/ln_post,
proj). A key's block is parsed from its name prefix (`layers.<i>.`), never from a bare `.<i>.`,
which would also match e.g. MoE `experts.3.`.
"""

from __future__ import annotations

import re

import torch
from pydantic import Field

from ftray.merge.registry import MergeConfig, MergeMethod, register

# Llama/Mistral/Qwen `model.layers.i.`, GPT-2/Falcon `transformer.h.i.`, MPT `blocks.i.`, BERT `layer.i.`
BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


class LinesConfig(MergeConfig):
    alpha: float | None = Field(
        None, ge=0,
        description="α, the scale of the first block and of every non-block key. Default: 1/T for T ≥ 2 "
        "checkpoints (the paper's rule for task arithmetic), 0.1 for one (the paper's single-task example).",
    )
    beta: float | None = Field(
        None,
        description="β: the last block gets α+β. Default: 1−α for one checkpoint (the last block keeps its "
        "whole update, the paper's single-task rule), 0.5 for several (mid-grid; the paper tunes β on validation).",
    )


def block_index(key: str) -> int | None:
    """The transformer block a state-dict key belongs to, or None for embeddings, final norm, lm_head."""
    match = BLOCK.search(key)
    return int(match.group(1)) if match else None


@register
class Lines(MergeMethod):
    """Task arithmetic with a per-block scale growing linearly from α (first block) to α+β (last)."""

    name = "lines"
    paper = "Wang et al. 2025, LiNeS (2410.17146)"
    Config = LinesConfig

    def __init__(self, config: LinesConfig, count: int, num_layers: int) -> None:
        super().__init__(config, count, num_layers)
        self.alpha = config.alpha if config.alpha is not None else (1.0 / count if count > 1 else 0.1)
        self.beta = config.beta if config.beta is not None else (1.0 - self.alpha if count == 1 else 0.5)

    def resolved(self) -> dict:
        """α and β with their input-dependent defaults filled in."""
        return {"alpha": self.alpha, "beta": self.beta}

    def scale(self, key: str) -> float:
        """λ(ℓ) = α + β·ℓ/(L−1) for the block of `key`; α outside the blocks."""
        layer = block_index(key)
        if layer is None:
            return self.alpha
        if layer >= self.num_layers:
            raise ValueError(f"{key}: block {layer} but the model has {self.num_layers} blocks")
        return self.alpha + self.beta * layer / max(1, self.num_layers - 1)

    def tensor(self, key: str, summed: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        """θ₀ + λ(ℓ)·(Σ_t θ_t − T·θ₀)."""
        return base + self.scale(key) * (summed - self.count * base)
