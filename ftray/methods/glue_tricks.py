"""GLUE tricks: the downstream-adaptation tricks of Vega v1 (Zhong et al., arXiv 2302.09268, JDExplore 2023).

Idea: stack a few cheap fine-tuning-time tricks on plain cross-entropy fine-tuning of a classifier —
adversarial fine-tuning, self-calibrated fine-tuning (self-distillation), transductive fine-tuning
and the GLUE-leaderboard habit of layer-wise learning-rate decay. The report's abstract only names
them; the forms below are the standard ones the method spec reconstructs ([inf]/[3rd]).

Each trick is a Config field, and they combine:
- `llrd` (param_groups): lr_ℓ = lr·ξ^(L−ℓ) for decoder layer ℓ = 1..L, embeddings lr·ξ^L, everything
  else (classification head, final norm) lr. A tied LM head is the embedding matrix, so it gets lr·ξ^L.
- `adversarial: fgm` (loss): r = ε·g/‖g‖₂ with g the gradient of the clean loss w.r.t. the input
  embeddings, then a second forward with embeddings + r whose loss is added (gradients accumulate).
  `sift`: noise on the RMS-normalised embeddings, one normalised ascent step on the symmetric KL
  between clean and perturbed outputs, then that symmetric KL is the added loss (DeBERTa's SiFT).
- `self_distill` γ (on_step + loss): an EMA copy of the model is the teacher;
  L = (1−γ)·CE + γ·τ²·KL(softmax(z_T/τ) ‖ softmax(z/τ)).
- `transductive` (loss, classification only, needs `allow_test_inputs`): the evaluation split's
  *inputs* are pseudo-labelled on the fly by the EMA teacher (or the model itself) and confident
  ones (p ≥ threshold) are trained on with CE — the spec's option (b) without a separate ensemble.

Decisions:
- FGM perturbs the input embeddings of the batch (a forward hook on the embedding module), not the
  embedding matrix in place: no weight is ever modified, so nothing needs restoring, it works under
  DDP/FSDP and with frozen embeddings (LoRA), and pad positions get no perturbation. ‖r‖₂ = ε per example
  (Miyato et al. 2017), not over the whole batch.
- Llama has no embedding LayerNorm, so SiFT's "normalised embeddings" are the embeddings divided by
  their per-token RMS: a perturbation δ in that space is applied as rms(x)·δ.
- The (1−γ) weight of CE is applied by adding −γ·CE in the loss hook (so `criterion` stays free); for
  that reason self-distillation refuses methods that replace the criterion. FGM/SiFT/transductive use plain CE.
- The default ξ is 0.9, the top of the spec's 0.8–0.9 range: SmolLM2 has 30 layers (BERT-large 24), and
  0.85^30 ≈ 0.008 would all but freeze the embeddings. EMA decay 0.999 is the paper-scale default;
  short runs should lower it (the recipe uses 0.98), or the teacher stays the untrained model.
- Left out: MNLI-initialisation (choose `model.name`), seed ensembles and SWA (several runs / checkpoints).
"""

from __future__ import annotations

