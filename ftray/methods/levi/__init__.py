"""LEVI (Roh et al., ICML 2024, 2402.04644): a layer-wise ensemble of a pre-trained model and a small
model trained from scratch, for fine-tuning that generalises out of domain.

Idea: fine-tuning can over-rely on the pre-trained model's features (and their spurious parts). LEVI
keeps the pre-trained model P fixed (or LoRA-tuned) and adds a small task model G trained from
scratch; adapting layers A_k read P's hidden state at layer l_k together with G's and map them into
P's output space, and the mean of the K views' logits is trained with one cross-entropy:

    z_k = n(h_P^(L)) + A_k([n(h_P^(l_k)); g]),   logits = mean_k lm_head_P(z_k)
    L = CE(logits, y) + λ·(1/K)·Σ_k CE(lm_head_P(z_k), y)        (λ = per_view_loss, default 0)

The model is `ftray.methods.levi.model.LeviForCausalLM` (see its docstring for the decisions on the
checkpoint, the residual start at P, the KV cache and G's architecture). This file is the method:
building that model from the loaded P, the optimizer groups (G and A from scratch at `lr`, P's
LoRA at `lora_lr`), the optional per-view loss, and the `ftray bench methods` setup.

Further decisions (the spec marks them [inf]):
- Layers are numbered 1..L as in `output_hidden_states` (L = the last layer, after the final norm);
  the default is {⌊L/2⌋, L} (SmolLM2-135M: {15, 30}).
- The learning rates are the method's own (`lr`, `lora_lr`); `train.lr` is not used by a LEVI run,
  so its plain-SFT baseline keeps the usual full-fine-tuning rate.
- Strategy: DDP only (P is frozen, so DDP sees it as buffers-in-parameters that never get gradients);
  FSDP/DeepSpeed of the composite model are untested and refused in `check`.
- Bench: train on three factual-QA categories (unit conversions and the calendar) and score response
  loss and exact match on held-out rows of those categories (in-domain) and of the four others
  (capitals, elements, atomic numbers, planets: the shifted split). The category filter is the
  `mixture` method (`by: category`), so the full-fine-tuning baseline trains on the same rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ftray.methods.base import Context, Method, MethodConfig
from ftray.methods.levi.model import LeviConfig, LeviForCausalLM
from ftray.methods.registry import register

if TYPE_CHECKING:
    from ftray.config import RunSpec

IN_DOMAIN = ("units", "months", "weekdays")  # bench: bundled factual-QA categories trained on
SHIFTED = ("capitals", "elements", "atomic_numbers", "planets")  # bench: held-out categories (the shifted split)


class LeviMethodConfig(MethodConfig):
    layers: list[int] | None = Field(None, description="P's layers the adapters read, 1..L (L = last, after the final "
                                     "norm); null = {⌊L/2⌋, L} (spec default: one middle layer and the last).")
    task_layers: int = Field(2, ge=1, description="Decoder layers of the from-scratch task model G (spec: 2).")
    task_hidden: int = Field(128, ge=8, description="Hidden size d_G of G (spec: 128).")
    task_heads: int = Field(2, ge=1, description="Attention heads of G (spec: 2).")
    adapter_hidden: int = Field(256, ge=1, description="Hidden width d_A of each adapting layer (spec: 256).")
    residual: bool = Field(True, description="Add each view to P's last hidden state (zero-initialised adapters: "
                           "LEVI starts as P); false = the literal z_k = A_k(...), a from-scratch head input.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of G and the adapters (spec: 1e-3, trained from scratch).")
    per_view_loss: float = Field(0.0, ge=0, description="λ: weight of the mean per-view CE added to the ensemble CE (spec: 0, off).")
    base_mode: Literal["frozen", "lora"] = Field("frozen", description="P frozen (spec default) or tuned with LoRA.")
    lora_lr: float = Field(1e-4, gt=0, description="Learning rate of P's LoRA weights (base_mode lora; spec: 1e-4).")
    lora_r: int = Field(8, ge=1, description="Rank of P's LoRA (base_mode lora).")
    lora_alpha: float = Field(16, gt=0, description="LoRA scale numerator alpha (update × alpha/r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_targets: list[str] = Field(["q_proj", "v_proj"], description="P's modules that get LoRA (base_mode lora).")


@register
class Levi(Method):
    """Frozen (or LoRA) P + from-scratch G, joined layer-wise by adapting layers; the views' mean is trained."""

    name = "levi"
    paper = "Roh et al. 2024, LEVI: Generalizable Fine-tuning via Layer-wise Ensemble of Different Views (2402.04644, ICML)"
    Config = LeviMethodConfig
    incompatible = ("full", "lora", "hft", "loramoe", "corda", "cofitune", "locft_bf", "lofit", "lt_sft", "owlore", "roste",
                    "depth_upscale", "glue_tricks")
    bench = {"data": {"source": "bundled:factual_qa", "max_len": 128},
             "methods": [{"name": "mixture", "by": "category", "tasks": list(IN_DOMAIN)}, {"name": "levi"}]}
    bench_metrics = ("ftray.methods.levi:domain_metrics",)

    def check(self, spec: RunSpec) -> None:
        """P, G and the adapters are replicated whole: DDP only."""
        if spec.scaling.strategy != "ddp":
            raise ValueError(f"levi runs with scaling.strategy=ddp only (got {spec.scaling.strategy!r}); the frozen base "
                             "model needs no sharding of optimizer state")

    def prepare_model(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        """Wrap the loaded causal LM as P of a new LeviForCausalLM (G and adapters freshly initialised)."""
        if isinstance(model, LeviForCausalLM):
            return model
        if model.get_output_embeddings() is None or not hasattr(model.base_model, "norm"):
            raise ValueError(f"levi needs a causal LM with an LM head and a final norm (model.model.norm), got {type(model).__name__}")
        c = self.config
        n_layers = model.config.get_text_config().num_hidden_layers
        layers = c.layers or [n_layers // 2, n_layers]
        if not all(1 <= layer <= n_layers for layer in layers):
            raise ValueError(f"levi.layers {layers}: layers are numbered 1..{n_layers} for this model")
        config = LeviConfig(base_model=base_name(ctx.spec.model.name), base_gguf_file=ctx.spec.model.gguf_file,
                            base_config=model.config.to_dict(), layers=layers, task_layers=c.task_layers,
                            task_hidden=c.task_hidden, task_heads=c.task_heads, adapter_hidden=c.adapter_hidden,
                            residual=c.residual, per_view_loss=c.per_view_loss, base_mode=c.base_mode,
                            lora={"r": c.lora_r, "alpha": c.lora_alpha, "dropout": c.lora_dropout,
                                  "target_modules": c.lora_targets} if c.base_mode == "lora" else None)
        new = LeviForCausalLM(config, base=model).to(model.dtype)
        new.train(model.training)
        return new

    def param_groups(self, model: torch.nn.Module, ctx: Context) -> list[dict[str, Any]]:
        """G and the adapters at `lr`; P's LoRA weights at `lora_lr`."""
        scratch = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("base.")]
        lora = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("base.")]
        groups = [{"params": scratch, "lr": self.config.lr}]
        return groups + ([{"params": lora, "lr": self.config.lora_lr}] if lora else [])

    def loss(self, model: torch.nn.Module, batch: dict, out: Any, ctx: Context) -> tuple[torch.Tensor | None, dict[str, float]]:
        """λ·(1/K)·Σ_k CE(view k) over the label tokens, when per_view_loss > 0."""
        views = getattr(out, "view_logits", None)
        if not views or self.config.per_view_loss == 0:
            return None, {}
        targets = batch["labels"][:, batch["logit_positions"] + 1].reshape(-1)
        ces = [F.cross_entropy(v.reshape(-1, v.size(-1)).float(), targets, ignore_index=-100) for v in views]
        mean = torch.stack(ces).mean()
        return self.config.per_view_loss * mean, {"view_ce": mean.item()}


def base_name(name: str) -> str:
    """The base model's name as a checkpoint records it: local paths absolute, aliases and hub ids as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def domain_metrics(final_dir: str, eval_n: int, out_dir: Path) -> dict[str, float]:
    """Response-token loss and exact match on held-out factual QA of the trained (in-domain) and the other categories."""
    from ftray.data import load_rows
    from ftray.eval import evaluate_on_ray

    rows = load_rows("bundled:factual_qa", "test").to_list()
    result: dict[str, float] = {}
    for split, categories in (("id", IN_DOMAIN), ("shift", SHIFTED)):
        path = Path(out_dir) / "levi_domains" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["category"] in categories))
        scores = evaluate_on_ray(final_dir, source=str(path), split="test", max_samples=eval_n, max_new_tokens=24)
        result[f"{split}_loss"] = round(math.log(scores["perplexity"]), 4)
        result[f"{split}_em"] = scores["exact_match"]
    return result
