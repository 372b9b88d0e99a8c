"""LT-SFT — Composable Sparse Fine-Tuning (Ansell et al., ACL 2022, 2110.07560).

Lottery-ticket sparse fine-tuning: train densely, keep the K weights that moved most (one global
threshold over all maskable tensors), reset to θ⁰ and train only those K; the result is a sparse
difference φ = θ − θ⁰ that composes with other φs by addition (`ftray merge sparse-diff`).

Decisions for a small causal LM (the paper used mBERT/XLM-R):
- Maskable: every parameter that is trainable when the run starts, except normalisation weights
  (the paper freezes LayerNorms) and an untied lm_head (frozen like the paper's output embedding).
  A *tied* embedding (SmolLM2) is maskable: untying would change the exported architecture.
- K: `k` entries when given, else `proportion` of the maskable entries: the authors' 1% default, i.e.
  1,344,799 of SmolLM2-135M's 134.5M (the paper's fixed K = 7.7M is 2.8% of XLM-R base, 4% of mBERT).
- The L1 pull R = λ·Σ|θ−θ⁰|/N is added as its gradient λ/N·sign(θ−θ⁰) in `after_backward`: once
  per optimizer step, as in the paper, after the all-reduce (identical weights on every rank give
  the identical term) and without an autograd graph over every weight.
- One selection round (`n_ft_iterations=1`, the paper's default); iterated rounds are left out.
- Weight decay must be 0 (the paper's setting): AdamW's decoupled decay would move entries outside
  the mask. FSDP is refused: selection reads whole tensors, not shards.
- Resume: the selection is saved in `state_dict`. A checkpoint written exactly at the end of the
  dense phase also carries a selection made from the weights at that moment, because the loop
  does not restore the finished dense phase's weights before the sparse phase's `prepare_model`.
- `finalize` returns the model unchanged and makes its `save_pretrained` also write φ as
  `sparse_diff.safetensors` (flat indices + float64 values): the hook is not told the output dir.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from pydantic import Field

from ftray.merge.checkpoints import resolve
from ftray.merge.sparse_diff import DIFF_FILE, extract_diff, save_diff
from ftray.methods.base import Context, Method, MethodConfig, Phase
from ftray.methods.registry import register

if TYPE_CHECKING:
    from ftray.config import RunSpec


class LTSFTConfig(MethodConfig):
    k: int | None = Field(None, ge=1, description="K, the number of weights fine-tuned in the sparse phase (paper: 14,155,776 for a POS task SFT on XLM-R). Default: `proportion` of the maskable weights.")
    proportion: float = Field(0.01, gt=0, le=1, description="K as a fraction of the maskable weights when `k` is not set (the authors' default, 1%).")
    dense_fraction: float = Field(0.5, gt=0, lt=1, description="Share of the optimizer steps spent in the dense phase; the rest is the sparse phase (paper: equal phases for language SFTs, 3:10 epochs for POS).")
    l1: float = Field(0.1, ge=0, description="λ of the L1 pull toward θ⁰, R = λ·Σ|θ−θ⁰|/N, in both phases (paper: 0.1 for language SFTs).")
    threshold: float = Field(1e-7, ge=0, description="Entries of θ−θ⁰ at most this large are dropped from the exported φ (the authors' 1e-7).")


def maskable_names(model: torch.nn.Module) -> list[str]:
    """Trainable parameters except normalisation weights and an untied output embedding."""
    frozen = {id(p) for m in model.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(recurse=False)}
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is not embed.weight:
        frozen.add(id(head.weight))
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in frozen]


@torch.no_grad()
def select_top_k(params: dict[str, torch.Tensor], theta0: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Flat indices, per tensor, of the k entries with the largest |θ−θ⁰| over all tensors jointly."""
    moved = torch.cat([(params[n].detach() - theta0[n]).abs().flatten().float().cpu() for n in theta0])
    flat = torch.topk(moved, k, sorted=False).indices  # exactly k entries, ties included (a threshold could give more)
    return split_indices(flat, theta0)


