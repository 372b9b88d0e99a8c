"""OwLore / OWS — Outlier-weighed Layerwise Sampled Low-Rank Projection (Li et al., 2405.18380).

LISA-style layer sampling: only γ decoder layers train at a time, redrawn every K steps with
probabilities proportional to each layer's outlier ratio (OWL's LOD: layers with more outliers are
sampled more often), and the sampled layers' matrices are trained with GaLore's low-rank gradient
projection to save optimizer memory. Embeddings, the final norm and lm_head always train.

Decisions where the spec infers or ftray differs (each is tested):
- LOD: A_ij = |W_ij|·‖X_j‖₂ over every linear of a layer, X the layer inputs on the first
  `calib_samples` training rows (OWL uses 128 C4 sequences); D_ℓ = share of A^ℓ above M·mean(A^ℓ),
  M = 13. If fewer than γ layers have outliers, every layer gets a 1% floor (sampling without
  replacement needs γ nonzero weights); no outliers at all, or `calib_samples: 0`, is uniform (LISA).
  Computed once, broadcast from rank 0, kept in `state_dict`.
- Frozen layers keep requires_grad (DDP needs a fixed set of parameters with gradients, and ftray's
  checkpoints keep only requires_grad weights, which would lose a layer trained in an earlier window);
  their gradients are dropped (grad=None) in `after_backward`, after the all-reduce, so neither AdamW's
  moments nor its weight decay touch them. The backward pass is still computed for all layers.
- The draw of round ⌊step/K⌋ is seeded with stable_seed(seed, round): identical on every rank and on resume.
- When a layer leaves the sample its optimizer state is dropped: state memory stays at γ layers, and a
  re-drawn layer starts with fresh moments in a freshly computed projection (a layer drawn again in the
  next round keeps its state, as in GaLore).
- GaLore is implemented here (`GaLoreAdamW`), not taken from `galore-torch` 1.0: that package imports
  bitsandbytes when imported, and its AdamW keeps a Python projector object in the optimizer state, which
  torch.distributed.checkpoint's get_state_dict (ftray's checkpointing) rejects. Here the projection is a tensor.
- Rank 128 (the paper per a reviewer; the code hard-codes 256, which is full rank for SmolLM2's k/v).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from pydantic import Field

from ftray.methods.base import Context, Method, MethodConfig, stable_seed
from ftray.methods.cofitune import probe_batches
from ftray.methods.hft import decoder_layers
from ftray.methods.registry import register


class OwLoreConfig(MethodConfig):
    gamma: int = Field(5, ge=1, description="Decoder layers trained at a time (γ); at most the model's layer count.")
    interval: int = Field(50, ge=1, description="Redraw the sampled layers every K optimizer steps.")
    outlier_m: float = Field(13.0, gt=0, description="A weight is an outlier when its score exceeds M × the layer's mean score.")
    calib_samples: int = Field(128, ge=0, description="Training rows whose activations weigh the outlier scores; 0 = uniform sampling (LISA).")
    rank: int = Field(128, ge=1, description="GaLore projection rank r (paper 128; the authors' code 256).")
    update_proj_gap: int = Field(100, ge=1, description="GaLore recomputes a matrix's projection (SVD of its gradient) every this many of its steps.")
    scale: float = Field(1.0, gt=0, description="GaLore scale α applied to the projected-back update.")
    proj_type: Literal["std", "reverse_std", "left", "right"] = Field(
        "std", description="GaLore side: 'std' projects the smaller dimension (r×n or m×r states), 'left'/'right' fix it.")


def layer_outlier_ratios(model: torch.nn.Module, batches: list[dict], m: float) -> torch.Tensor:
    """OWL's LOD per decoder layer: the share of |W_ij|·‖X_j‖₂ above m × the layer's mean."""
    device = next(model.parameters()).device
    linears = [[(f"{i}.{n}", mod) for n, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)]
               for i, (_, layer) in enumerate(decoder_layers(model))]
    sq: dict[str, torch.Tensor] = {}
    valid: list[torch.Tensor] = []

    def accumulate(key):
        def hook(mod, args):
            x = args[0].float() * valid[0][..., None]  # padding tokens do not count
            sq[key] = sq.get(key, 0) + x.pow(2).sum(dim=(0, 1))
        return hook

    hooks = [mod.register_forward_pre_hook(accumulate(key)) for layer in linears for key, mod in layer]
    try:
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
                valid[:] = [batch["attention_mask"].float()]
                model(**batch, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    ratios = []
    for layer in linears:
        scores = torch.cat([(mod.weight.float().abs() * sq[key].sqrt()).flatten() for key, mod in layer])
        ratios.append((scores > m * scores.mean()).float().mean())
    return torch.stack(ratios).cpu()


def sampling_probabilities(lod: torch.Tensor, gamma: int) -> torch.Tensor:
    """p_ℓ = D_ℓ / Σ D, with a 1% floor when fewer than γ layers have outliers; uniform when none do."""
    if lod.sum() <= 0:
        return torch.full_like(lod, 1 / len(lod))
    w = lod.clamp_min(0)
    if int((w > 0).sum()) < gamma:
        w = w + 0.01 * w.max()
    return w / w.sum()


def draw_layers(p: torch.Tensor, gamma: int, seed: int) -> list[int]:
    """γ layer indices without replacement, from a CPU generator seeded identically on every rank."""
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.multinomial(p, min(gamma, len(p)), replacement=False, generator=g).tolist())


def projection_side(shape: torch.Size, proj_type: str) -> str:
    """'left' keeps m×r projections (states r×n), 'right' r×n ones (states m×r)."""
    if proj_type in ("left", "right"):
        return proj_type
    smaller_rows = shape[0] < shape[1]
    return "left" if smaller_rows == (proj_type == "std") else "right"


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW; in groups with a `rank` key, 2-D gradients are projected onto their top-r singular subspace (GaLore, 2403.03507)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step; GaLore matrices keep their moments in the rank-r space and project the update back."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (beta1, beta2), lr = group["betas"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                side = projection_side(p.shape, group["proj_type"]) if "rank" in group and p.dim() == 2 else None
                if side and ("projection" not in state or int(state["step"]) % group["update_proj_gap"] == 0):
                    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
                    r = group["rank"]
                    state["projection"] = (u[:, :r] if side == "left" else vh[:r]).to(grad.dtype)
                if side:
                    proj = state["projection"]
                    grad = proj.T @ grad if side == "left" else grad @ proj.T
                if "exp_avg" not in state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + group["eps"])
                if side:
                    update = (proj @ update if side == "left" else update @ proj) * group["scale"]
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr)
        return loss


@register
class OwLore(Method):
    """Train γ outlier-weighted sampled decoder layers at a time, with GaLore projections on their matrices."""

    name = "owlore"
    paper = "Li et al. 2024, OwLore: Outlier-weighed Layerwise Sampled Low-Rank Projection for Memory-Efficient LLM Fine-tuning (2405.18380)"
    Config = OwLoreConfig
    incompatible = ("lora", "hft", "cofitune")
    baseline = "full"
    # The paper's lr; K=10 so a 40-step bench redraws the layers a few times instead of never.
    bench = {"train": {"lr": 3e-4}, "methods": [{"name": "owlore", "interval": 10}]}

    def __init__(self, config: OwLoreConfig) -> None:
        super().__init__(config)
        self.lod: torch.Tensor | None = None
        self.round, self.active = -1, []

    def check(self, spec) -> None:
        """GaLore needs each rank to hold whole gradient matrices."""
        if spec.scaling.strategy != "ddp":
            raise ValueError(f"methods: owlore's GaLore projection takes the SVD of whole gradient matrices; "
                             f"scaling.strategy={spec.scaling.strategy!r} shards them. Use scaling.strategy=ddp.")

    def prepare_model(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        """Every parameter stays trainable (see module docstring); compute the layer outlier ratios once."""
        for p in model.parameters():
            p.requires_grad_(True)
        if self.lod is None:
            n = len(decoder_layers(model))
            if self.config.calib_samples:
                batches = probe_batches(ctx, self.config.calib_samples, ctx.spec.train.batch_size)
                lod = layer_outlier_ratios(model.to(ctx.device), batches, self.config.outlier_m).to(ctx.device)
                if dist.is_initialized():
                    dist.broadcast(lod, src=0)
                self.lod = lod.cpu()
            else:
                self.lod = torch.zeros(n)
        return model

    def param_groups(self, model: torch.nn.Module, ctx: Context) -> list[dict]:
        """Decoder-block linears named *attn*/*mlp* get GaLore; embeddings, norms and lm_head plain AdamW."""
        galore = {id(mod.weight): mod.weight for _, layer in decoder_layers(model) for n, mod in layer.named_modules()
                  if isinstance(mod, torch.nn.Linear) and ("attn" in n or "mlp" in n) and mod.weight.requires_grad}
        plain = [p for p in model.parameters() if p.requires_grad and id(p) not in galore]
        c = self.config
        groups = [{"params": plain}, {"params": list(galore.values()), "rank": c.rank, "update_proj_gap": c.update_proj_gap,
                                      "scale": c.scale, "proj_type": c.proj_type}]
        return [g for g in groups if g["params"]]

    def optimizer(self, params: list, ctx: Context) -> torch.optim.Optimizer:
        """GaLore-AdamW with the run's lr, betas and weight decay."""
        t = ctx.spec.train
        return GaLoreAdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)

    def probabilities(self, n_layers: int) -> torch.Tensor:
        """The sampling probabilities p_ℓ."""
        return sampling_probabilities(self.lod if self.lod is not None else torch.zeros(n_layers), self.config.gamma)

    def on_step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: Context) -> None:
        """At step 0 and every K steps: draw γ layers; layers that enter or leave the sample lose their optimizer state."""
        rnd = ctx.step // self.config.interval
        if rnd == self.round:
            return
        layers = decoder_layers(model)
        active = draw_layers(self.probabilities(len(layers)), self.config.gamma, stable_seed("owlore", ctx.spec.train.seed, rnd))
        kept = set(self.active) & set(active)
        for i, (_, layer) in enumerate(layers):
            if i not in kept:  # also clears the placeholder state torch DCP gives every parameter on restore
                for p in layer.parameters():
                    optimizer.state.pop(p, None)
        self.round, self.active = rnd, active

    def after_backward(self, model: torch.nn.Module, ctx: Context) -> None:
        """Unsampled layers do not move: drop their (all-reduced) gradients."""
        for i, (_, layer) in enumerate(decoder_layers(model)):
            if i not in self.active:
                for p in layer.parameters():
                    p.grad = None

    def state_dict(self) -> dict:
        """Outlier ratios, the current round and its sampled layers."""
        return {"lod": self.lod, "round": self.round, "active": list(self.active)}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        self.lod, self.round, self.active = state.get("lod"), state.get("round", -1), list(state.get("active", []))
