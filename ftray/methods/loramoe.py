"""LoRAMoE (Dou et al., ACL 2024, 2312.09979): LoRA experts in the FFN, mixed by a router.

Idea: freeze the backbone and give every FFN linear E LoRA experts mixed by a dense softmax router; a
localized balancing constraint (LBC) weights each sample's router mass by 1±δ according to whether an
expert's group (experts[:E/2] = world knowledge, experts[E/2:] = downstream) matches the sample's
`task_type` (1 = world knowledge / closed-book QA, 0 = downstream) and balances the weighted masses.

    y = W₀x + Σᵢ ωᵢ(x)·(α/r)·Bᵢ Aᵢ dropout(x),   ω = softmax(W_g x) in fp32
    L = CE + β·Σ_{layers × gate/up/down} Var(I⊙Q)/(Mean(I⊙Q)² + 1e-10),   Q[b,i] = Σ_t ωᵢ(x_bt)

Decisions:
- Export. A router mixture cannot be folded into static weights (ω depends on x), and neither
  Llama nor any PEFT tuner expresses per-linear softmax-routed LoRA experts, so a plain Llama or a
  PEFT adapter can only approximate the trained model. Instead the model is turned into a
  `LoraMoeLlamaForCausalLM` (a LlamaForCausalLM subclass with its own config `model_type`) registered
  with transformers' Auto classes on import, so checkpoints and `final` reload exactly with
  `AutoModelForCausalLM.from_pretrained` in any process that imported `ftray.methods`; no `finalize`
  is needed. Without ftray it does not load (no architecture for it): vLLM serving and plain-hub use
  would need remote code (see the report).
- Q sums over every position, padding included, as in the authors' code; rows without a `task_type`
  (e.g. packed data) get I = 1: plain CV² balancing over all experts, no grouping.
- `mix_source` adds rows of a second source with another task type (e.g. bundled factual QA next to
  a downstream set), written in the training data's format, so the bundled data can exercise the LBC.
- Only Llama-family models (model_type "llama", e.g. SmolLM2) are supported.
- Direction of the LBC: CV²(I⊙Q) is smallest when I⊙Q is flat, i.e. with LESS mass where I = 1+δ, so
  (as in the authors' code, which this follows) CBQA rows end up routing less to experts[:E/2] than
  downstream rows. The groups do separate by task type; which half serves which type is the mirror of
  the paper's wording (tests/methods/test_loramoe.py shows it).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ftray.data import detect_format, load_rows, to_messages
from ftray.data.formats import FORMATS, format_of_columns
from ftray.methods.base import Context, Method, MethodConfig
from ftray.methods.registry import register

if TYPE_CHECKING:
    from ftray.config import RunSpec

MODEL_TYPE = "ftray_loramoe_llama"


class LoraMoeLinear(nn.Module):
    """A frozen linear plus E LoRA experts (stacked: rows i·r..(i+1)·r of A are expert i) and a router."""

    def __init__(self, base: nn.Linear, experts: int, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        # The frozen weight keeps its name (`<linear>.weight`), so base checkpoints load into this layer.
        self.weight, self.bias = base.weight, base.bias
        self.experts, self.r, self.scaling = experts, r, alpha / r
        self.router = nn.Linear(base.in_features, experts, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, experts * r, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(experts * r, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.dropout = nn.Dropout(dropout)
        self.routing: torch.Tensor | None = None  # (batch, seq, E) of the last forward with grad, for the LBC
        # Kaiming-uniform A (fan_in = d_in, as for each expert alone) and router, B = 0: starts at W₀x.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.router.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self.weight, self.bias)
        weights = F.softmax(self.router(x), dim=-1, dtype=torch.float32).to(result.dtype)
        if torch.is_grad_enabled():
            self.routing = weights
        # Weighting the rank-r codes before B equals Σᵢ ωᵢ·Bᵢ Aᵢ x without a (tokens × E × d_out) tensor.
        codes = self.lora_A(self.dropout(x)) * weights.repeat_interleave(self.r, dim=-1)
        return result + self.lora_B(codes) * self.scaling


class LoraMoeLlamaConfig(LlamaConfig):
    """A Llama config plus the LoRAMoE fields, under its own model_type."""

    model_type = MODEL_TYPE

    def __init__(self, loramoe_experts: int = 6, loramoe_r: int = 4, loramoe_alpha: float = 32.0,
                 loramoe_dropout: float = 0.05, loramoe_targets: tuple = ("gate_proj", "up_proj", "down_proj"), **kwargs) -> None:
        self.loramoe_experts, self.loramoe_r, self.loramoe_alpha = loramoe_experts, loramoe_r, loramoe_alpha
        self.loramoe_dropout, self.loramoe_targets = loramoe_dropout, list(loramoe_targets)
        super().__init__(**kwargs)


class LoraMoeLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM whose FFN linears are LoraMoeLinear."""

    config_class = LoraMoeLlamaConfig

    def __init__(self, config: LoraMoeLlamaConfig) -> None:
        super().__init__(config)
        for layer in self.model.layers:
            for name in config.loramoe_targets:
                base = getattr(layer.mlp, name)
                setattr(layer.mlp, name, LoraMoeLinear(base, config.loramoe_experts, config.loramoe_r,
                                                       config.loramoe_alpha, config.loramoe_dropout))


