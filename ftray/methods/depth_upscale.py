"""Depth upscaling — Young et al. (01.AI), "Yi: Open Foundation Models by 01.AI" (2403.04652), the Yi-9B section.

Idea: make a trained model deeper by duplicating a contiguous block of middle decoder layers — those
whose output is nearly their input (cosine ≈ 1) — and then keep training the deeper model, instead of
training it from scratch (Yi-6B's 32 layers became Yi-9B's 48 by duplicating layers 12–28).

In ftray this is a `prepare_model` step before ordinary (full) training: every Ray Train worker
upscales its copy of the model the same way (fixed calibration text; rank 0's choice is broadcast all
the same, so float noise between devices cannot split them), and checkpoints and `final` are
`save_pretrained` directories of the deeper model (config.json carries the new `num_hidden_layers`).
The block choice and the copy live in `ftray.merge.depth_upscale`, shared with `ftray merge depth-upscale`.

Adapters are refused: LoRA/CorDA checkpoints are saved against `model.name`, the original depth, and
cannot load there. Upscale first (`ftray merge depth-upscale MODEL --out DIR`), then train an adapter
with `model.name: DIR`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ftray.merge.depth_upscale import DepthUpscaleConfig, resolve_block, upscale
from ftray.methods.base import Context, Method, MethodConfig
from ftray.methods.registry import REGISTRY, register

if TYPE_CHECKING:
    from ftray.config import RunSpec

# Methods whose output is tied to the original-depth model: adapters saved against model.name, and
# LT-SFT's sparse difference taken against it in `finalize`.
TIED_TO_ORIGINAL = ("lora", "corda", "lt_sft")


class DepthUpscaleMethodConfig(MethodConfig, DepthUpscaleConfig):
    """The fields of `ftray.merge.depth_upscale.DepthUpscaleConfig` (one definition for the method and the merge)."""


@register
class DepthUpscale(Method):
    """Duplicate a middle block of decoder layers (chosen by input/output cosine), then train the deeper model."""

    name = "depth_upscale"
    paper = "Young et al. 2024, Yi: Open Foundation Models by 01.AI (2403.04652), Yi-9B depth upscaling"
    Config = DepthUpscaleMethodConfig

    def __init__(self, config: DepthUpscaleMethodConfig) -> None:
        super().__init__(config)
        self.block: tuple[int, int] | None = None  # the block chosen in this run (restored on resume)
        self.done = False  # prepare_model runs once per phase: upscale only in the first

    def check(self, spec: RunSpec) -> None:
        """Refuse methods tied to the original depth, and methods that reshape the model before this one."""
        names = [m["name"] for m in spec.methods]
        tied = [n for n in names if n in TIED_TO_ORIGINAL]
        if tied:
            raise ValueError(
                f"cannot be combined with {', '.join(tied)}: its output is saved against model.name's original depth. "
                "Write the deeper model first (`ftray merge depth-upscale MODEL --out DIR`) and train on it with model.name: DIR")
        before = [n for n in names[: names.index(self.name)] if "prepare_model" in REGISTRY[n].hooks()]
        if before:
            raise ValueError(f"list depth_upscale before {', '.join(before)}: their prepare_model must see the deeper model")

    def prepare_model(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        """Choose the block (once; identical on every rank) and insert the copies."""
        if self.done:
            return model
        if hasattr(model, "peft_config"):
            raise ValueError("depth_upscale: the model is already a PEFT model; list depth_upscale first")
        if self.block is None:
            block, _ = resolve_block(model, ctx.tokenizer, self.config)
            self.block = same_on_every_rank(block)
        upscale(model, self.block, self.config.zero_copies)
        self.done = True
        return model

    def state_dict(self) -> dict[str, Any]:
        """The chosen block, so a resumed run rebuilds the same deeper model before loading its weights."""
        return {"block": list(self.block) if self.block else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the block chosen before the restart."""
        self.block = tuple(state["block"]) if state.get("block") else None


def same_on_every_rank(block: tuple[int, int]) -> tuple[int, int]:
    """Rank 0's block on every rank: the calibration text is fixed, but cosines of near-equal blocks could
    still round differently on different devices, and ranks with different depths would hang in DDP."""
    if not (dist.is_available() and dist.is_initialized()):
        return block
    box = [list(block)]
    dist.broadcast_object_list(box, src=0)
    return tuple(box[0])
