"""DR-Tune (Zhou, Chen, Huang, ICCV 2023, arXiv 2308.12058): distribution regularization with semantic calibration.

Idea: the classification head must also classify features of the *frozen pre-trained* encoder,
after those are semantically calibrated toward the downstream feature distribution (a global
rotation plus a per-class translation); this regularises the head — and through it the encoder —
without tying the encoder's weights to the pre-trained ones.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field

from ftray.methods.base import Context, Method, MethodConfig
from ftray.methods.core_tuning import autocast_dtype, classifier_head, head_weight, refuse_fsdp
from ftray.methods.registry import register
from ftray.tasks.classification import forward
from ftray.train.parallel import unwrap

if TYPE_CHECKING:
    from ftray.config import RunSpec


def rotation(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """R, t minimising Σ‖R·x_i + t − y_i‖² over rotations (Kabsch; rows are paired points)."""
    mx, my = x.mean(0), y.mean(0)
    u, _, vh = torch.linalg.svd((x - mx).T @ (y - my))
    v = vh.T
    fix = torch.ones(len(mx), dtype=x.dtype, device=x.device)
    fix[-1] = torch.where(torch.linalg.det(v @ u.T) < 0, -1.0, 1.0)  # a proper rotation, not a reflection
    r = v @ torch.diag(fix) @ u.T
    return r, my - r @ mx


def translate(q_p: torch.Tensor, q_d: torch.Tensor, y: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """Shift each class of q_p so its mean becomes the head-weighted mean of q_d's same class."""
    out = q_p.clone()
    for c in y.unique():
        rows = y == c
        attention = torch.softmax(q_d[rows] @ w_hat[c], 0)  # closer to the class's head row → more weight
        out[rows] += attention @ q_d[rows] - q_p[rows].mean(0)
    return out