AutoConfig.register(MODEL_TYPE, LoraMoeLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(LoraMoeLlamaConfig, LoraMoeLlamaForCausalLM, exist_ok=True)


def lbc_loss(mass: torch.Tensor, task_type: torch.Tensor | None, delta: float) -> torch.Tensor:
    """CV² of I⊙Q for Q = (batch, E) router mass; I = 1+δ where the expert group matches the row's type."""
    experts = mass.shape[1]
    if task_type is None:
        z = mass
    else:
        knowledge = (task_type == 1).view(-1, 1).expand(-1, experts // 2)
        downstream = (task_type == 0).view(-1, 1).expand(-1, experts // 2)
        z = mass * torch.where(torch.cat([knowledge, downstream], dim=1), 1.0 + delta, 1.0 - delta)
    z = z.float().flatten()
    return z.var() / (z.mean() ** 2 + 1e-10)


class LoraMoeMethodConfig(MethodConfig):
    experts: int = Field(6, ge=2, multiple_of=2, description="LoRA experts per FFN linear, split in two groups (paper: 6 = 3+3).")
    r: int = Field(4, ge=1, description="Rank of each expert (paper: 4).")
    alpha: float = Field(32, gt=0, description="Scale numerator: each expert's update is multiplied by alpha/r (paper: 32).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the experts' input (authors' script: 0.05).")
    delta: float = Field(0.1, ge=0, lt=1, description="δ of the LBC importance 1±δ (paper: 0.1).")
    beta: float = Field(0.1, ge=0, description="Weight β of the LBC, summed over layers × gate/up/down (paper: 0.1).")
    task_type: int = Field(0, ge=0, le=1, description="task_type given to training rows without one (1 = world knowledge, 0 = downstream).")
    mix_source: str | None = Field(None, description="Rows of another source mixed into the training data, e.g. bundled:factual_qa.")
    mix_split: str = Field("train", description="Split of mix_source.")
    mix_samples: int | None = Field(None, ge=1, description="Use only the first N rows of mix_source.")
    mix_task_type: int = Field(1, ge=0, le=1, description="task_type of the mix_source rows.")


@register
class LoraMoe(Method):
    """Frozen backbone; routed LoRA experts in gate/up/down train with the localized balancing constraint."""

    name = "loramoe"
    paper = "Dou et al. 2024, LoRAMoE: Alleviate World Knowledge Forgetting in LLMs via MoE-Style Plugin (2312.09979)"
    Config = LoraMoeMethodConfig
    baseline = "lora"
    bench = {"train": {"lr": 1e-3}}  # adapters: the LoRA baseline's bench learning rate
    incompatible = ("full", "hft", "lora", "corda")

    def check(self, spec: RunSpec) -> None:
        """Packed rows mix examples, so no row has a single task type to balance by."""
        if spec.data.packing and self.config.mix_source:
            raise ValueError("mix_source gives rows task types, which packing (data.packing=true) drops; turn packing off")

    def prepare_data(self, ds, ctx: Context):
        """Label the training rows with a task_type and mix in `mix_source` rows in the same format."""
        import ray.data

        c = self.config
        fmt = ctx.spec.data.format if ctx.spec.data.format != "auto" else format_of_columns(ds.columns())
        keep = [k for k in (*FORMATS[fmt], "system", "options", "task_type") if k in ds.columns()]
        ds = ds.map(lambda r: {**{k: r[k] for k in keep}, "task_type": r.get("task_type", c.task_type)})
        n_mix = 0
        if c.mix_source:
            mix = load_rows(c.mix_source, c.mix_split, c.mix_samples)
            mix_fmt = detect_format(mix, c.mix_source)
            mixed = [{**as_format(r, mix_fmt, fmt, c.mix_source), "task_type": c.mix_task_type} for r in mix]
            n_mix = len(mixed)
            ds = ds.union(ray.data.from_items(mixed))
        ctx.report.update({"rows_task_type": {str(c.task_type): ds.count() - n_mix, str(c.mix_task_type): n_mix}})
        return ds

    def prepare_model(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        """Rebuild the model as a LoraMoeLlamaForCausalLM; only the experts and routers train."""
        if isinstance(model, LoraMoeLlamaForCausalLM):
            return model
        if model.config.model_type != "llama":
            raise ValueError(f"loramoe supports Llama-family models only, got model_type {model.config.model_type!r}")
        c = self.config
        config = LoraMoeLlamaConfig(**model.config.to_dict() | {"model_type": MODEL_TYPE}, loramoe_experts=c.experts,
                                    loramoe_r=c.r, loramoe_alpha=c.alpha, loramoe_dropout=c.dropout)
        new = LoraMoeLlamaForCausalLM(config).to(model.dtype)
        missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
        assert not unexpected and all(".router." in k or ".lora_" in k for k in missing), (missing, unexpected)
        new.generation_config = model.generation_config
        new.train(model.training)
        for n, p in new.named_parameters():
            p.requires_grad_(".router." in n or ".lora_" in n)
        return new

    def loss(self, model: torch.nn.Module, batch: dict, out, ctx: Context) -> tuple[torch.Tensor | None, dict[str, float]]:
        """β·Σ LBC over every LoraMoE linear of this forward pass."""
        task_type = batch.get("task_type")
        terms = []
        for m in model.modules():
            if isinstance(m, LoraMoeLinear) and m.routing is not None:
                terms.append(lbc_loss(m.routing.sum(dim=1), task_type, self.config.delta))
                m.routing = None  # free the graph reference; the next forward sets it again
        if not terms:
            return None, {}
        total = self.config.beta * torch.stack(terms).sum()
        return total, {"lbc": total.item()}


def as_format(row: dict, src: str, dst: str, source: str) -> dict:
    """`row` (format `src`) rewritten in format `dst` (chat or prompt_completion), for mixing sources."""
    messages = to_messages(row, src)[0]
    if dst == "chat":
        return {"messages": messages}
    roles = [m["role"] for m in messages]
    if dst == "prompt_completion" and roles in (["user", "assistant"], ["system", "user", "assistant"]):
        system = {"system": messages[0]["content"]} if roles[0] == "system" else {}
        return {"prompt": messages[-2]["content"], "completion": messages[-1]["content"], **system}
    raise ValueError(f"loramoe.mix_source {source}: its {src} rows cannot be written as the training data's "
                     f"format {dst!r}; use chat or prompt_completion training data, or put task_type in your own rows")