def split_indices(flat: torch.Tensor, theta0: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Global flat positions (over the concatenation of `theta0`'s tensors) → sorted positions per tensor."""
    flat, out, start = flat.sort().values, {}, 0
    for n, t in theta0.items():
        lo, hi = torch.searchsorted(flat, torch.tensor([start, start + t.numel()]))
        out[n] = flat[lo:hi] - start
        start += t.numel()
    return out


@register
class LTSFT(Method):
    """Dense phase → global top-K of |θ−θ⁰| → reset to θ⁰ → sparse phase with masked gradients; exports φ."""

    name = "lt_sft"
    paper = "Ansell et al. 2022, Composable Sparse Fine-Tuning for Cross-Lingual Transfer (ACL 2022, 2110.07560)"
    Config = LTSFTConfig
    incompatible = ("lora", "hft")

    def __init__(self, config: LTSFTConfig) -> None:
        super().__init__(config)
        self.mask: dict[str, torch.Tensor] | None = None  # flat indices of the selected entries, per tensor
        self.mask_step, self.mask_final = -1, False  # step the selection was made at; made on entering the sparse phase
        self.theta0: dict[str, torch.Tensor] = {}
        self.model: torch.nn.Module | None = None
        self.ctx: Context | None = None

    def check(self, spec: RunSpec) -> None:
        """Sparse updates need zero weight decay, and selection needs unsharded tensors."""
        if spec.train.weight_decay != 0:
            raise ValueError("lt_sft needs train.weight_decay=0 (the paper's setting): AdamW's decoupled decay "
                             "would move the weights outside the sparse mask")
        if spec.scaling.strategy == "fsdp":
            raise ValueError("lt_sft selects over whole tensors; use scaling.strategy=ddp, not fsdp")

    def phases(self) -> list[Phase]:
        """Dense fine-tuning, then sparse fine-tuning of the selected K entries."""
        return [Phase("dense", self.config.dense_fraction), Phase("sparse", 1 - self.config.dense_fraction)]

    def num_selected(self) -> int:
        """K for this model: `k`, or `proportion` of the maskable entries (at least 1)."""
        total = sum(t.numel() for t in self.theta0.values())
        return min(total, self.config.k or max(1, round(self.config.proportion * total)))

    def prepare_model(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        """Dense phase: freeze norms/untied head, remember θ⁰. Sparse phase: select, reset to θ⁰, freeze unselected tensors."""
        self.model, self.ctx = model, ctx
        if ctx.phase != "sparse":  # "dense", or a single-phase run (e.g. the contract test's "train")
            names = set(maskable_names(model))
            for n, p in model.named_parameters():
                p.requires_grad_(n in names)
            self.theta0 = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
            return model
        params = dict(model.named_parameters())
        if not (self.mask_final or self.mask_step == ctx.step):  # no usable saved selection: select from live weights
            self.mask = select_top_k(params, self.theta0, self.num_selected())
        self.mask = self._broadcast(self.mask, ctx)  # every rank enters here, whichever way it got its selection
        self.mask_step, self.mask_final = ctx.step, True
        with torch.no_grad():
            for n, t in self.theta0.items():
                params[n].copy_(t)  # step 5: θ ← θ⁰ (the optimizer is rebuilt by the loop for the new phase)
                params[n].requires_grad_(self.mask[n].numel() > 0)
        self.dense_masks = {n: self._dense_mask(params[n], idx) for n, idx in self.mask.items() if idx.numel()}
        return model

    def after_backward(self, model: torch.nn.Module, ctx: Context) -> None:
        """Add the L1 pull's gradient, then zero the gradients of unselected entries (sparse phase)."""
        scale = self.config.l1 / max(1, sum(t.numel() for t in self.theta0.values()))
        sparse = self.mask_final and ctx.phase == "sparse"
        for n, p in model.named_parameters():
            if p.grad is None or n not in self.theta0:
                continue
            if self.config.l1:
                p.grad.add_(torch.sign(p.detach() - self.theta0[n]), alpha=scale)
            if sparse:
                p.grad.mul_(self.dense_masks[n])

    def finalize(self, model: torch.nn.Module, base: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        """Return the model; its `save_pretrained` also writes φ = (θ−θ⁰)·[|θ−θ⁰| > threshold] beside it."""
        names = set(maskable_names(model)) or {n for n, _ in model.named_parameters()}
        base_params = dict(base.named_parameters())
        tuned = {n: p for n, p in model.named_parameters() if n in names}
        diff = extract_diff(tuned, {n: base_params[n] for n in tuned}, self.config.threshold)
        meta = {"base_model": resolve(ctx.spec.model.name, ctx.spec.model.gguf_file), "method": self.name}
        save = model.save_pretrained

        def save_with_diff(out, *args, **kwargs):
            save(out, *args, **kwargs)
            save_diff(diff, f"{out}/{DIFF_FILE}", meta)

        model.save_pretrained = save_with_diff  # an instance attribute: only this exported model is affected
        return model

    def state_dict(self) -> dict[str, Any]:
        """The selection (made on entering the sparse phase, or from the live weights at a dense-phase save)."""
        if not self.mask_final and self.model is not None and self.ctx is not None and self.ctx.rank == 0:
            # Only rank 0's state is written. At the dense phase's last step this is the selection the
            # sparse phase must use on resume: the loop resumes there with θ⁰, not the dense weights.
            self.mask = select_top_k(dict(self.model.named_parameters()), self.theta0, self.num_selected())
            self.mask_step = self.ctx.step
        return {"mask": self.mask, "mask_step": self.mask_step, "mask_final": self.mask_final}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the selection; `prepare_model` keeps it when it is final or made at the resume step."""
        self.mask, self.mask_step, self.mask_final = state["mask"], state["mask_step"], state["mask_final"]

    @staticmethod
    def _dense_mask(p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)  # bool: a quarter of a float mask's memory
        mask[idx.to(p.device)] = True
        return mask.view_as(p)

    @staticmethod
    def _broadcast(mask: dict[str, torch.Tensor], ctx: Context) -> dict[str, torch.Tensor]:
        """Rank 0's selection on every rank (ranks hold identical weights; this rules out divergent tie-breaks)."""
        if not (dist.is_initialized() and ctx.world_size > 1):
            return mask
        counts = torch.tensor([t.numel() for t in mask.values()], device=ctx.device)
        flat = torch.cat(list(mask.values())).to(ctx.device)
        dist.broadcast(counts, src=0)
        dist.broadcast(flat, src=0)
        return dict(zip(mask, flat.cpu().split(counts.cpu().tolist())))
