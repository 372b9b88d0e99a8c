"""LoFiT — Localized Fine-Tuning on LLM Representations (Yin et al., NeurIPS 2024, 2406.01563).

All weights stay frozen; only chosen attention heads' outputs change. Stage 1 learns a scaling
z_h ← (1+A_h)⊙z_h for every head with an L1 penalty and keeps the K heads with the largest ‖A_h‖₂;
stage 2 learns only additive offsets z_h ← z_h + v_h on those K heads, starting from the base again.

Decisions for a small causal LM (the paper used Llama-2-7B/13B and Gemma-7B):
- K: `num_heads` when given, else 3% of all heads (the paper's 32 of 1024 and 48 of 1600): 8 of
  SmolLM2-135M's 270 (30 layers × 9 heads), at least 1.
- λ = 1e-3 (the paper's MQuAKE value: its SFT task, like ours); lrs 5e-3 / 1e-2 per stage (Llama-2-7B)
  replace `train.lr` for LoFiT's parameters through `param_groups`. A and v start at N(0, 0.001²),
  reading the paper's "N(0, 1e-3)" as a standard deviation; the draw is seeded per layer, so every
  DDP rank starts identical.
- The intervention is a forward pre-hook on each `o_proj` (its input is the concatenated head
  outputs z); the parameters live in an `o_proj.lofit` child, so base weight names are unchanged.
- Export: o_proj((1+A)⊙z + v) = (W_o·diag(1+A))·z + W_o·v, so A folds into o_proj's weight and v
  into an o_proj bias. The exported model sets Llama's `attention_bias` (q/k/v/o biases; q/k/v's are
  zero) and loads with plain transformers. Checkpoints are written folded too (the model's
  `save_pretrained` folds a copy), because the final export reloads the last checkpoint with plain
  transformers, which would drop LoFiT's own parameters.
- Resume: the selected heads are method state; a save during stage 1 records the heads chosen from
  the weights at that moment, used if the run resumes exactly at the stage boundary (the loop does
  not restore a finished phase's weights). FSDP is refused (the hook reads whole tensors).
"""

from __future__ import annotations

import copy
import functools
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from pydantic import Field

from ftray.methods.base import Context, Method, MethodConfig, Phase, stable_seed
from ftray.methods.registry import register

if TYPE_CHECKING:
    from ftray.config import RunSpec


class LoFiTConfig(MethodConfig):
    num_heads: int | None = Field(None, ge=1, description="K, heads tuned in stage 2 (paper: 32 for Llama-2-7B, 48 for 13B, 16 for Gemma-7B). Default: 3% of all heads, at least 1.")
    select_fraction: float = Field(0.5, gt=0, lt=1, description="Share of the optimizer steps for stage 1 (head selection); the paper trains 5 epochs per stage.")
    l1: float = Field(1e-3, ge=0, description="λ of the stage-1 L1 penalty on the scalings A (paper: 1e-3 for MQuAKE, 5e-4 for TruthfulQA).")
    select_lr: float = Field(5e-3, gt=0, description="Stage-1 learning rate of A, in place of train.lr (paper, Llama-2-7B).")
    bias_lr: float = Field(1e-2, gt=0, description="Stage-2 learning rate of v, in place of train.lr (paper, Llama-2-7B).")
    init_std: float = Field(1e-3, ge=0, description="Standard deviation of A's and v's initial draw (paper: N(0, 1e-3)).")


