"""Core-tuning (Zhang, Hooi, Hu, Liang, Feng, NeurIPS 2021, arXiv 2102.06605): contrast-regularized fine-tuning.

Idea: add a focal supervised-contrastive loss on a projection of the pooled features, over a batch
enlarged with mixed "hard" features (hard negatives by mixing with a random partner, hard positives by
mixing an anchor's least-similar same-class sample with its most-similar other-class sample), and
train the classifier on those mixed features with soft labels to smooth the decision boundary.

Also holds the helpers DR-Tune shares (`classifier_head`, `head_weight`, `autocast_dtype`, `refuse_fsdp`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from pydantic import Field

from ftray.methods.base import Context, Method, MethodConfig
from ftray.methods.registry import register
from ftray.train.parallel import unwrap

if TYPE_CHECKING:
    from ftray.config import RunSpec

PROJECTOR = "core_projector"  # attribute name of the projector on the model (removed by finalize)


def classifier_head(model: torch.nn.Module) -> torch.nn.Module:
    """The linear head that reads `out.features` (`score` of *ForSequenceClassification), inside DDP/PEFT."""
    net = unwrap(model)
    net = net.get_base_model() if hasattr(net, "get_base_model") else net
    head = getattr(net, "score", None)
    if head is None:
        raise ValueError(f"{type(net).__name__} has no `score` head: these methods need task.type=classification")
    return head  # under PEFT a ModulesToSaveWrapper: calling it uses the trained copy


def head_weight(head: torch.nn.Module) -> torch.Tensor:
    """The head's [K, D] weight (the trainable copy under PEFT's modules_to_save)."""
    weights = [p for p in head.parameters() if p.dim() == 2]
    return next((p for p in weights if p.requires_grad), weights[0])


def autocast_dtype(ctx: Context) -> torch.dtype | None:
    """The autocast dtype the loop uses, for extra forwards (the loss hook is not given it)."""
    from ftray.train.loop import resolve_precision  # lazy: the loop imports the methods package

    return resolve_precision(ctx.spec.train.precision, ctx.device)


def refuse_fsdp(spec: RunSpec) -> None:
    """The head (and projector) are called outside the model's forward, where FSDP2 has not gathered them."""
    if spec.scaling.strategy == "fsdp":
        raise ValueError("scaling.strategy=fsdp is not supported (the head is called outside the model's forward); use ddp")


def beta_sample(alpha: float, n: int) -> torch.Tensor:
    """n draws of λ ~ Beta(α, α) via log-gammas: torch's Beta returns 0.5 when both gamma draws
    underflow (α ≲ 1e-3), whereas the true limit α → 0 puts λ at 0 or 1."""
    # Gamma(α) = Gamma(α+1)·U^(1/α), taken in log space so small α cannot underflow.
    g = torch.distributions.Gamma(torch.tensor(alpha + 1.0), torch.tensor(1.0)).sample((2, n))
    log_g = g.log() + torch.rand(2, n).clamp_min(1e-38).log() / alpha
    return torch.sigmoid(log_g[0] - log_g[1])


