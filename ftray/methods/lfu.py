"""LfU — Learning from the Undesirable (AAAI 2026, arXiv 2511.13052).

A regulariser for SFT: each step simulates an "undesirable" update — one normalised gradient-ascent
step on the SFT loss of another batch — and asks every layer's hidden states under that perturbation
to stay equal to the clean (detached) hidden states: representation-level augmentation plus
consistency, against overfitting and forgetting. This is the paper's LoRA variant; the RepS variant
(learned per-layer steering vectors with their own Adam) is left out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch.func import functional_call

from ftray.methods.base import Context, Method, MethodConfig
from ftray.methods.registry import register
from ftray.train.loss import MODEL_INPUTS, forward_and_loss
from ftray.train.parallel import unwrap

if TYPE_CHECKING:
    from ftray.config import RunSpec


class LfUConfig(MethodConfig):
    alpha: float = Field(0.1, ge=0, description="Ascent step size α: θ_aux = θ + α·g/‖g‖₂ (global norm over trainable tensors).")
    beta: float = Field(5.0, ge=0, description="Consistency weight β (paper: 5 for the LoRA variant, 0.1 for RepS).")
    start: int = Field(0, ge=0, description="First hidden state in L_cons; 0 is the embedding output (HF `hidden_states` indexing).")
    finish: int = Field(
        -1, ge=-1, description="Last hidden state in L_cons, inclusive; -1 = the last one (the paper's 0–32 on a 32-layer model = all)."
    )

    @model_validator(mode="after")
    def _ordered(self) -> LfUConfig:
        if self.finish != -1 and self.finish < self.start:
            raise ValueError(f"finish ({self.finish}) must be -1 or >= start ({self.start})")
        return self


@register
class LfU(Method):
    """Consistency of hidden states under a simulated gradient-ascent step (LoRA variant), via `loss`.

    Per micro-batch x, inside the `loss` hook (model unwrapped from DDP for every extra forward):

    1. x′ = `ctx.draw_batch()` (outside the loop, where there is none, x′ = x); g = ∇θ L_SFT(θ; x′)
       with `torch.autograd.grad`, so the accumulated `.grad` of earlier micro-batches is never
       touched (nothing to save or restore) and DDP's reducer hooks do not fire.
    2. θ_aux = θ + α·g/‖g‖₂, built *out of place* and used through `torch.func.functional_call`:
       θ itself is never written, so it is "restored" bit-exactly by construction, and the gradient
       of L_cons flows to θ evaluated at θ_aux (the spec's SAM-like first-order reading) [inf].
    3. H = clean hidden states of x (an extra no-grad forward: the loop's forward does not return
       hidden states; H is a stop-gradient target anyway), H′ = hidden states of x at θ_aux.
    4. L_cons = mean over hidden states [start, finish] of MSE(H′, H) on label positions; β·L_cons is
       returned (the loop divides by the accumulation steps, as the paper does).

    Decisions [inf]:
    - Composes with whatever is trainable: with `lora` it is the paper's LoRA variant (the bench
      runs lora + lfu against plain lora), alone it regularises full fine-tuning. Not required by
      `check` so the method stays usable on its own.
    - The H and H′ forwards share one dropout mask (both start from the same seed, drawn from the
      step's generator), so L_cons measures only the perturbation and α = 0 gives L_cons ≡ 0 even
      with LoRA dropout. All of LfU's forwards run in a forked RNG, so the loop's dropout stream is
      unchanged: at α = 0 training equals SFT exactly.
    - g is each rank's own (no all-reduce): x′ is a per-rank batch and DDP only needs the final
      gradients synchronised; every rank runs the same three extra forwards per micro-batch.
    - The ascent is on cross-entropy (a method's `criterion` does not apply to x′).
    - DDP only: under FSDP the global norm and the functional call would see parameter shards.
    """

    name = "lfu"
    paper = "Learning from the Undesirable: Robust Adaptation of Language Models without Forgetting (AAAI 2026, 2511.13052)"
    Config = LfUConfig
    baseline = "lora"
    # The paper's setting is LoRA + LfU; compare with plain LoRA at the LoRA baseline's learning rate.
    bench = {"methods": [{"name": "lora"}, {"name": "lfu"}], "train": {"lr": 1e-3}}
    bench_metrics = ("prompt_spread",)  # its paper reports the spread of accuracy over prompt variants

    def check(self, spec: RunSpec) -> None:
        """The perturbation needs whole parameters on every rank."""
        if spec.scaling.strategy != "ddp":
            raise ValueError(f"needs whole parameters on each rank; scaling.strategy={spec.scaling.strategy!r} shards them: use ddp")

    def loss(self, model: torch.nn.Module, batch: dict, out: Any, ctx: Context) -> tuple[torch.Tensor | None, dict[str, float]]:
        """β·L_cons for micro-batch `batch`, with the consistency and ascent-norm metrics."""
        if self.config.beta == 0:
            return None, {}
        net = unwrap(model)
        # The loop's autocast dtype, read off its forward (the hook is not told it): bf16/fp16 logits.
        amp = out.logits.dtype if out.logits.dtype in (torch.bfloat16, torch.float16) else None
        other = ctx.draw_batch() if ctx.draw_batch is not None else batch
        seed = int(torch.randint(2**62, (1,), generator=ctx.generator))
        with _fork_rng(ctx.device):
            torch.manual_seed(seed)
            delta, g_norm = self.ascent_step(net, other, amp)
            cons = consistency(net, batch, delta, amp, seed + 1, self.config.start, self.config.finish)
        return self.config.beta * cons, {"lfu_cons": float(cons.detach()), "lfu_ascent_grad_norm": g_norm}

    def ascent_step(self, net: torch.nn.Module, batch: dict, amp: torch.dtype | None) -> tuple[dict[str, torch.Tensor], float]:
        """{name: α·g/‖g‖₂} for the trainable parameters, g = ∇ L_SFT(θ; batch); and ‖g‖₂."""
        named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        batch = dict(batch)  # forward_and_loss adds a key; the caller's batch stays as drawn
        _, loss_sum, count = forward_and_loss(net, batch, amp)
        grads = torch.autograd.grad(loss_sum / count.clamp(min=1), [p for _, p in named], allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g.detach() for (_, p), g in zip(named, grads)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) if grads else torch.zeros(())
        scale = self.config.alpha / norm.clamp(min=1e-12)  # ‖g‖ = 0 (or α = 0): no perturbation
        return {n: (g.float() * scale).to(g.dtype) for (n, _), g in zip(named, grads)}, float(norm)


def consistency(net: torch.nn.Module, batch: dict, delta: dict[str, torch.Tensor], amp: torch.dtype | None,
                seed: int, start: int, finish: int) -> torch.Tensor:
    """Mean over hidden states [start, finish] of MSE(H′, stopgrad(H)) on label positions of `batch`."""
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    mask = batch["labels"] != -100
    if not mask.any():  # a prompt-only batch: nothing to match (DDP only, so skipping forwards is safe)
        return torch.zeros((), device=batch["labels"].device)
    with torch.no_grad():
        clean = [h[mask] for h in hidden_states(net, inputs, amp, seed)]  # label positions only: less to hold
    last = len(clean) - 1 if finish == -1 else finish
    if last >= len(clean) or start > last:
        raise ValueError(f"lfu: hidden states [{start}, {finish}] outside the model's 0..{len(clean) - 1}")
    params = dict(net.named_parameters())
    # θ + δ with δ a constant: d(L_cons)/dθ is the gradient at θ_aux, and θ itself is never written.
    perturbed = {n: params[n] + d for n, d in delta.items()}
    aux = hidden_states(net, inputs, amp, seed, perturbed)
    layers = range(start, last + 1)
    return torch.stack([F.mse_loss(aux[i][mask].float(), clean[i].float()) for i in layers]).mean()


def hidden_states(net: torch.nn.Module, inputs: dict, amp: torch.dtype | None, seed: int,
                  params: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """All hidden states (embeddings first) of a forward at θ, or at `params` where given."""
    torch.manual_seed(seed)  # same dropout mask for the clean and the perturbed forward
    kwargs = {**inputs, "use_cache": False, "output_hidden_states": True, "logits_to_keep": 1}  # logits unused
    device_type = inputs["input_ids"].device.type
    with torch.autocast(device_type, dtype=amp or torch.float32, enabled=amp is not None):
        out = functional_call(net, params, (), kwargs) if params else net(**kwargs)
    return out.hidden_states


def _fork_rng(device: torch.device):
    """A scope whose RNG use leaves the CPU (and CUDA) streams as they were."""
    devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)