class HeadOffsets(torch.nn.Module):
    """One layer's intervention on the o_proj input: z_h ← (1+A_h)⊙z_h (stage 1) or z_h + v_h on `heads` (stage 2)."""

    def __init__(self, num_heads: int, head_dim: int, heads: list[int] | None, std: float, seed: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.hook_id = num_heads, head_dim, -1
        g = torch.Generator().manual_seed(seed)
        shape = (num_heads if heads is None else len(heads), head_dim)
        init = torch.nn.Parameter(torch.randn(shape, generator=g) * std)
        self.A = init if heads is None else None
        self.v = None if heads is None else init
        self.register_buffer("heads", torch.tensor(heads or [], dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.unflatten(-1, (self.num_heads, self.head_dim))
        if self.A is not None:
            z = z * (1 + self.A.to(z.dtype))
        if self.v is not None:
            z = z.index_add(-2, self.heads, self.v.to(z.dtype).expand(*z.shape[:-2], -1, -1))
        return z.flatten(-2)


def _apply_offsets(module: torch.nn.Module, args: tuple) -> tuple:
    # A module-level function (not a closure): a deep copy of the model calls its own copy's offsets.
    return (module.lofit(args[0]), *args[1:])


def attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Attention modules with an `o_proj` Linear, in layer order."""
    return [m for m in model.modules() if isinstance(getattr(m, "o_proj", None), torch.nn.Linear)]


def attach(o_proj: torch.nn.Linear, offsets: HeadOffsets) -> None:
    """Install `offsets` on `o_proj`'s input (replacing any earlier ones)."""
    detach(o_proj)
    o_proj.lofit = offsets
    offsets.hook_id = o_proj.register_forward_pre_hook(_apply_offsets).id


def detach(o_proj: torch.nn.Linear) -> None:
    """Remove LoFiT's offsets and hook from `o_proj` (by hook id: a copied model has no handle of its own)."""
    if hasattr(o_proj, "lofit"):
        o_proj._forward_pre_hooks.pop(o_proj.lofit.hook_id, None)
        del o_proj.lofit


@torch.no_grad()
def fold(model: torch.nn.Module) -> torch.nn.Module:
    """A plain copy of `model` with each layer's offsets folded into o_proj (weight·diag(1+A), bias W_o·v)."""
    layers = attention_layers(model)
    if not any(hasattr(a.o_proj, "lofit") for a in layers):
        return model
    if not hasattr(model.config, "attention_bias"):
        raise ValueError(f"lofit: cannot export {type(model).__name__}: its config has no attention_bias flag to carry the offsets")
    out = copy.deepcopy(model)
    out.__dict__.pop("save_pretrained", None)
    out.config.attention_bias = True  # q/k/v/o biases on load; q/k/v's stay zero
    for attn in attention_layers(out):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(attn, name)
            if lin.bias is None:
                lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
        o, off = attn.o_proj, getattr(attn.o_proj, "lofit", None)
        if off is None:
            continue
        w = o.weight.double()
        if off.v is not None:
            full = torch.zeros(off.num_heads, off.head_dim, dtype=torch.float64, device=w.device)
            full[off.heads] = off.v.double()
            o.bias.add_((w @ full.flatten()).to(o.bias.dtype))  # uses W_o before A's scaling: v is added after it
        if off.A is not None:
            o.weight.copy_((w * (1 + off.A.double()).flatten()).to(o.weight.dtype))
        detach(o)
    out.requires_grad_(False)
    return out


def _save_folded(model: torch.nn.Module, out: Any, *args: Any, state_dict: Any = None, **kwargs: Any) -> None:
    fold(model).save_pretrained(out, *args, **kwargs)  # `state_dict` is the unfolded one: the fold saves its own


@register
class LoFiT(Method):
    """Stage 1: per-head scalings with L1 → top-K heads; stage 2: bias offsets on those heads only."""

    name = "lofit"
    paper = "Yin et al. 2024, LoFiT: Localized Fine-tuning on LLM Representations (NeurIPS 2024, 2406.01563)"
    Config = LoFiTConfig
    baseline = "lora"  # the paper compares with LoRA and RED at 20–200× more parameters
    incompatible = ("lora", "full", "hft")

    def __init__(self, config: LoFiTConfig) -> None:
        super().__init__(config)
        self.heads: list[list[int]] | None = None  # selected (layer, head) pairs
        self.heads_step, self.heads_final = -1, False
        self.offsets: list[HeadOffsets] = []
        self.ctx: Context | None = None  # the loop's context: its step is current when state_dict is called

    def check(self, spec: RunSpec) -> None:
        """The hooks read whole o_proj inputs and weights: DDP only."""
        if spec.scaling.strategy == "fsdp":
            raise ValueError("lofit folds whole o_proj weights; use scaling.strategy=ddp, not fsdp")

    def phases(self) -> list[Phase]:
        """Select heads (scalings A), then train offsets v on the selected heads."""
        return [Phase("select", self.config.select_fraction), Phase("bias", 1 - self.config.select_fraction)]

    def prepare_model(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        """Freeze the model; stage 1 attaches A to every head, stage 2 replaces them by v on the top-K heads."""
        self.ctx = ctx
        model.requires_grad_(False)
        layers, n_heads = attention_layers(model), model.config.num_attention_heads
        head_dim = layers[0].o_proj.in_features // n_heads
        stage2 = ctx.phase == "bias"  # anything else (incl. a single-phase "train") is stage 1
        if stage2:
            if not (self.heads_final or self.heads_step == ctx.step):
                self.heads = self.select_heads()
            self.heads = self._broadcast(self.heads, ctx)
            self.heads_step, self.heads_final = ctx.step, True
        self.offsets = []
        for i, attn in enumerate(layers):
            detach(attn.o_proj)  # stage 2 starts from the base model: A is dropped (paper: reload the base)
            heads = sorted(h for l, h in self.heads if l == i) if stage2 else None
            if heads == []:
                continue
            off = HeadOffsets(n_heads, head_dim, heads, self.config.init_std, stable_seed("lofit", ctx.spec.train.seed, ctx.phase, i))
            attach(attn.o_proj, off.to(attn.o_proj.weight.device))
            self.offsets.append(off)
        model.save_pretrained = functools.partial(_save_folded, model)  # checkpoints load folded in plain transformers
        return model

    def select_heads(self) -> list[list[int]]:
        """The K (layer, head) pairs with the largest ‖A_{ℓ,h}‖₂ (stage-1 offsets, one per layer in order)."""
        scores = torch.stack([off.A.detach().float().norm(dim=-1).cpu() for off in self.offsets])
        k = self.config.num_heads or max(1, round(0.03 * scores.numel()))
        if k > scores.numel():
            raise ValueError(f"lofit: num_heads={k} but the model has only {scores.numel()} heads")
        top = torch.topk(scores.flatten(), k).indices
        return sorted([int(i) // scores.shape[1], int(i) % scores.shape[1]] for i in top)

    def param_groups(self, model: torch.nn.Module, ctx: Context) -> list[dict[str, Any]] | None:
        """LoFiT's parameters with the stage's learning rate; anything another method left trainable keeps train.lr."""
        ours = [p for off in self.offsets for p in off.parameters()]
        lr = self.config.bias_lr if ctx.phase == "bias" else self.config.select_lr
        mine = {id(p) for p in ours}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in mine]
        return [{"params": ours, "lr": lr}] + ([{"params": rest}] if rest else [])

    def loss(self, model: torch.nn.Module, batch: dict, out: Any, ctx: Context) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Stage 1: λ·Σ|A| (stage 2 has λ = 0)."""
        scales = [off.A for off in self.offsets if off.A is not None]
        if not scales or not self.config.l1:
            return None, {}
        l1 = sum(a.abs().sum() for a in scales)
        return self.config.l1 * l1, {"lofit_l1": float(l1.detach())}

    def finalize(self, model: torch.nn.Module, base: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        """A plain transformers model: offsets folded into o_proj (already so when loaded from a checkpoint)."""
        return fold(model)

    def state_dict(self) -> dict[str, Any]:
        """The selected heads; during stage 1, the heads the current scalings would select."""
        if not self.heads_final and self.ctx is not None and self.offsets and self.offsets[0].A is not None:
            self.heads, self.heads_step = self.select_heads(), self.ctx.step  # used on a resume exactly at the boundary
        return {"heads": self.heads, "heads_step": self.heads_step, "heads_final": self.heads_final}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the selection; `prepare_model` keeps it when final or made at the resume step."""
        self.heads, self.heads_step, self.heads_final = state["heads"], state["heads_step"], state["heads_final"]

    @staticmethod
    def _broadcast(heads: list[list[int]], ctx: Context) -> list[list[int]]:
        """Rank 0's selection everywhere (ranks hold identical A; this rules out divergent tie-breaks)."""
        if not (dist.is_initialized() and ctx.world_size > 1):
            return heads
        flat = torch.tensor(heads, dtype=torch.long, device=ctx.device)
        dist.broadcast(flat, src=0)
        return flat.cpu().tolist()
