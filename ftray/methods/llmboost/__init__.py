"""LLMBoost (Chen, Ai, Li et al. 2025, "LLMBoost: Make Large Language Models Stronger with Boosting", 2512.22309):
a boosting-style chain of M LLMs, each reading its predecessor's hidden states through cross-model attention
and trained to correct its predecessor's mistakes.

Idea: member 1 is plain SFT; member m ≥ 2 (a LoRA-tuned copy of the base with CMA blocks after the layers in
S) is trained with members < m frozen, on an error-suppression objective (spec (b)4, formula [inf]):

    L = CE(z^m_t, y_t)·(1 + (w−1)·e_t) + λ·e_t·(−log(1 − p^m_t(ŷ^{m−1}_t))),   e_t = 𝟙[ŷ^{m−1}_t ≠ y_t]

summed over response tokens and divided by their count (as the loop's CE is). The model is
`ftray.methods.llmboost.model.LlmBoostForCausalLM` (see its docstring for the CMA block, the step API,
the KV cache and the checkpoint). This file is the method: building and growing the chain, the loss, the
optimizer group and the bench's extra measurement. `ftray.boost` drives a chain with one Ray Train run per
stage (`ftray boost RECIPE --members M`).

Further decisions (the spec marks them [inf]; tested in tests/methods/test_llmboost.py):
- Two ways to train a chain. `stage: k` trains member k alone in this run, loading members < k from
  `chain_dir` (one Ray Train run per stage: what `ftray boost` runs, resumable per stage through the chain's
  manifest). `stage: null` (default) trains all M members in one run, one training phase each
  (`train.max_steps` split evenly, warm-up and schedule per phase); that is what `ftray train llmboost` and
  `ftray bench methods` run. A caller without phases (one `prepare_model` call) gets member 1.
- S: `layers` if given (1..L), else every `every`-th layer ({4, 8, …}; SmolLM2-135M: {4, …, 28}); a model
  with fewer than `every` layers gets its last layer.
- p^m in the suppression term is the chain's output distribution (with `ensemble: additive`, of z^m + β·z^{m−1}),
  i.e. what the member is trained to predict. −log(1 − p) is computed as logsumexp(z) − logsumexp(z without ŷ),
  which stays finite when p → 1.
- w (`error_weight`) defaults to 1 (off): the spec calls the re-weighting optional.
- LoRA r 16 on all linear layers, alpha 32 (2r), its own learning rate `lr` 2e-4 (`train.lr` is not used).
- DDP only; packing is refused (the CMA mask knows padding, not packed-document boundaries).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ftray.methods.base import Context, Method, MethodConfig, Phase
from ftray.methods.levi import base_name
from ftray.methods.llmboost.model import MANIFEST, LlmBoostConfig, LlmBoostForCausalLM
from ftray.methods.registry import register

if TYPE_CHECKING:
    from ftray.config import RunSpec


class LlmBoostMethodConfig(MethodConfig):
    members: int = Field(2, ge=1, description="M: members in the chain (spec: 2 or 3).")
    stage: int | None = Field(None, ge=1, description="Train only member `stage` here, loading members < stage from chain_dir "
                              "(one run per stage, as `ftray boost` does); null = all members in this run, one phase each.")
    chain_dir: str | None = Field(None, description="Chain directory holding members < stage (manifest.json); needed when stage > 1.")
    layers: list[int] | None = Field(None, description="S: the layers (1..L) followed by a CMA block; null = every `every`-th layer.")
    every: int = Field(4, ge=1, description="Default S = every this-many-th layer (spec: every 4th).")
    cma_heads: int | None = Field(None, ge=1, description="CMA attention heads; null = the base's attention heads (spec).")
    lam: float = Field(1.0, ge=0, description="λ: weight of the unlikelihood penalty on the predecessor's wrong token (spec: 1.0).")
    error_weight: float = Field(1.0, ge=1, description="w: CE weight at the predecessor's error positions (spec: optional, >1; 1 = off).")
    lora_r: int = Field(16, ge=1, description="Rank of each member's LoRA (spec: 16).")
    lora_alpha: float = Field(32, gt=0, description="LoRA scale numerator alpha (update × alpha/r; 2r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input of the member being trained.")
    lora_targets: list[str] | Literal["all-linear"] = Field("all-linear", description="Modules that get LoRA (spec: all linear layers).")
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate of the trained member's LoRA and CMA (spec: 2e-4); train.lr is not used.")
    ensemble: Literal["last", "additive"] = Field("last", description="Output: the last member's logits z^M (spec), or z^M + β·z^{M−1}.")
    beta: float = Field(1.0, description="β of the additive ensemble.")


@register
class LlmBoost(Method):
    """A chain of LoRA members joined by cross-model attention, each trained to correct its frozen predecessor."""

    name = "llmboost"
    paper = "Chen, Ai, Li et al. 2025, LLMBoost: Make Large Language Models Stronger with Boosting (2512.22309)"
    Config = LlmBoostMethodConfig
    incompatible = ("full", "lora", "hft", "loramoe", "corda", "cofitune", "locft_bf", "lofit", "lt_sft", "owlore", "roste",
                    "depth_upscale", "glue_tricks", "levi")
    baseline = "lora"  # one LoRA model trained for the same total steps
    # Same budget and adapter as the LoRA baseline (r 8 on q/v, lr 1e-3, the bench's total steps split over the
    # members' phases), so the pair differs only in the chain; member 1 alone is scored by `member1_metrics`.
    bench = {"train": {"lr": 1e-3}, "methods": [{"name": "llmboost", "lr": 1e-3, "lora_r": 8, "lora_alpha": 16,
                                                 "lora_targets": ["q_proj", "v_proj"]}]}
    bench_metrics = ("ftray.methods.llmboost:member1_metrics",)

    def __init__(self, config: LlmBoostMethodConfig) -> None:
        super().__init__(config)
        self._chain: LlmBoostForCausalLM | None = None
        self._restore: dict[str, torch.Tensor] = {}  # finished members' weights from a resumed checkpoint (phased run)

    def check(self, spec: RunSpec) -> None:
        """DDP, no packing, and a chain_dir with members < stage when stage > 1."""
        c = self.config
        if spec.scaling.strategy != "ddp":
            raise ValueError(f"llmboost runs with scaling.strategy=ddp only (got {spec.scaling.strategy!r})")
        if spec.data.packing:
            raise ValueError("llmboost: data.packing must be false (cross-model attention would see across packed rows)")
        if c.stage is not None and c.stage > c.members:
            raise ValueError(f"llmboost.stage {c.stage} > llmboost.members {c.members}")
        if c.stage and c.stage > 1:
            manifest = Path(c.chain_dir or "").expanduser() / MANIFEST
            if not c.chain_dir or not manifest.exists():
                raise ValueError(f"llmboost.stage {c.stage} needs chain_dir with the members before it (no {manifest}); "
                                 "train the chain with `ftray boost RECIPE`")
            done = json.loads(manifest.read_text())["finished_stages"]
            if done < c.stage - 1:
                raise ValueError(f"llmboost.chain_dir {c.chain_dir} holds {done} member(s); stage {c.stage} needs {c.stage - 1}")

    def phases(self) -> list[Phase] | None:
        """One phase per member when the whole chain trains in this run."""
        if self.config.stage is not None or self.config.members == 1:
            return None
        return [Phase(f"member_{k}") for k in range(1, self.config.members + 1)]

    def member_to_train(self, ctx: Context) -> int:
        """The 1-based member this run (or phase) trains."""
        if self.config.stage is not None:
            return self.config.stage
        return int(ctx.phase.split("_")[1]) if ctx.phase.startswith("member_") else 1

    def prepare_model(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        """Build the chain on the loaded base (or take the previous phase's), grow it to the member to train, freeze the rest."""
        k = self.member_to_train(ctx)
        if isinstance(model, LlmBoostForCausalLM):
            chain = model
        else:
            chain = self.new_chain(model, ctx, k)
        while chain.n_members < k:
            chain.add_member()
        if self._restore:
            chain.load_state_dict({n: v for n, v in self._restore.items() if chain.member_of(n) < chain.n_members}, strict=False)
        chain.set_trainable(k - 1)
        self._chain = chain
        return chain

    def new_chain(self, base: torch.nn.Module, ctx: Context, k: int) -> LlmBoostForCausalLM:
        """A chain on `base`: members < k loaded from chain_dir (stage mode), else one fresh member."""
        c = self.config
        if base.get_output_embeddings() is None or not hasattr(base.base_model, "layers"):
            raise ValueError(f"llmboost needs a causal LM with an LM head and decoder layers (model.model.layers), got {type(base).__name__}")
        if c.stage and k > 1:
            return LlmBoostForCausalLM.from_pretrained(c.chain_dir, members=k - 1, base=base).to(base.dtype)
        n_layers = base.config.get_text_config().num_hidden_layers
        layers = c.layers or [layer for layer in range(1, n_layers + 1) if layer % c.every == 0] or [n_layers]
        if not all(1 <= layer <= n_layers for layer in layers):
            raise ValueError(f"llmboost.layers {layers}: layers are numbered 1..{n_layers} for this model")
        config = LlmBoostConfig(base_model=base_name(ctx.spec.model.name), base_gguf_file=ctx.spec.model.gguf_file,
                                base_config=base.config.to_dict(), n_members=1, layers=sorted(set(layers)), cma_heads=c.cma_heads,
                                lora={"r": c.lora_r, "alpha": c.lora_alpha, "dropout": c.lora_dropout, "target_modules": c.lora_targets},
                                ensemble=c.ensemble, beta=c.beta)
        chain = LlmBoostForCausalLM(config, base=base)
        chain.train(base.training)
        return chain

    def param_groups(self, model: torch.nn.Module, ctx: Context) -> list[dict[str, Any]]:
        """The trained member's LoRA and CMA weights at the method's `lr`."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": self.config.lr}]

    def loss(self, model: torch.nn.Module, batch: dict, out: Any, ctx: Context) -> tuple[torch.Tensor | None, dict[str, float]]:
        """λ·Σ e_t·(−log(1−p(ŷ_prev))) + (w−1)·Σ e_t·CE_t, over the label-token count; nothing for member 1."""
        prev = getattr(out, "prev_logits", None)
        if prev is None:
            return None, {}
        keep = batch.get("logit_positions")
        keep = (batch["labels"][:, 1:] != -100).any(0).nonzero().squeeze(1) if keep is None else keep
        targets = batch["labels"][:, keep + 1].reshape(-1)
        logits = out.logits.reshape(-1, out.logits.size(-1)).float()
        suppress, wrong = error_suppression(logits, prev.reshape(-1, prev.size(-1)), targets)
        count = (targets != -100).sum().clamp(min=1)
        extra = self.config.lam * suppress.sum() / count
        if self.config.error_weight != 1:
            ce = F.cross_entropy(logits, targets, ignore_index=-100, reduction="none")
            extra = extra + (self.config.error_weight - 1) * (ce * wrong).sum() / count
        n_wrong = int(wrong.sum())
        fixed = (logits.argmax(-1) == targets) & wrong
        return extra, {"prev_error_rate": n_wrong / int(count), "suppress": float(suppress.detach().sum() / count),
                       "prev_errors_fixed": int(fixed.sum()) / max(1, n_wrong)}

    def state_dict(self) -> dict[str, Any]:
        """The frozen members' weights (a resumed phased run rebuilds them from here)."""
        chain = self._chain
        if chain is None:
            return {}
        return {"members": {n: p.detach().cpu().clone() for n, p in chain.named_parameters()
                            if chain.is_saved(n) and chain.member_of(n) < chain.trainable_member}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep the frozen members' weights for `prepare_model`."""
        self._restore = dict(state.get("members", {}))


def error_suppression(logits: torch.Tensor, prev_logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: (𝟙[ŷ_prev ≠ y]·(−log(1 − p(ŷ_prev))), 𝟙[ŷ_prev ≠ y]) for logits [N, V], targets [N] (−100 = none)."""
    guess = prev_logits.argmax(-1)
    wrong = (guess != targets) & (targets != -100)
    z = logits.float()
    others = z.scatter(-1, guess[:, None], float("-inf"))  # log(1 − p(ŷ)) = logsumexp(z without ŷ) − logsumexp(z)
    term = z.logsumexp(-1) - others.logsumexp(-1)
    return torch.where(wrong, term, torch.zeros_like(term)), wrong


def member1_metrics(final_dir: str, eval_n: int, out_dir: Path) -> dict[str, float]:
    """`ftray bench methods`: arithmetic exact match and perplexity of member 1 alone (the chain's first member)."""
    from ftray.eval import evaluate_on_ray

    manifest = Path(final_dir) / MANIFEST
    if not manifest.exists():  # the LoRA baseline: nothing to split
        return {}
    out = Path(out_dir) / "llmboost_member1"
    truncate_chain(final_dir, 1, out)
    scores = evaluate_on_ray(str(out), source="bundled:arithmetic", split="test", max_samples=eval_n)
    return {"member1_arith_em": scores["exact_match"], "member1_arith_ppl": round(scores["perplexity"], 4)}


def truncate_chain(chain_dir: str | Path, members: int, out: str | Path) -> Path:
    """Write the first `members` members of a chain as a chain directory of their own."""
    import shutil

    from ftray.models import load_model

    src, out = Path(chain_dir), Path(out)
    config = LlmBoostConfig.from_pretrained(src)
    base = load_model(config.base_model, gguf_file=config.base_gguf_file)
    model = LlmBoostForCausalLM.from_pretrained(src, members=members, base=base)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    for f in src.iterdir():  # tokenizer, chat template, ftray_spec.yaml
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json", MANIFEST, "generation_config.json"):
            shutil.copy(f, out / f.name)
    return out
