"""NoiseFiT — Noise-Augmented Fine-Tuning (Khadangi et al., 2504.03302).

Pick k decoder layers by a signal-to-noise ratio once, then at every step run two extra forward passes
with adaptive, token-wise Gaussian noise added to those layers' outputs and train on a hybrid loss:
α·CE(clean) + (1−α)·½[KL(p‖q₁) + KL(p‖q₂)] + λ·KL(q₂‖q₁), aiming at fewer hallucinations.

Decisions where the spec is silent or marked inferred (each is tested in tests/methods/test_noisefit.py):
- The noise scale (MAD, weights, variance factor, std) is computed on detached hidden states: the noise
  is a perturbation, not a path by which the model could learn to shrink its own noise.
- Per-token statistics run over the hidden dimension; `mean Var` and `std(h)` over every token of the
  micro-batch, padding included; the MAD floor is 1e-6 times the token's L2 norm (plus 1e-12 for
  all-zero rows, which would otherwise divide by zero).
- SNR uses `hidden_states[1:]` as the authors' code does, so the last layer is scored after the final
  norm although its noise is added before it. The scores are averaged over ranks before the top-k, so
  every DDP/FSDP rank noises the same layers; the 10 SNR draws use a generator seeded by train.seed.
- Selection happens on the first training micro-batch (eval mode: no dropout) and is kept in the
  checkpoint, so a resumed run does not re-select. k larger than the model's layer count noises all.
- The hooks exist only during the two noisy passes of `loss` (removed in a `finally`), so the loop's
  clean forward, eval and export always see the plain model.
- The loop adds its own CE (mean over label tokens); this hook adds (α−1)·CE on the same logits plus
  the KL terms, so the total is the paper's L. Combined with a method that replaces the criterion,
  α scales only the CE part. NF4 quantisation is left out (QLoRA is a memory trick of the paper's
  setup); the paper's adapter setup is `lora` with its defaults (r 8, α 16, q/v), listed before this.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field

from ftray.methods.base import Context, Method, MethodConfig, stable_seed
from ftray.methods.hft import decoder_layers
from ftray.methods.registry import register
from ftray.train.loss import MODEL_INPUTS, forward_and_loss
from ftray.train.parallel import unwrap


class NoiseFiTConfig(MethodConfig):
    k: int = Field(3, ge=1, description="Number of decoder layers that receive noise (more than the model has: all).")
    select: Literal["largest", "smallest"] = Field(
        "largest", description="Noise the k layers with the highest SNR ('Largest', the paper's default) or the lowest."
    )
    sigma: float = Field(0.1, ge=0, description="Noise level σ; 0 turns the noise (and both KL terms) off.")
    square_sigma: bool = Field(
        True, description="Training noise uses base_std = σ²·std(h) as the authors' v1 code does; False uses σ·std(h) "
        "as the SNR step does.",
    )
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the clean cross-entropy; (1−α) weighs the clean→noisy KL.")
    lam: float = Field(0.1, ge=0, description="λ, weight of the noisy↔noisy consistency KL(q₂‖q₁) (repo v2 default: 0.05).")
    beta: float = Field(0.1, gt=0, description="β in the per-element weight w = exp(−β|h−m|/MAD).")
    max_factor: float = Field(5.0, ge=1, description="Cap of the variance factor f = exp(Var_d(h)/mean Var).")
    snr_draws: int = Field(10, ge=1, description="Noise draws averaged for each layer's noise level in the SNR.")


def noise_scale(h: torch.Tensor, base_std: float | torch.Tensor, beta: float, max_factor: float) -> torch.Tensor:
    """Per-element noise std base_std·MAD·w·f for hidden states h [B, T, d] (float32, no gradient)."""
    h = h.detach().float()
    median = h.median(-1, keepdim=True).values
    dev = (h - median).abs()
    mad = torch.maximum(dev.median(-1, keepdim=True).values, 1e-6 * h.norm(dim=-1, keepdim=True)).clamp_min(1e-12)
    w = torch.exp(-beta * dev / mad)
    var = h.var(-1, keepdim=True)
    f = torch.exp(var / var.mean().clamp_min(1e-12)).clamp(max=max_factor)  # exp may overflow to inf: the cap catches it
    return base_std * mad * w * f


def layer_snr(hidden: list[torch.Tensor], sigma: float, beta: float, max_factor: float, draws: int,
              generator: torch.Generator) -> torch.Tensor:
    """SNR_ℓ = mean|h_ℓ| / (mean over draws of mean|ĥ_ℓ − h_ℓ| + 1e-6), with base_std = σ·std(h_ℓ)."""
    scores = []
    for h in hidden:
        h = h.detach().float()
        scale = noise_scale(h, sigma * h.std(), beta, max_factor)
        eps = torch.randn((draws, *h.shape), generator=generator).to(h.device)
        scores.append(h.abs().mean() / ((eps * scale).abs().mean() + 1e-6))
    return torch.stack(scores)


def pick_layers(snr: torch.Tensor, k: int, select: str) -> list[int]:
    """Indices of the k highest- (or lowest-) SNR layers, ascending."""
    k = min(k, snr.numel())
    return sorted(torch.topk(snr, k, largest=select == "largest").indices.tolist())


@contextlib.contextmanager
def noisy(layers: list[torch.nn.Module], coeff: float, beta: float, max_factor: float) -> Iterator[None]:
    """Add ε⊙(coeff·std(h)·MAD·w·f) to each layer's output hidden states while inside the block."""

    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        h = output[0] if isinstance(output, tuple) else output  # transformers ≥ 5 returns the tensor itself
        scale = noise_scale(h, coeff * h.detach().float().std(), beta, max_factor)
        noisy_h = h + (torch.randn_like(scale) * scale).to(h.dtype)  # global RNG: the loop reseeds it per step
        return (noisy_h, *output[1:]) if isinstance(output, tuple) else noisy_h

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def token_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) summed over the vocabulary, averaged over the rows (label tokens); temperature 1."""
    if p_logits.shape[0] == 0:
        return p_logits.sum() * 0
    log_p, log_q = F.log_softmax(p_logits.float(), -1), F.log_softmax(q_logits.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


@register
class NoiseFiT(Method):
    """Noise k SNR-selected layers in two extra passes; train on clean CE + clean→noisy KL + noisy↔noisy KL."""

    name = "noisefit"
    paper = "Khadangi et al. 2025, Noise-Augmented Fine-Tuning for Mitigating Hallucinations in LLMs (2504.03302)"
    Config = NoiseFiTConfig
    baseline = "lora"  # the paper trains LoRA r 8 / α 16 on q,v: compare with plain LoRA on the same adapter
    # LoRA's defaults are the paper's adapter; lr: the LoRA baseline's bench rate (the paper's 5e-5 is for 1000 steps).
    bench = {"methods": [{"name": "lora"}, {"name": "noisefit"}], "train": {"lr": 1e-3}}

    def __init__(self, config: NoiseFiTConfig) -> None:
        super().__init__(config)
        self.selected: list[int] | None = None

    def loss(self, model: torch.nn.Module, batch: dict, out: Any, ctx: Context) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Two noisy passes through the selected layers; returns the hybrid loss minus the loop's CE."""
        c, inner = self.config, unwrap(model)
        layers = [m for _, m in decoder_layers(inner)]
        if self.selected is None:
            self.selected = self.select(inner, batch, ctx)
        amp = out.logits.dtype if out.logits.dtype != torch.float32 else None  # the clean pass's autocast dtype
        coeff = c.sigma**2 if c.square_sigma else c.sigma
        with noisy([layers[i] for i in self.selected], coeff, c.beta, c.max_factor):
            q1, _, _ = forward_and_loss(inner, batch, amp)
            q2, _, _ = forward_and_loss(inner, batch, amp)
        targets = batch["labels"][:, batch["logit_positions"] + 1]
        mask = targets != -100
        p, q1, q2 = out.logits[mask].float(), q1.logits[mask].float(), q2.logits[mask].float()
        ce = F.cross_entropy(p, targets[mask], reduction="sum") / mask.sum().clamp(min=1)
        kl_noisy = 0.5 * (token_kl(p, q1) + token_kl(p, q2))
        kl_consistency = token_kl(q2, q1)
        hybrid = c.alpha * ce + (1 - c.alpha) * kl_noisy + c.lam * kl_consistency
        metrics = {"noisefit_loss": hybrid.item(), "noisefit_kl_noisy": kl_noisy.item(), "noisefit_kl_consistency": kl_consistency.item()}
        return hybrid - ce, metrics  # the loop adds CE(p) itself

    @torch.no_grad()
    def select(self, model: torch.nn.Module, batch: dict, ctx: Context) -> list[int]:
        """The k layers by SNR on `batch`, identical on every rank (scores averaged before the top-k)."""
        c, was_training = self.config, model.training
        model.eval()  # no dropout: the scores depend on the batch and the noise draws only
        try:
            inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
            out = model(**inputs, output_hidden_states=True, use_cache=False, logits_to_keep=1)
        finally:
            model.train(was_training)
        hidden = list(out.hidden_states[1:])
        n_layers = len(decoder_layers(model))
        if len(hidden) != n_layers:
            raise ValueError(f"noisefit: the model returned {len(hidden)} hidden states for {n_layers} decoder layers")
        generator = torch.Generator().manual_seed(stable_seed("noisefit", ctx.spec.train.seed))
        snr = layer_snr(hidden, c.sigma, c.beta, c.max_factor, c.snr_draws, generator)
        if dist.is_initialized():
            dist.all_reduce(snr)
            snr /= dist.get_world_size()
        return pick_layers(snr.cpu(), c.k, c.select)

    def state_dict(self) -> dict[str, Any]:
        """The selected layer indices (None before the first step)."""
        return {"selected": self.selected}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the selection so a resumed run noises the same layers."""
        self.selected = state.get("selected")
