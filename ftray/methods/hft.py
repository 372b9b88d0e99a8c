"""HFT — Half Fine-Tuning (Hui et al., 2404.18466, ACL 2025).

Full fine-tuning in which a random half of the parameters, chosen per category inside every decoder
layer, is frozen for the stage: the frozen half keeps what the model knew, the other half learns.
Per layer: 2 of the 4 attention projections; 2 of the 3 FFN matrices in a random half of the layers
and 1 in the other half (1.5 of 3 on average); 1 of the 2 norms. Embeddings, lm_head and the final
norm stay trainable (third-party reference; the final norm is our inference).
"""

from __future__ import annotations

import random
from typing import Literal

import torch
from pydantic import Field

from ftray.methods.base import Context, Method, MethodConfig, stable_seed
from ftray.methods.registry import register

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")


class HFTConfig(MethodConfig):
    reselect: Literal["stage", "epoch"] = Field(
        "stage",
        description="Draw a new half once per stage (paper, Fig. 2) or at every epoch (third-party reading). "
        "'stage' freezes with requires_grad=False (faster); 'epoch' drops frozen gradients after backward.",
    )


def decoder_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of each decoder block: modules with `self_attn` and `mlp` children."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "self_attn") and hasattr(m, "mlp")]


def draw_selection(model: torch.nn.Module, seed: int) -> set[str]:
    """Names of the decoder-block parameters that train in this draw (identical on every rank)."""
    rng = random.Random(seed)
    layers = decoder_layers(model)
    two_ffn = set(rng.sample(range(len(layers)), len(layers) // 2))  # shuffled layer indices, first half get 2
    chosen = set()
    for i, (name, layer) in enumerate(layers):
        picks = [f"self_attn.{m}" for m in rng.sample(ATTENTION, 2)]
        picks += [f"mlp.{m}" for m in rng.sample(FFN, 2 if i in two_ffn else 1)]
        picks += rng.sample(NORMS, 1)
        for pick in picks:
            chosen.update(f"{name}.{pick}.{p}" for p, _ in layer.get_submodule(pick).named_parameters())
    return chosen


def block_parameters(model: torch.nn.Module) -> set[str]:
    """Names of all parameters inside decoder blocks (the ones HFT selects among)."""
    return {f"{n}.{p}" for n, layer in decoder_layers(model) for p, _ in layer.named_parameters()}


@register
class HFT(Method):
    """Freeze a fresh random half of each parameter category, per stage (or per epoch)."""

    name = "hft"
    tasks = ("causal_lm", "classification", "retrieval")
    paper = "Hui et al. 2024, HFT: Half Fine-Tuning for Large Language Models (2404.18466)"
    Config = HFTConfig
    incompatible = ("lora",)

    def prepare_model(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        """Select the trainable half for this stage."""
        self._select(model, ctx)
        if self.config.reselect == "stage":
            for n, p in model.named_parameters():
                p.requires_grad_(n not in self.frozen)
        return model

    def on_step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: Context) -> None:
        """In 'epoch' mode, redraw the half when a new epoch starts."""
        if self.config.reselect == "epoch" and ctx.epoch != self.epoch:
            self._select(model, ctx)

    def after_backward(self, model: torch.nn.Module, ctx: Context) -> None:
        """In 'epoch' mode, drop the frozen tensors' gradients so AdamW skips them entirely."""
        if self.config.reselect == "epoch":
            for n, p in model.named_parameters():
                if n in self.frozen:
                    p.grad = None  # grad=None, not zero: AdamW then applies neither decay nor momentum

    def _select(self, model: torch.nn.Module, ctx: Context) -> None:
        self.epoch = ctx.epoch
        seed = stable_seed("hft", ctx.spec.train.seed, ctx.phase, ctx.epoch if self.config.reselect == "epoch" else 0)
        self.frozen = block_parameters(model) - draw_selection(model, seed)
