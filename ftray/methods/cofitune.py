"""CoFiTune — coarse to fine fine-tuning (Zhang et al., ACL 2024 Findings).

Balance speciality and versatility in two levels: a coarse choice of which modules in which layer range
train (the paper's tree search found FFN up_proj + down_proj in the second quarter of the layers), and a
fine soft mask that scales each FFN unit's gradient by (1 − importance), the importance measured on a
probe set, so units important for the model's behaviour change less.

Decisions where the spec infers or the paper's setup does not fit ftray (each is tested):
- The coarse tree search is a sweep over `layers` and `modules` (tune_spaces/cofitune.yaml);
  the method trains one node, by default the paper's result. Layers are [⌊N·start⌋, ⌊N·end⌋), which gives
  the paper's 8–15 / 10–19 / 15–29 for 32 / 40 / 60 layers and 7–14 for SmolLM2's 30; at least one layer.
- Probe set: the first `probe_samples` training rows, loaded and tokenized in `prepare_model` through
  ftray.data (the paper uses its SFT data); more `probe_sources` combine by element-wise max.
- The stochastic passes need dropout that Llama lacks: a dropout of `dropout` on the MLP's intermediate
  activation (the input of down_proj), only while probing. Importance is computed once, with a fixed
  seed and broadcast from rank 0, and kept in `state_dict` (a resumed run does not recompute it).
- The soft mask scales whole rows of up_proj.weight (unit j of d_ff) and down_proj.weight (unit i of d),
  after the DDP all-reduce; other chosen modules (q/k/v/o/gate) train without a soft mask.
- Decoupled weight decay (the paper's 0.1) still shrinks a unit with I = 1; only its gradient is zero.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, model_validator

from ftray.data import collate, detect_format, load_rows, tokenize_dataset
from ftray.methods.base import Context, Method, MethodConfig, stable_seed
from ftray.methods.hft import decoder_layers
from ftray.methods.registry import register

Module = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
KL_WEIGHT = 0.1  # the paper's 0.1·KL; a constant factor, removed again by the per-layer standardisation


class CoFiTuneConfig(MethodConfig):
    layers: tuple[float, float] = Field((0.25, 0.5), description="Coarse level: trained layers [start, end) as fractions of depth (paper: 25%–50%).")
    modules: list[Module] = Field(["up_proj", "down_proj"], min_length=1,
                                  description="Coarse level: projections trained in those layers (paper: FFN up_proj + down_proj).")
    soft_mask: bool = Field(True, description="Fine level: scale up/down unit gradients by 1 − importance; False = coarse only.")
    probe_samples: int = Field(64, ge=1, description="Training rows whose importance the soft mask protects (the paper uses its SFT data).")
    probe_batch_size: int = Field(4, ge=1, description="Rows per probe forward pass.")
    probe_sources: list[str] = Field([], description="Extra probe data sources (same syntax as data.source); importances combine by element-wise max.")
    dropout: float = Field(0.003, gt=0, lt=1, description="Dropout on the MLP activation during the two stochastic probe passes (paper: 0.003).")

    @model_validator(mode="after")
    def _range(self) -> CoFiTuneConfig:
        start, end = self.layers
        if not 0 <= start < end <= 1:
            raise ValueError(f"layers: expected 0 <= start < end <= 1 (fractions of depth), got {list(self.layers)}")
        return self


def layer_range(n_layers: int, start: float, end: float) -> list[int]:
    """Indices [⌊N·start⌋, ⌊N·end⌋), at least one layer."""
    lo = min(int(n_layers * start + 1e-9), n_layers - 1)  # 1e-9: 0.29 * 100 is 28.999…
    return list(range(lo, max(lo + 1, int(n_layers * end + 1e-9))))


def module_path(name: str) -> str:
    """Where a projection sits inside a decoder block."""
    return f"self_attn.{name}" if name in ATTENTION else f"mlp.{name}"


def probe_batches(ctx: Context, n_rows: int, batch_size: int, source: str | None = None) -> list[dict[str, torch.Tensor]]:
    """The first `n_rows` rows of `source` (default: the training data), tokenized and collated like training batches."""
    spec = ctx.spec
    src = source or spec.data.source
    ds = load_rows(src, spec.data.split, n_rows)
    fmt = spec.data.format if spec.data.format != "auto" and source is None else detect_format(ds, src)
    rows = tokenize_dataset(ds, ctx.tokenizer, fmt, spec.data.max_len, source_name=f"{src} (probe rows)").to_list()
    return [collate(rows[i : i + batch_size], ctx.tokenizer.pad_token_id) for i in range(0, len(rows), batch_size)]


def standardized_importance(g: torch.Tensor) -> torch.Tensor:
    """Per layer (row): |tanh((g − mean) / std)|, in [0, 1)."""
    std = g.std(dim=1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
    return torch.tanh((g - g.mean(dim=1, keepdim=True)) / std).abs()


def importance_vectors(model: torch.nn.Module, layers: list[int], batches: list[dict], dropout: float, seed: int) -> dict[str, torch.Tensor]:
    """Importance of up_proj output units ("in", L×d_ff) and down_proj output units ("out", L×d) of `layers`.

    Virtual unit masks m = 1 multiply the outputs; two dropout passes per batch give 0.1·KL(p₁‖p₂) (batch
    mean); ∂L/∂m is summed over batches, divided by the token count and standardised per layer.
    """
    blocks = [decoder_layers(model)[i][1].mlp for i in layers]
    device = next(model.parameters()).device
    m_in = torch.ones(len(blocks), blocks[0].up_proj.out_features, device=device, requires_grad=True)
    m_out = torch.ones(len(blocks), blocks[0].down_proj.out_features, device=device, requires_grad=True)
    hooks = []
    for k, mlp in enumerate(blocks):
        hooks.append(mlp.up_proj.register_forward_hook(lambda mod, args, out, k=k: out * m_in[k].to(out.dtype)))
        hooks.append(mlp.down_proj.register_forward_pre_hook(lambda mod, args: (F.dropout(args[0], dropout, training=True),)))
        hooks.append(mlp.down_proj.register_forward_hook(lambda mod, args, out, k=k: out * m_out[k].to(out.dtype)))
    grad_flags = {p: p.requires_grad for p in model.parameters()}
    for p in grad_flags:
        p.requires_grad_(False)  # gradients for the masks only
    tokens = 0
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)  # the same dropout draws on every rank and on a rerun
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
                valid = batch["attention_mask"].bool()
                logp = [F.log_softmax(model(**batch, use_cache=False).logits[valid].float(), -1) for _ in range(2)]
                kl = F.kl_div(logp[1], logp[0], log_target=True, reduction="sum") / valid.shape[0]
                (KL_WEIGHT * kl).backward()
                tokens += int(valid.sum())
    finally:
        for h in hooks:
            h.remove()
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
    return {"in": standardized_importance(m_in.grad / tokens), "out": standardized_importance(m_out.grad / tokens)}


@register
class CoFiTune(Method):
    """Train only the chosen modules of the chosen layer range, with importance-scaled unit gradients."""

    name = "cofitune"
    paper = "Zhang et al. 2024, Balancing Speciality and Versatility: a Coarse to Fine Framework for Supervised Fine-tuning Large Language Model (ACL 2024 Findings)"
    Config = CoFiTuneConfig
    incompatible = ("lora", "hft", "owlore")
    baseline = "full"

    def __init__(self, config: CoFiTuneConfig) -> None:
        super().__init__(config)
        self.importance: dict[str, torch.Tensor] | None = None

    def check(self, spec) -> None:
        """The soft mask scales full gradient rows, which FSDP shards."""
        if self.config.soft_mask and spec.scaling.strategy != "ddp":
            raise ValueError(f"methods: cofitune's soft mask scales whole gradient rows; scaling.strategy={spec.scaling.strategy!r} "
                             "shards them. Use scaling.strategy=ddp, or soft_mask: false for the coarse level alone.")

    def layer_indices(self, model: torch.nn.Module) -> list[int]:
        """The coarse level's layer indices for this model."""
        return layer_range(len(decoder_layers(model)), *self.config.layers)

    def prepare_model(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        """Freeze everything but the chosen modules; compute the importance vectors once."""
        blocks, layers = decoder_layers(model), self.layer_indices(model)
        train = {f"{blocks[i][0]}.{module_path(m)}." for i in layers for m in self.config.modules}
        for n, p in model.named_parameters():
            p.requires_grad_(any(n.startswith(t) for t in train))
        if self.config.soft_mask and self.importance is None:
            self.importance = self._compute_importance(model.to(ctx.device), layers, ctx)
        return model

    def _compute_importance(self, model: torch.nn.Module, layers: list[int], ctx: Context) -> dict[str, torch.Tensor]:
        sources = [None, *self.config.probe_sources]
        seed = stable_seed("cofitune", ctx.spec.train.seed)
        parts = [importance_vectors(model, layers, probe_batches(ctx, self.config.probe_samples, self.config.probe_batch_size, s),
                                    self.config.dropout, seed) for s in sources]
        imp = {k: torch.stack([p[k] for p in parts]).amax(0) for k in ("in", "out")}
        if dist.is_initialized():  # bit-identical masks on every rank, whatever the hardware did
            for t in imp.values():
                dist.broadcast(t, src=0)
        return {k: v.cpu() for k, v in imp.items()}

    def after_backward(self, model: torch.nn.Module, ctx: Context) -> None:
        """grad(up_proj.W[j, :]) *= 1 − I_in[j] and grad(down_proj.W[i, :]) *= 1 − I_out[i], per chosen layer."""
        if not self.config.soft_mask:
            return
        blocks = decoder_layers(model)
        for k, i in enumerate(self.layer_indices(model)):
            mlp = blocks[i][1].mlp
            for linear, key in ((mlp.up_proj, "in"), (mlp.down_proj, "out")):
                for p in linear.parameters():  # the weight's rows and, if any, the bias entries
                    if p.grad is not None:
                        scale = (1 - self.importance[key][k]).to(p.grad.device, p.grad.dtype)
                        p.grad.mul_(scale.view(-1, *[1] * (p.grad.dim() - 1)))

    def state_dict(self) -> dict:
        """The importance vectors (computed once; a resumed run keeps them)."""
        return {"importance": self.importance}

    def load_state_dict(self, state: dict) -> None:
        """Restore the importance vectors."""
        self.importance = state.get("importance")
