"""CAR — Confusion-Aware Spectral Regularizer for long-tailed recognition (Zhu et al., CVPR 2026, 2603.16732).

Idea: worst-class error is bounded by the spectral norm of the frequency-weighted, off-diagonal
confusion matrix, so CAR adds λ·σ_max(C̄·diag(w)) to cross-entropy, where C̄ is an EMA of a
differentiable per-batch confusion surrogate and w_j = 1/√(m_j + r0) favours rare classes.

Per micro-batch, with logits z [B, K] and labels y (the authors' `soft_confusion_from_batch`, Eq. 7):
  s_bi = softmax_i((z_b − sg(z_by))/τ) with i = y_b masked to 0,  g_bi = σ(sg(z_bi − z_by)),
  C_t[i, j] = Σ_{b: y_b = j} g_bi·s_bi / max(1, n_j)      (rows: predicted class, columns: true class)
  C̄ = β·sg(C̄_prev) + (1−β)·C_t, and C̄ = sg(C_t) on the very first batch (as the reference code does:
  the first step has no spectral gradient).

Decisions:
- Classification only (`out.logits` [B, K] of the sequence-classification head); the verbaliser
  variant over LM logits ([inf] in the spec) is left out.
- Class counts: `class_counts` when given, else the `label` column of the training split
  (`data.source`/`data.split`/`data.max_samples`) counted in `prepare_model` on each worker, not in
  `prepare_data`: that hook runs on the driver's own method instance, whose state never reaches the
  workers, and a method with `prepare_data` may not have its fields swept. Every rank reads the same
  rows, so the counts agree without communication; they are also saved in `state_dict`. Data without
  a `label` column (only synthetic tests) gets w ≡ 1, the paper's ablation, with a warning.
- DDP: the per-class sums of g·s and the per-class counts are all-reduced, so C_t is the confusion of
  the *global* micro-batch and the EMA is identical on every rank (it is what one process would see
  on the concatenated batch). Gradients still flow through this rank's own samples only, scaled by
  the world size because DDP averages gradients over ranks (tested against one process).
- With gradient accumulation the EMA advances once per micro-batch (the reference's unit is the
  mini-batch it backpropagates, which is a micro-batch here).
- The EMA is kept across epochs and not masked for classes absent from the batch (the reference's
  behaviour: their column decays toward 0 with weight 1−β). Both stop-gradients are always on.
- σ_max comes from `torch.linalg.svdvals` (exact; the K×K SVD is negligible next to the forward).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field

from ftray.methods.base import Context, Method, MethodConfig
from ftray.methods.registry import register

if TYPE_CHECKING:
    from ftray.config import RunSpec


class CARConfig(MethodConfig):
    """CAR's coefficients (the authors' CLI defaults: --spec-lambda, --spec-beta, --spec-temp, --r0)."""

    lam: float = Field(0.3, ge=0, description="λ, the weight of the spectral term in L_ce + λ·σ_max(C̄·diag(w)) (--spec-lambda).")
    beta: float = Field(0.9, ge=0, lt=1, description="EMA factor β: C̄ ← β·sg(C̄) + (1−β)·C_t (--spec-beta).")
    tau: float = Field(1.0, gt=0, description="Temperature τ of the softmax competition term of the surrogate (--spec-temp).")
    r0: float = Field(0.2, ge=0, description="Smoothing r0 in w_j = 1/√(m_j + r0), m_j the training frequency of class j.")
    weighting: bool = Field(True, description="Weight columns by w_j (False: w ≡ 1, the paper's ablation).")
    normalize_weights: bool = Field(True, description="Rescale w to mean 1 before clamping (--wj-norm).")
    min_weight: float = Field(1e-3, ge=0, description="Lower clamp of w_j (--wj-min).")
    class_counts: list[int] | None = Field(None, description="Training rows per class; default: counted from the training split's `label` column.")


def class_weights(counts: torch.Tensor, r0: float, normalize: bool = True, min_weight: float = 1e-3) -> torch.Tensor:
    """w_j = 1/√(m_j + r0), m_j = n_j/N; rescaled to mean 1, clamped below at `min_weight`."""
    m = counts.double() / counts.sum().clamp(min=1)
    w = 1 / torch.sqrt(m + r0)
    if normalize:
        w = w / w.mean()
    return w.clamp(min=min_weight).float()


def confusion_sums(logits: torch.Tensor, labels: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Column sums Σ_{b: y_b=j} g_bi·s_bi [K, K] (rows predicted i, columns true j) and per-class counts n_j [K]."""
    k = logits.shape[1]
    onehot = F.one_hot(labels, k).to(logits.dtype)
    z_true = logits.gather(1, labels[:, None])
    off = 1 - onehot  # the true class never counts as a confusion: this zeroes the diagonal
    s = torch.softmax((logits - z_true.detach()) / tau, dim=1) * off  # softmax over all K, then masked
    g = torch.sigmoid((logits - z_true).detach()) * off  # "i beats j" gate, no gradient
    return (g * s).T @ onehot, onehot.sum(0)