import copy
import re
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ftray.methods.base import Context, Method, MethodConfig
from ftray.methods.registry import REGISTRY, register
from ftray.train.parallel import unwrap

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class GlueTricksConfig(MethodConfig):
    """Which tricks are on, with the spec's defaults ([3rd]/[inf], not from the report)."""

    llrd: bool = Field(True, description="Layer-wise learning-rate decay: lr·ξ^(L−ℓ) per decoder layer, head at lr.")
    llrd_decay: float = Field(0.9, gt=0, le=1, description="ξ of the layer-wise decay (spec 0.8–0.9; 0.9 for a 30-layer model).")
    adversarial: Literal["none", "fgm", "sift"] = Field("fgm", description="Adversarial fine-tuning on the input embeddings: FGM, SiFT or off.")
    fgm_eps: float = Field(1.0, ge=0, description="FGM: L2 norm ε of each example's embedding perturbation.")
    sift_eps: float = Field(0.05, ge=0, description="SiFT: per-token L2 size of the perturbation of the normalised embeddings (spec 1e-2–1e-1).")
    sift_noise: float = Field(1e-5, ge=0, description="SiFT: std of the random starting perturbation before the ascent step [inf].")
    adv_weight: float = Field(1.0, ge=0, description="Weight of the adversarial loss term.")
    self_distill: float = Field(0.5, ge=0, le=1, description="γ of self-calibrated fine-tuning: (1−γ)·CE + γ·τ²·KL to an EMA teacher; 0 = off.")
    sd_temperature: float = Field(2.0, gt=0, description="τ of the self-distillation KL.")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="Decay of the EMA teacher per optimizer step (lower it for short runs).")
    transductive: bool = Field(False, description="Pseudo-label the evaluation split's inputs and train on the confident ones (classification).")
    allow_test_inputs: bool = Field(False, description="Required with `transductive`: it reads the evaluation inputs (never their labels).")
    pseudo_threshold: float = Field(0.9, ge=0, le=1, description="Transductive: minimum teacher probability for a pseudo-label [inf].")
    transductive_weight: float = Field(1.0, ge=0, description="Transductive: weight of the pseudo-label CE (mean over the unlabelled batch).")


def predictions(out, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, C], targets [N]) of a task output: causal LM's label positions, or one row per example."""
    if "logit_positions" in batch:  # causal LM: logits exist only at these positions, each predicting the next label
        keep = batch["logit_positions"]
        return out.logits.reshape(-1, out.logits.size(-1)).float(), batch["labels"][:, keep + 1].reshape(-1)
    return out.logits.float(), batch["labels"]


