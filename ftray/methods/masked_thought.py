"""Masked Thought / MFT (Chen et al., 2403.02178, ACL 2024).

While fine-tuning on chain-of-thought data, corrupt a random fraction p_t of the response tokens in
the *input* (never the prompt) and keep the labels uncorrupted: a data-augmentation regulariser that
forces the model to reason past errors in its own context.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ftray.methods.base import Context, Method, MethodConfig
from ftray.methods.registry import register


class MaskedThoughtConfig(MethodConfig):
    p: float = Field(0.4, ge=0, le=1, description="Final corruption probability p_max (GSM8K/Llama-2: 0.4; MATH: 0.2).")
    warmup: float = Field(0.66, ge=0, le=1, description="p_t rises linearly to p over this fraction of training.")
    replace: Literal["random", "pad"] = Field(
        "random",
        description="Replacement: a uniformly random vocabulary id (the Llama-2 GSM8K script) or the pad id. "
        "The repo's new <mask> token is left out: it would resize the embeddings under every adapter.",
    )


def mask_probability(p_max: float, warmup: float, step: int, max_steps: int) -> float:
    """p_t = min(p_max·step / (warmup·max_steps + 1), p_max), the repo's linear warm-up."""
    if warmup == 0:
        return p_max
    return min(p_max * step / (warmup * max_steps + 1), p_max)


@register
class MaskedThought(Method):
    """Replace response tokens in the input with probability p_t; labels stay the originals."""

    name = "masked_thought"
    paper = "Chen et al. 2024, Masked Thought: Simply Masking Partial Reasoning Steps Can Improve Mathematical Reasoning Learning of Language Models (2403.02178)"
    Config = MaskedThoughtConfig

    def corrupt_batch(self, batch: dict[str, torch.Tensor], ctx: Context) -> dict[str, torch.Tensor]:
        """Corrupt a p_t fraction of response positions (labels != -100) in `input_ids`."""
        p_t = mask_probability(self.config.p, self.config.warmup, ctx.step, ctx.max_steps)
        if p_t == 0:
            return batch
        ids = batch["input_ids"]
        response = batch["labels"] != -100
        hit = (torch.rand(ids.shape, generator=ctx.generator) < p_t).to(ids.device) & response
        if self.config.replace == "random":
            fill = torch.randint(0, len(ctx.tokenizer), ids.shape, generator=ctx.generator).to(ids.device)
        else:
            fill = torch.full_like(ids, ctx.tokenizer.pad_token_id)
        return {**batch, "input_ids": torch.where(hit, fill, ids)}