def mine_pairs(f: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per anchor: its least-similar same-class sample and most-similar other-class sample (cosine),
    each the anchor itself when there is none."""
    fn = F.normalize(f.detach().float(), dim=1)
    cos = fn @ fn.T
    same = y[:, None] == y[None]
    eye = torch.eye(len(y), dtype=torch.bool, device=y.device)
    own = torch.arange(len(y), device=y.device)
    pos = cos.masked_fill(~same | eye, float("inf")).argmin(1)
    pos = torch.where((same & ~eye).any(1), pos, own)
    neg = cos.masked_fill(same, float("-inf")).argmax(1)
    neg = torch.where((~same).any(1), neg, own)
    return pos, neg


def feature_mixup(f: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float, mix_min: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3B features (originals, hard negatives, hard positives) and their soft labels [3B, K].

    Randomness (the partner permutation, λ) comes from torch's global RNG, which the loop reseeds
    every step from (seed, rank, step), so a resumed run mixes as the original did.
    """
    b = len(f)
    onehot = F.one_hot(y, num_classes).to(f.dtype)
    perm = torch.randperm(b).to(f.device)
    lam = beta_sample(alpha, b).clamp(min=mix_min).to(f)[:, None]  # clamp: mostly the partner → a hard negative
    neg_f, neg_y = (1 - lam) * f + lam * f[perm], (1 - lam) * onehot + lam * onehot[perm]
    p, n = mine_pairs(f, y)
    lam = beta_sample(alpha, b).to(f)[:, None]
    pos_f, pos_y = lam * f[p] + (1 - lam) * f[n], lam * onehot[p] + (1 - lam) * onehot[n]
    return torch.cat([f, neg_f, pos_f]), torch.cat([onehot, neg_y, pos_y])


def supcon_terms(z: torch.Tensor, targets: torch.Tensor, tau: float, focal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair SupCon terms −pos_ab·(1−p_ab)^focal·log p_ab [N, N] and the positive mask.

    Positives are rows whose soft labels are identical; p_ab is the softmax over b ≠ a.
    """
    n = len(z)
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    log_p = (z @ z.T / tau).masked_fill(eye, float("-inf")).log_softmax(1).masked_fill(eye, 0.0)
    pos = torch.isclose(targets[:, None], targets[None], atol=1e-6).all(-1) & ~eye
    weight = 1 - log_p.exp() if focal else torch.ones_like(log_p)
    return -(pos * weight * log_p), pos


def focal_supcon(z: torch.Tensor, targets: torch.Tensor, tau: float) -> torch.Tensor:
    """Focal SupCon: per anchor the sum of its terms over N (=3B, the code's divisor, not the positive
    count), averaged over the anchors that have a positive."""
    terms, pos = supcon_terms(z, targets, tau)
    has = pos.any(1)
    per_anchor = terms.sum(1) / len(z)
    return per_anchor[has].mean() if has.any() else per_anchor.sum() * 0  # * 0: keep the projector in the graph


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of −Σ_k t_k log softmax(logits)_k."""
    return -(targets * logits.log_softmax(-1)).sum(-1).mean()


class CoreTuningConfig(MethodConfig):
    """Core-tuning's weights (paper's CIFAR/ResNet-50 MoCo-v2 settings)."""

    eta: float = Field(10.0, ge=0, description="η: weight of the focal contrastive loss (paper: 10; the spec's small-scale check scales it to 1).")
    alpha: float = Field(1.0, gt=0, description="α of the Beta(α, α) mixing coefficients (paper: 1).")
    mix_min: float = Field(0.8, ge=0, le=1, description="Hard negatives' λ is clamped to ≥ this (paper code: 0.8); 0 removes the clamp.")
    proj_dim: int = Field(256, ge=1, description="Output size of the projector Linear(D,D)→ReLU→Linear(D,proj_dim) (paper: 256).")
    temperature: float = Field(0.07, gt=0, description="τ of the contrastive softmax (paper: 0.07).")


@register
class CoreTuning(Method):
    """Soft-label CE on original + mixed hard features, plus η·focal SupCon on a projector, via `loss`.

    The loop already adds plain CE over the B originals (`out.logits`); the hook returns
    L_cls(3B) − CE(B) + η·L_con, so the total is exactly the paper's L_cls + η·L_con.

    Decisions [inf]:
    - Features are `out.features` (the last real token's final hidden state, which `score` reads);
      the classifier is the model's bias-free `score` head, as in the paper (Linear(D,K) without bias).
    - The projector is a float32 submodule `core_projector` added to the model in prepare_model, so DDP
      all-reduces its gradients, the optimizer and checkpoints (resume) hold it; `finalize` removes it
      and intermediate checkpoints' safetensors carry it as extra keys that transformers ignores.
    - Mixing is per rank on the local micro-batch (the paper's per-batch mixing); no state to sync.
    - With no other-class sample in the batch a hard positive mixes with the anchor itself.
    - The optimizer stays the run's AdamW: the paper's SGD-Nesterov (lr 0.01) was tuned for ResNets.
    - FSDP is refused: the head and projector run outside the model's forward.
    """

    name = "core_tuning"
    paper = "Zhang et al. 2021, Unleashing the Power of Contrastive Self-Supervised Visual Models via Contrast-Regularized Fine-Tuning (2102.06605)"
    Config = CoreTuningConfig
    tasks = ("classification",)
    bench = {"task": {"type": "classification"}, "data": {"source": "bundled:classification", "max_len": 64}}

    def check(self, spec: RunSpec) -> None:
        """Refuse FSDP."""
        refuse_fsdp(spec)

    def prepare_model(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        """Attach the projector (seeded like the rest of the init: identical on every rank)."""
        d = model.config.hidden_size
        setattr(model, PROJECTOR, torch.nn.Sequential(
            torch.nn.Linear(d, d), torch.nn.ReLU(), torch.nn.Linear(d, self.config.proj_dim)))
        return model

    def loss(self, model: torch.nn.Module, batch: dict, out: Any, ctx: Context) -> tuple[torch.Tensor, dict[str, float]]:
        """L_cls over the 3B rows minus the loop's CE over B, plus η·L_con."""
        c = self.config
        y, k = batch["labels"], out.logits.shape[1]
        feats, targets = feature_mixup(out.features, y, k, c.alpha, c.mix_min)
        head = classifier_head(model)
        mixed = head(feats[len(y):].to(head_weight(head).dtype)).float()
        l_cls = soft_cross_entropy(torch.cat([out.logits, mixed]), targets)
        z = F.normalize(getattr(unwrap(model), PROJECTOR)(feats.float()), dim=1)
        l_con = focal_supcon(z, targets, c.temperature)
        extra = l_cls - F.cross_entropy(out.logits, y) + c.eta * l_con
        return extra, {"core_cls": l_cls.item(), "core_con": l_con.item()}

    def finalize(self, model: torch.nn.Module, base: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        """Drop the projector: the exported model is the plain classifier."""
        if hasattr(model, PROJECTOR):
            delattr(model, PROJECTOR)
        return model
