"""Uniform soup (Wortsman et al., "Model soups", 2203.05482, §3): θ = (1/K) Σ_k θ_k.

No base is needed: the average of the ingredients' weights is the same whatever they share.
"""

from __future__ import annotations

import torch

from ftray.merge.registry import MergeMethod, register


@register
class Uniform(MergeMethod):
    """Average every floating-point tensor of the ingredients."""

    name = "uniform"
    paper = "Wortsman et al. 2022, Model soups (2203.05482)"
    needs_base = False

    def tensor(self, key: str, summed: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        """(1/K) Σ_k θ_k[key]."""
        return summed / self.count
