"""The causal-LM forward pass and loss shared by training, eval loss and perplexity."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]  # (logits [N, C], targets [N]) -> summed loss


def forward_and_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], amp: torch.dtype | None, criterion: Criterion | None = None
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Forward under autocast; returns (output, summed next-token loss over label tokens, label-token count).

    The loss is cross-entropy unless `criterion` (a method's `criterion` hook) returns another sum.

    Logits are computed only at positions that predict a label in some row (`batch["logit_positions"]`,
    set here): prompts are about half of a chat example, and the lm_head plus a float32 copy of its
    logits are the largest activation of a small-model step.
    """
    labels = batch["labels"]
    keep = (labels[:, 1:] != -100).any(0).nonzero().squeeze(1)
    batch["logit_positions"] = keep
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    device_type = labels.device.type
    with torch.autocast(device_type, dtype=amp or torch.float32, enabled=amp is not None):
        # use_cache=False: with a cache object transformers skips the block-diagonal mask of packed rows.
        out = model(**inputs, use_cache=False, logits_to_keep=keep)
    targets = labels[:, keep + 1].reshape(-1)
    logits = out.logits.reshape(-1, out.logits.size(-1)).float()
    loss_sum = criterion(logits, targets) if criterion else None
    if loss_sum is None:
        loss_sum = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    return out, loss_sum, (targets != -100).sum()