def sym_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) + KL(q‖p), mean over rows."""
    lp, lq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return F.kl_div(lq, lp, log_target=True, reduction="batchmean") + F.kl_div(lp, lq, log_target=True, reduction="batchmean")


def per_example_unit(g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """g [B, T, H] with pad positions zeroed, scaled to L2 norm 1 per example."""
    g = g.float() * mask[..., None]
    return g / g.flatten(1).norm(dim=1).clamp(min=1e-12)[:, None, None]


@register
class GlueTricks(Method):
    """LLRD, FGM/SiFT adversarial training, EMA self-distillation and transductive pseudo-labelling."""

    name = "glue_tricks"
    paper = "Zhong et al. 2023, Bag of Tricks for Effective Language Model Pretraining and Downstream Adaptation: A Case Study on GLUE (2302.09268)"
    Config = GlueTricksConfig
    tasks = ("classification", "causal_lm")
    # Bench: LLRD + FGM. Self-distillation is off there: in a 20-step run the EMA teacher's head is still
    # the random initial one, and distilling towards it dropped accuracy to 0.35 (vs 1.00 plain) when measured.
    bench = {"data": {"source": "bundled:classification", "max_len": 64}, "task": {"type": "classification"},
             "methods": [{"name": "glue_tricks", "self_distill": 0.0}]}

    def __init__(self, config: GlueTricksConfig) -> None:
        super().__init__(config)
        self.teacher: torch.nn.Module | None = None
        self._teacher_state: dict | None = None
        self._hook = self._embedding = self._embeds = self._delta = self._unlabelled = None
        self._armed, self._trainable = False, set()

    def check(self, spec) -> None:
        c = self.config
        if c.transductive and not c.allow_test_inputs:
            raise ValueError("glue_tricks.transductive trains on the evaluation inputs; set glue_tricks.allow_test_inputs: true to allow it")
        if c.transductive and spec.task.type != "classification":
            raise ValueError(f"glue_tricks.transductive pseudo-labels classes; task.type is {spec.task.type!r} (needs classification)")
        names = [m["name"] for m in spec.methods]
        wrappers = [n for n in names[names.index(self.name) + 1 :] if "prepare_model" in REGISTRY[n].hooks()]
        if (c.self_distill > 0 or c.transductive) and wrappers:
            raise ValueError(f"glue_tricks copies the model as its EMA teacher in prepare_model: list it after {wrappers[0]!r} in methods")
        others = [m["name"] for m in spec.methods if m["name"] != self.name and "criterion" in REGISTRY[m["name"]].hooks()]
        if c.self_distill > 0 and others:
            raise ValueError(f"glue_tricks.self_distill weights cross-entropy by (1−γ) and cannot be combined with {others[0]!r}, "
                             "which replaces it; set glue_tricks.self_distill: 0")

    def prepare_model(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        """Copy the EMA teacher (before hooking, so the copy stays plain) and hook the input embeddings."""
        if self.config.self_distill > 0 or self.config.transductive:
            self.teacher = copy.deepcopy(model).to(ctx.device).eval().requires_grad_(False)
            self._trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            if self._teacher_state:  # resumed: the EMA weights, not the base ones
                self.teacher.load_state_dict(self._teacher_state, strict=False)
        if self._hook is not None:
            self._hook.remove()
        self._hook = None
        if self.config.adversarial != "none":
            self._embedding = model.get_input_embeddings()
            self._hook = self._embedding.register_forward_hook(self._embed_hook)
        return model

    def _embed_hook(self, module, inputs, output):
        if module is not self._embedding:
            return output
        if self._delta is not None:  # an adversarial forward
            return output + self._delta.to(output.dtype)
        if self._armed and torch.is_grad_enabled():  # the loop's forward: keep its embeddings for the gradient
            self._armed = False
            if not output.requires_grad:  # frozen embeddings (LoRA): still need d loss / d embeddings
                output = output.detach().requires_grad_()
            self._embeds = output
        return output

    def param_groups(self, model: torch.nn.Module, ctx: Context) -> list[dict] | None:
        """One group per depth: the head first (lr), then layers downwards, embeddings last (lr·ξ^L)."""
        if not self.config.llrd:
            return None
        n_layers = 1 + max((int(m.group(1)) for n, _ in model.named_parameters() if (m := LAYER.search(n))), default=-1)
        embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
        by_depth: dict[int, list] = {}
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            m = LAYER.search(n)
            k = n_layers if id(p) in embeddings else (n_layers - 1 - int(m.group(1)) if m else 0)  # ℓ = index + 1
            by_depth.setdefault(k, []).append(p)
        lr = ctx.spec.train.lr
        return [{"params": ps, "lr": lr * self.config.llrd_decay**k, "depth": k} for k, ps in sorted(by_depth.items())]

    def on_step(self, model: torch.nn.Module, optimizer, ctx: Context) -> None:
        """θ_T ← d·θ_T + (1−d)·θ over the trainable weights, before each step."""
        if self.teacher is None or ctx.step == 0:
            return
        teacher, d = dict(self.teacher.named_parameters()), self.config.ema_decay
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad and n in teacher:
                    full = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 shards are DTensors
                    teacher[n].lerp_(full.to(teacher[n].dtype), 1 - d)

    def corrupt_batch(self, batch: dict[str, torch.Tensor], ctx: Context) -> dict[str, torch.Tensor]:
        """Arm the embedding hook: the next forward with gradients is the loop's own."""
        self._armed, self._embeds = self._hook is not None, None
        return batch

    def loss(self, model, batch: dict, out, ctx: Context) -> tuple[torch.Tensor | None, dict[str, float]]:
        """The sum of the enabled tricks' extra terms."""
        from ftray.tasks import get_task
        from ftray.train.loop import resolve_precision  # the loop imports the methods package

        task, amp = get_task(ctx.spec), resolve_precision(ctx.spec.train.precision, ctx.device)
        run = lambda m: task.forward_and_loss(m, batch, amp)  # noqa: E731
        c, terms, metrics = self.config, [], {}
        if c.adversarial != "none" and self._embeds is not None:
            adv = (self._fgm if c.adversarial == "fgm" else self._sift)(model, batch, out, run, ctx)
            terms.append(c.adv_weight * adv)
            metrics["adv_loss"] = float(adv.detach())
        if c.self_distill > 0:
            z, y = predictions(out, batch)
            with torch.no_grad():
                zt, _ = predictions(run(self.teacher)[0], batch)
            keep = y != -100
            tau = c.sd_temperature
            kl = tau**2 * F.kl_div((z[keep] / tau).log_softmax(-1), (zt[keep] / tau).log_softmax(-1), log_target=True, reduction="batchmean")
            ce = F.cross_entropy(z[keep], y[keep]) if keep.any() else z.sum() * 0
            terms.append(c.self_distill * (kl - ce))  # with the loop's CE: (1−γ)·CE + γ·τ²·KL
            metrics["self_distill_kl"] = float(kl.detach())
        if c.transductive:
            pl, share = self._pseudo_label_loss(model, ctx, amp)
            terms.append(c.transductive_weight * pl)
            metrics["pseudo_label_share"] = share
        return (sum(terms) if terms else None), metrics

    def _fgm(self, model, batch, out, run, ctx) -> torch.Tensor:
        """Loss of a forward with embeddings + ε·g/‖g‖ (g: d clean CE / d embeddings, per example)."""
        z, y = predictions(out, batch)
        clean = F.cross_entropy(z, y, ignore_index=-100, reduction="sum")
        g = torch.autograd.grad(clean, self._embeds, retain_graph=True, allow_unused=True)[0]
        if g is None:
            g = torch.zeros_like(self._embeds)
        self._delta = self.config.fgm_eps * per_example_unit(g, batch["attention_mask"])
        try:
            _, loss_sum, count = run(unwrap(model))
        finally:
            self._delta = None
        return loss_sum / count.clamp(min=1)

    def _sift(self, model, batch, out, run, ctx) -> torch.Tensor:
        """Symmetric KL between clean and normalised-embedding-perturbed outputs after one ascent step."""
        e, mask = self._embeds.detach(), batch["attention_mask"][..., None].float()
        scale = e.float().pow(2).mean(-1, keepdim=True).sqrt() * mask  # per-token RMS: the normalised space's unit
        p, y = predictions(out, batch)
        keep = y != -100
        noise = torch.randn(e.shape, generator=ctx.generator).to(e.device) * self.config.sift_noise
        delta = noise.requires_grad_()
        try:
            self._delta = scale * delta
            q0, _ = predictions(run(unwrap(model))[0], batch)
            g = torch.autograd.grad(sym_kl(p[keep].detach(), q0[keep]), delta, allow_unused=True)[0]
            g = torch.zeros_like(delta) if g is None else g
            step = self.config.sift_eps * g / g.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # per-token L2
            self._delta = scale * step.detach()
            q, _ = predictions(run(unwrap(model))[0], batch)
        finally:
            self._delta = None
        return sym_kl(p[keep], q[keep])

    def _pseudo_label_loss(self, model, ctx: Context, amp) -> tuple[torch.Tensor, float]:
        """Mean CE on confident teacher pseudo-labels of a random batch of evaluation inputs (FixMatch-style mask)."""
        from ftray.tasks.classification import forward, pad

        if self._unlabelled is None:
            from ftray.train.trainer import tokenized_rows

            spec = ctx.spec
            rows, _ = tokenized_rows(spec, spec.data.eval_source or spec.data.source, spec.data.eval_split, None, ctx.tokenizer, None)
            self._unlabelled = [{"input_ids": r["input_ids"]} for r in rows]  # inputs only: the labels are dropped here
        pick = torch.randint(len(self._unlabelled), (ctx.spec.train.batch_size,), generator=ctx.generator).tolist()
        batch = {k: v.to(ctx.device) for k, v in pad([self._unlabelled[i] for i in pick], ctx.tokenizer.pad_token_id).items()}
        with torch.no_grad():
            conf, pseudo = forward(self.teacher, batch, amp).logits.softmax(-1).max(-1)
        confident = (conf >= self.config.pseudo_threshold).float()
        ce = F.cross_entropy(forward(unwrap(model), batch, amp).logits, pseudo, reduction="none")
        return (ce * confident).mean(), float(confident.mean())

    def state_dict(self) -> dict:
        """The EMA teacher's trainable weights (the frozen ones equal the base model's)."""
        if self.teacher is None:
            return {}
        return {"teacher": {n: t.detach().cpu().clone() for n, t in self.teacher.named_parameters() if n in self._trainable}}

    def load_state_dict(self, state: dict) -> None:
        self._teacher_state = state.get("teacher")
