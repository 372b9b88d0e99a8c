"""AdamW with linear warm-up then cosine/linear/constant decay."""

from __future__ import annotations

import math

import torch

from ftray.config import TrainSpec


def build_optimizer(params: list, train: TrainSpec) -> torch.optim.AdamW:
    """AdamW over `params` (tensors or param-group dicts)."""
    return torch.optim.AdamW(params, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainSpec, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up over `warmup_ratio` of `total_steps`, then the configured decay to 0."""
    warmup = int(train.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if train.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if train.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
