"""Noise-robust losses: symmetric cross-entropy (SCE) and generalised cross-entropy (GCE), as used by NLKI.

Idea: with noisy labels, cross-entropy's gradient on a confidently wrong label is unbounded, so the
model memorises flipped labels; GCE (the L_q loss, between CE and MAE) and SCE (CE plus a reverse
CE that is bounded) cap each example's influence.

Per example, with p = softmax(z) clamped to [1e-7, 1] and y the label:
- `gce`:    λ·CE + (1−λ)·(1 − p_y^q)/q   (λ = 0 is plain GCE; NLKI's CE+GCE uses λ = 0.4, q = 0.7)
- `sce`:    α·CE + β·RCE, RCE = 4(1 − p_y) in the original form (Wang et al. 2019, log 0 := A = −4),
            or −p_y in NLKI's code form (`rce_form: nlki`, equal up to a constant and a factor 4).

Decisions:
- The loss replaces CE through the `criterion` hook, so it applies to whatever the task's logits
  are: the classification head's [B, K] logits, and for causal LM every answer token's
  full-vocabulary logits (one K-way problem per label token). The spec marks the causal-LM use as
  [inf]; the vocabulary-wide p_y is small for every token at the start, so GCE there learns slowly
  (its gradient is CE's times p_y^q) — use it on classification first.
- NLKI's default is the original RCE form (A = −4) as the spec recommends; the NLKI code form is an option.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ftray.methods.base import Context, Method, MethodConfig
from ftray.methods.registry import register


class NoiseRobustConfig(MethodConfig):
    """Which robust loss and its coefficients (NLKI / literature defaults)."""

    loss: Literal["gce", "sce"] = Field("gce", description="gce: λ·CE + (1−λ)·L_q; sce: α·CE + β·RCE.")
    q: float = Field(0.7, gt=0, le=1, description="GCE exponent: q→0 is CE, q=1 is MAE (Zhang & Sabuncu 2018; NLKI CRIC).")
    ce_weight: float = Field(0.4, ge=0, le=1, description="GCE: λ, the weight of CE in λ·CE + (1−λ)·GCE (NLKI's CE+GCE; 0 = pure GCE).")
    alpha: float = Field(0.1, ge=0, description="SCE: weight α of CE (Wang et al. 2019, CIFAR-10).")
    beta: float = Field(1.0, ge=0, description="SCE: weight β of the reverse CE.")
    rce_form: Literal["original", "nlki"] = Field("original", description="SCE's RCE: original −A(1−p_y) with A=−4, or NLKI's code form −p_y.")


def gce(logits: torch.Tensor, targets: torch.Tensor, q: float) -> torch.Tensor:
    """Per-example L_q loss (1 − p_y^q)/q, as −expm1(q·log p_y)/q (exact in float32 even for q → 0)."""
    log_p = logits.float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1).clamp(min=math.log(1e-7))
    return -torch.expm1(q * log_p) / q


def rce(logits: torch.Tensor, targets: torch.Tensor, form: str = "original") -> torch.Tensor:
    """Per-example reverse cross-entropy: 4(1 − p_y) (original, A = −4) or −p_y (NLKI code)."""
    p_y = logits.float().softmax(-1).clamp(1e-7, 1).gather(1, targets[:, None]).squeeze(1)
    return 4 * (1 - p_y) if form == "original" else -p_y


@register
class NoiseRobust(Method):
    """Replace cross-entropy with GCE (CE+GCE) or SCE, bounding mislabelled examples' influence."""

    name = "noise_robust"
    paper = "Dutta et al. 2025, NLKI (2508.19724); GCE: Zhang & Sabuncu 2018; SCE: Wang et al. 2019"
    Config = NoiseRobustConfig
    tasks = ("classification", "causal_lm")
    # 60 steps (480 rows, about half an epoch): long enough for plain CE to start fitting the flipped labels
    bench = {"task": {"type": "classification"}, "data": {"source": "bundled:classification_sym40", "max_len": 64},
             "train": {"max_steps": 60}}

    def criterion(self, logits: torch.Tensor, targets: torch.Tensor, ctx: Context) -> torch.Tensor:
        """The summed robust loss over non-ignored targets."""
        c = self.config
        keep = targets != -100
        logits, targets = logits[keep], targets[keep]
        ce = F.cross_entropy(logits.float(), targets, reduction="none")
        if c.loss == "gce":
            per = c.ce_weight * ce + (1 - c.ce_weight) * gce(logits, targets, c.q)
        else:
            per = c.alpha * ce + c.beta * rce(logits, targets, c.rce_form)
        return per.sum()