def batch_confusion(logits: torch.Tensor, labels: torch.Tensor, tau: float, world_size: int = 1) -> torch.Tensor:
    """The surrogate C_t [K, K]; across DDP ranks, of the global micro-batch (values) and this rank's samples (gradients)."""
    sums, n = confusion_sums(logits, labels, tau)
    if world_size > 1 and dist.is_initialized():
        packed = torch.cat([sums, n[None]]).detach()
        dist.all_reduce(packed)
        # Value: the global sums. Gradient: world_size × this rank's, since DDP then averages the
        # ranks' gradients, which leaves the sum of every rank's own contribution (the true gradient).
        local = world_size * sums
        sums, n = local + (packed[:-1] - local).detach(), packed[-1]
    return sums / n.clamp(min=1)


def spectral_norm(c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """σ_max(C·diag(w)), exactly (differentiable where the top singular value is simple)."""
    return torch.linalg.svdvals(c * w[None, :])[0]


def training_class_counts(spec: RunSpec) -> list[int] | None:
    """Rows per class of the run's training split, or None when it has no `label` column."""
    from ftray.data import load_rows

    ds = load_rows(spec.data.source, spec.data.split, spec.data.max_samples)
    if "label" not in ds.column_names:
        return None
    return torch.bincount(torch.tensor(ds["label"], dtype=torch.long), minlength=spec.task.num_labels or 0).tolist()


@register
class CAR(Method):
    """Cross-entropy plus λ·σ_max of the EMA soft confusion matrix, columns weighted toward rare classes."""

    name = "car"
    paper = "Zhu et al. 2026, Confusion-Aware Spectral Regularizer for Long-Tailed Recognition (CVPR 2026, 2603.16732)"
    Config = CARConfig
    tasks = ("classification",)
    baseline = "full"
    bench = {"task": {"type": "classification"}, "data": {"source": "bundled:classification_lt", "max_len": 64},
             "train": {"max_steps": 60}}  # 1.5 epochs of the 318 long-tailed rows

    def __init__(self, config: CARConfig) -> None:
        super().__init__(config)
        self.counts: list[int] | None = config.class_counts
        self.counted = config.class_counts is not None  # counts known (given, counted or restored)
        self.ema: torch.Tensor | None = None  # sg(C̄) after the last micro-batch
        self._w: torch.Tensor | None = None

    def prepare_model(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        """Count the training rows per class (once; every rank reads the same rows)."""
        if not self.counted and self.config.weighting:
            self.counts, self.counted = training_class_counts(ctx.spec), True
            if self.counts is None:
                warnings.warn(f"car: {ctx.spec.data.source} has no 'label' column to count classes from; "
                              "using w ≡ 1 (set method class_counts to weight by frequency)", stacklevel=2)
        return model

    def weights(self, k: int, device: torch.device) -> torch.Tensor:
        """w [K] on `device` (ones without counts or with `weighting: false`)."""
        if self._w is None or self._w.numel() != k:
            c = self.config
            if not (c.weighting and self.counts):
                self._w = torch.ones(k)
            elif len(self.counts) > k:
                raise ValueError(f"car: class_counts has {len(self.counts)} classes but the head has {k} outputs")
            else:
                counts = torch.zeros(k, dtype=torch.long)
                counts[: len(self.counts)] = torch.tensor(self.counts)
                self._w = class_weights(counts, c.r0, c.normalize_weights, c.min_weight)
        return self._w.to(device)

    def loss(self, model: torch.nn.Module, batch: dict, out: Any, ctx: Context) -> tuple[torch.Tensor, dict[str, float]]:
        """λ·σ_max(C̄·diag(w)), with C̄ the EMA of this (global) micro-batch's surrogate."""
        c = self.config
        logits = out.logits.float()
        c_t = batch_confusion(logits, batch["labels"], c.tau, ctx.world_size)
        if self.ema is None or self.ema.shape != c_t.shape:
            c_bar = c_t.detach()
        else:
            c_bar = c.beta * self.ema.to(c_t.device) + (1 - c.beta) * c_t
        self.ema = c_bar.detach()
        spec = spectral_norm(c_bar, self.weights(logits.shape[1], logits.device))
        return c.lam * spec, {"car_spectral_norm": float(spec.detach())}

    def state_dict(self) -> dict[str, Any]:
        """The class counts and the EMA confusion matrix (identical on every rank)."""
        return {"counts": self.counts, "counted": self.counted, "ema": None if self.ema is None else self.ema.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counts and EMA; an explicit `class_counts` in the config wins over saved counts."""
        if self.config.class_counts is None:
            self.counts, self.counted = state["counts"], state["counted"]
        self.ema, self._w = state["ema"], None
