"""LocFT-BF — localized, breadth-first fine-tuning for model editing (Yang et al., "Fine-tuning Done Right in Model Editing", ICLR 2026).

Idea: plain fine-tuning is a state-of-the-art editor once it trains breadth-first (epochs of
mini-batches over all edits, not one edit to convergence after another) and updates a single,
empirically chosen tensor — the MLP down-projection of one layer.

Decisions for ftray (the paper tunes 7-8B models; SmolLM2-135M is a 30-layer Llama):
- Location: `layer` unset keeps Llama-3-8B's proportional position, floor(22/32 × layers), the
  "proportional position" rule the paper uses across Qwen sizes: SmolLM2-135M → `model.layers.20.mlp.down_proj`.
  `module: ""` trains the entire layer (the paper's Mistral setting).
- Breadth-first comes from ftray's loop: each epoch is a fresh seeded shuffle of all rows, cut into
  optimizer steps of B = batch_size × grad_accum × workers rows. The loop runs ⌊N/B⌋ steps per epoch
  (the paper ⌈N/B⌉: its last partial batch is dropped here, a different one each epoch), so choose B
  dividing N for the paper's schedule — the recipe does (100 edits, B = 20).
- Skipping: a step whose global batch loss (all-reduced, identical on every rank) is below
  `skip_loss` drops every gradient (grad=None), so Adam leaves the weights and its moments alone.
  Early stop: once an epoch's mean batch loss is below `stop_loss`, every later step is skipped the
  same way — the loop has no early-stop hook, so those steps still run forward/backward (wasted compute, same weights).
- Loss: per-sample mean over target tokens, then mean over the batch (the paper's), by adding
  (sample mean − the loop's token mean) as the extra loss term.
- Prompt formatting is ftray's: chat template, the reply ending in EOS; the paper's raw
  "prompt + ' ' + target + EOS" with left padding is a base-model detail the chat format replaces.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field

from ftray.methods.base import Context, Method, MethodConfig
from ftray.methods.hft import decoder_layers
from ftray.methods.registry import register


class LocFTBFConfig(MethodConfig):
    layer: int | None = Field(None, ge=0, description="Decoder layer to tune; unset = floor(relative_depth × layers) (Llama-3-8B: 22).")
    relative_depth: float = Field(22 / 32, ge=0, lt=1, description="Proportional position used when `layer` is unset (paper: layer 22 of 32).")
    module: str = Field("mlp.down_proj", description="Sub-module of that layer to tune (paper: mlp.down_proj; '' = the entire layer, its Mistral setting).")
    skip_loss: float = Field(1e-2, ge=0, description="Skip the update when the batch loss is below this (paper: 1e-2).")
    stop_loss: float = Field(1e-2, ge=0, description="Stop updating once an epoch's mean batch loss is below this (paper: 1e-2).")
    sample_mean_loss: bool = Field(True, description="Per-sample mean CE over target tokens, then batch mean (paper), instead of the token mean.")


def per_sample_loss(batch: dict, out) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample mean CE over label tokens, the token-mean CE) from a forward at `logit_positions`."""
    keep = batch["logit_positions"]
    targets = batch["labels"][:, keep + 1]
    ce = F.cross_entropy(out.logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
    mask = (targets != -100).float()
    per_row = (ce * mask).sum(1) / mask.sum(1).clamp(min=1)
    token_mean = (ce * mask).sum() / mask.sum().clamp(min=1)
    has_labels = mask.sum(1) > 0  # a row truncated to its prompt has no target: leave it out of the mean
    return (per_row[has_labels].mean() if has_labels.any() else token_mean), token_mean


@register
class LocFTBF(Method):
    """Train one tensor (layer L's MLP down-projection) with Adam, epoch by epoch over all edits, skipping converged batches."""

    name = "locft_bf"
    paper = "Yang et al. 2026, Fine-tuning Done Right in Model Editing (LocFT-BF), ICLR 2026"
    Config = LocFTBFConfig
    incompatible = ("lora", "hft")
    bench = {"train": {"lr": 5e-4, "warmup_ratio": 0.0, "schedule": "constant"}}  # paper: constant Adam lr 5e-4 on one tensor

    def __init__(self, config: LocFTBFConfig) -> None:
        super().__init__(config)
        self.target = ""
        self.epoch, self.epoch_sum, self.epoch_steps = 0, 0.0, 0
        self.converged, self.skipped = False, 0
        self._step_sum, self._step_n = 0.0, 0

    def target_prefix(self, model: torch.nn.Module) -> str:
        """The parameter-name prefix of the tuned location, e.g. 'model.layers.20.mlp.down_proj'."""
        layers = decoder_layers(model)
        index = self.config.layer if self.config.layer is not None else math.floor(self.config.relative_depth * len(layers))
        if index >= len(layers):
            raise ValueError(f"methods.locft_bf.layer: {index} is out of range; the model has {len(layers)} decoder layers")
        name, layer = layers[index]
        if self.config.module and not any(n == self.config.module for n, _ in layer.named_modules()):
            raise ValueError(f"methods.locft_bf.module: layer {index} has no sub-module {self.config.module!r} (e.g. mlp.down_proj, self_attn.o_proj)")
        return f"{name}.{self.config.module}" if self.config.module else name

    def prepare_model(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        """Freeze everything but the chosen location."""
        self.target = self.target_prefix(model)
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith(self.target + "."))
        return model

    def optimizer(self, params: list, ctx: Context) -> torch.optim.Optimizer:
        """Adam without weight decay (paper), whatever train.weight_decay says."""
        return torch.optim.AdamW(params, lr=ctx.spec.train.lr, betas=ctx.spec.train.betas, weight_decay=0.0)

    def on_step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: Context) -> None:
        """At an epoch boundary, stop updating if the finished epoch's mean batch loss is below stop_loss."""
        if ctx.epoch != self.epoch:
            if self.epoch_steps and self.epoch_sum / self.epoch_steps < self.config.stop_loss:
                self.converged = True
            self.epoch, self.epoch_sum, self.epoch_steps = ctx.epoch, 0.0, 0

    def loss(self, model: torch.nn.Module, batch: dict, out, ctx: Context) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Record the batch loss for skipping; switch the objective to the per-sample mean."""
        sample_mean, token_mean = per_sample_loss(batch, out)
        self._step_sum += float(sample_mean.detach())
        self._step_n += 1
        extra = sample_mean - token_mean if self.config.sample_mean_loss else None
        return extra, {"skipped_steps": self.skipped}

    def after_backward(self, model: torch.nn.Module, ctx: Context) -> None:
        """Drop the step's gradients when the global batch loss is already below skip_loss (or training has converged)."""
        totals = torch.tensor([self._step_sum, self._step_n], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(totals)  # one decision on every rank, or DDP replicas would drift apart
        self._step_sum, self._step_n = 0.0, 0
        batch_loss = float(totals[0] / totals[1].clamp(min=1))
        self.epoch_sum += batch_loss
        self.epoch_steps += 1
        if self.converged or batch_loss < self.config.skip_loss:
            self.skipped += 1
            for p in model.parameters():
                p.grad = None  # None, not zero: Adam then updates neither the weight nor its moments

    def state_dict(self) -> dict:
        """Epoch bookkeeping, convergence and the skip count."""
        return {"epoch": self.epoch, "epoch_sum": self.epoch_sum, "epoch_steps": self.epoch_steps,
                "converged": self.converged, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        for k, v in state.items():
            setattr(self, k, v)