def calibrate(q_p: torch.Tensor, q_d: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
              r: torch.Tensor, t: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Q̃_p: normalise, rotate (x → R·x + t), translate per class, renormalise to norm `scale`."""
    q_p, q_d = F.normalize(q_p, dim=1), F.normalize(q_d, dim=1)
    shifted = translate(q_p @ r.T + t, q_d, y, F.normalize(w, dim=1))
    return F.normalize(shifted, dim=1) * scale


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank (rank order), so every rank enqueues the same rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())  # micro-batches are equal-sized on every rank (the loop's plan)
    return torch.cat(parts)


class DRTuneConfig(MethodConfig):
    """DR-Tune's queue and calibration settings (paper's CIFAR config)."""

    queue_size: int = Field(2048, ge=1, description="K_q: rows in the feature queues (paper: 2048; the spec's small check: 256).")
    rotate_every: int = Field(10, ge=1, description="Recompute the rotation R, t every this many micro-batches (paper: 10).")
    queue_weight: float = Field(1.0, ge=0, description="Weight of each calibrated pre-trained row in the joint CE mean; 1 = the paper's one "
                                "mean over B+K_q rows, 0 = plain CE.")
    head_lr_mult: float = Field(1.0, gt=0, description="Head lr = train.lr × this. The paper's SGD uses 0.33/0.01 = 33; with AdamW "
                                "(per-parameter step sizes) that ratio does not transfer, so 1.")
    warmup: bool = Field(True, description="Fill both queues with frozen-encoder features of training batches before the first step (paper).")


@register
class DRTune(Method):
    """CE over [d; Q̃_p] with [y; Q_y]: the head also classifies calibrated frozen-encoder features.

    Per micro-batch (in `loss`): p = frozen-encoder features of the batch (no grad), warm-up on the
    first call, Q̃_p = calibrate(Q_p, Q_d) (no grad), the joint CE, then FIFO-enqueue (d, p, y). The
    loop adds CE over the B rows; the hook returns the difference to the joint mean,
    s·(CE(Q̃_p) − CE(d)) with s = w·K/(B + w·K), so the total is (B·CE(d) + w·K·CE(Q̃_p)) / (B + w·K).

    Decisions [inf]:
    - The frozen encoder is a deep copy of the pre-trained model made in prepare_model (eval mode, no
      grad; SmolLM2-135M fp32 ≈ 0.5 GB), not a precomputed class statistic: the spec's queues hold
      per-sample pre-trained features of the current batches. On resume prepare_model again sees the
      freshly loaded pre-trained weights. If the model is already PEFT-wrapped (lora listed before
      dr_tune), no copy is made: the base model with adapters disabled is the frozen encoder.
    - Queues, rotation and counters are method state (state_dict → resume). Every rank enqueues the
      all-gathered rows of all ranks, so queues and calibration are identical across DDP ranks.
    - Features are `out.features` (last real token's final hidden state, what `score` reads).
    - "Every 10 iterations" counts micro-batches (one forward each, like the paper's iterations);
      between recomputations the cached R, t is applied to the current queue.
    - The joint mean uses plain CE on the B rows even if another method replaces the criterion.
    - The optimizer stays the run's AdamW (see head_lr_mult); FSDP is refused (head called outside forward).
    """

    name = "dr_tune"
    paper = "Zhou et al. 2023, DR-Tune: Improving Fine-tuning of Pretrained Visual Models by Distribution Regularization with Semantic Calibration (2308.12058)"
    Config = DRTuneConfig
    tasks = ("classification",)
    bench = {"task": {"type": "classification"}, "data": {"source": "bundled:classification", "max_len": 64}}

    def __init__(self, config: DRTuneConfig) -> None:
        super().__init__(config)
        self.reference: torch.nn.Module | None = None
        self.queue: dict[str, torch.Tensor] = {}  # d, p [K, D]; y [K]; r [D, D]; t [D]
        self.ptr, self.count, self.calls = 0, 0, 0

    def check(self, spec: RunSpec) -> None:
        """Refuse FSDP."""
        refuse_fsdp(spec)

    def prepare_model(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        """Keep the frozen pre-trained encoder (a copy, or the PEFT base with adapters disabled)."""
        if hasattr(model, "disable_adapter"):
            self.reference = None
        else:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False).to(ctx.device)
        return model

    def param_groups(self, model: torch.nn.Module, ctx: Context) -> list[dict[str, Any]] | None:
        """The head in its own group at lr × head_lr_mult (None when the multiplier is 1)."""
        if self.config.head_lr_mult == 1:
            return None
        head = {id(p) for p in classifier_head(model).parameters()}
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if id(p) not in head]},
                  {"params": [p for p in params if id(p) in head], "lr": ctx.spec.train.lr * self.config.head_lr_mult}]
        return [g for g in groups if g["params"]]

    @torch.no_grad()
    def pretrained_features(self, model: torch.nn.Module, batch: dict, ctx: Context) -> torch.Tensor:
        """f_pre(x): the frozen encoder's pooled features."""
        amp = autocast_dtype(ctx)
        if self.reference is not None:
            return forward(self.reference, batch, amp).features
        net = unwrap(model)
        with net.disable_adapter():  # LoRA dropout is off too with adapters disabled
            return forward(net, batch, amp).features

    def loss(self, model: torch.nn.Module, batch: dict, out: Any, ctx: Context) -> tuple[torch.Tensor | None, dict[str, float]]:
        """s·(CE(head(Q̃_p), Q_y) − CE(d)), then enqueue this micro-batch."""
        d, y = out.features, batch["labels"]
        p = self.pretrained_features(model, batch, ctx)
        self._allocate(d.shape[1], d.device)
        if self.config.warmup and self.count < self.config.queue_size:
            self._warm_up(model, batch, ctx)
        extra, metrics = None, {}
        if self.count:
            head = classifier_head(model)
            w = head_weight(head)
            q_tilde = self._calibrated(w.detach().float(), d.detach().norm(dim=1).mean())
            q_y = self.queue["y"][: self.count].clone()  # the enqueue below writes the queue in place
            ce_q = F.cross_entropy(head(q_tilde.to(w.dtype)).float(), q_y)  # Q̃_p is detached: trains the head only
            share = self.config.queue_weight * self.count / (len(y) + self.config.queue_weight * self.count)
            extra = share * (ce_q - F.cross_entropy(out.logits, y))
            metrics = {"dr_queue_ce": ce_q.item()}
        self._enqueue(gather_rows(d.detach().float()), gather_rows(p.float()), gather_rows(y))
        self.calls += 1
        return extra, metrics

    @torch.no_grad()
    def _calibrated(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        q_p, q_d, q_y = (self.queue[k][: self.count] for k in ("p", "d", "y"))
        if self.calls % self.config.rotate_every == 0 or "r" not in self.queue:
            self.queue["r"], self.queue["t"] = rotation(F.normalize(q_p, dim=1), F.normalize(q_d, dim=1))
        return calibrate(q_p, q_d, q_y, w, self.queue["r"], self.queue["t"], scale)

    @torch.no_grad()
    def _warm_up(self, model: torch.nn.Module, batch: dict, ctx: Context) -> None:
        """Fill both queues with frozen-encoder features (the count is the same on every rank, so the
        number of all-gathers is too)."""
        while self.count < self.config.queue_size:
            b = ctx.draw_batch() if ctx.draw_batch is not None else batch
            p = gather_rows(self.pretrained_features(model, b, ctx).float())
            self._enqueue(p, p, gather_rows(b["labels"]))

    def _allocate(self, dim: int, device: torch.device) -> None:
        if "d" not in self.queue:
            k = self.config.queue_size
            self.queue = {"d": torch.zeros(k, dim), "p": torch.zeros(k, dim), "y": torch.zeros(k, dtype=torch.long)}
        self.queue = {k: v.to(device) for k, v in self.queue.items()}  # after a resume they come back on CPU

    def _enqueue(self, d: torch.Tensor, p: torch.Tensor, y: torch.Tensor) -> None:
        """FIFO: overwrite the oldest rows (keep the last K when more arrive at once)."""
        k = self.config.queue_size
        d, p, y = d[-k:], p[-k:], y[-k:]
        idx = (self.ptr + torch.arange(len(y), device=y.device)) % k
        for name, rows in (("d", d), ("p", p), ("y", y)):
            self.queue[name][idx] = rows.to(self.queue[name].dtype)
        self.ptr, self.count = (self.ptr + len(y)) % k, min(k, self.count + len(y))

    def state_dict(self) -> dict[str, Any]:
        """Queues, rotation, FIFO pointer and counters (on CPU)."""
        return {"queue": {k: v.cpu() for k, v in self.queue.items()}, "ptr": self.ptr, "count": self.count, "calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned."""
        if state:
            self.queue, self.ptr, self.count, self.calls = dict(state["queue"]), state["ptr"], state["count"], state["calls"]
