"""Task arithmetic (Ilharco et al., "Editing models with task arithmetic", 2212.04089).

θ = θ₀ + λ·Σ_t τ_t with task vectors τ_t = θ_t − θ₀. λ = 1/T is plain averaging; the paper picks λ
from {0.1, …, 1.0} on validation data.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ftray.merge.registry import MergeConfig, MergeMethod, register


class TaskArithmeticConfig(MergeConfig):
    scale: float = Field(1.0, description="λ: multiplier of the summed task vectors (paper: chosen in {0.1, …, 1.0} on validation).")


@register
class TaskArithmetic(MergeMethod):
    """Add the scaled sum of the checkpoints' task vectors to the base."""

    name = "task_arithmetic"
    paper = "Ilharco et al. 2023, Editing models with task arithmetic (2212.04089)"
    Config = TaskArithmeticConfig

    def tensor(self, key: str, summed: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        """θ₀ + λ·(Σ_t θ_t − T·θ₀)."""
        return base + self.config.scale * (summed - self.count * base)
