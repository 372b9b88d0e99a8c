"""LLMBoost's model as one transformers model: a chain of M members joined by cross-model attention (CMA).

`LlmBoostForCausalLM` (config `LlmBoostConfig`, model_type "ftray_llmboost") is registered with the Auto
classes on import, so a chain directory loads with `AutoModelForCausalLM.from_pretrained` in training
export, `ftray eval` and the HF serving engine alike (as LEVI's model does).

    member 1:  h^1_ℓ = layer_ℓ(h^1_{ℓ-1})                                   (a LoRA-tuned copy of the base)
    member m:  h^m_ℓ = layer_ℓ(h^m_{ℓ-1});  for ℓ ∈ S:  h^m_ℓ ← h^m_ℓ + W_o·Attn(W_q n(h^m_ℓ), W_k n'(h^{m-1}_ℓ), W_v n'(h^{m-1}_ℓ))
    logits = lm_head_M(h^M_L)   (ensemble "last")   or   z^M + β·z^{M-1}   (ensemble "additive")

Step API (for a pipelined server: one member per actor, [B, T, d] states passed between them):

    cache_m = model.new_member_cache(m)                  # that member's KV cache + its CMA K/V cache
    logits, states = model.member_forward(m, input_ids, prev_states, cache_m, attention_mask, position_ids)

`prev_states` is member m−1's `states` from the same step ({ℓ: [B, T_new, d]} for ℓ ∈ S, None for m = 0);
member indices are 0-based here, layers ℓ are 1-based (ℓ = the output of decoder layer ℓ, as in
`output_hidden_states`). `states` are member m's own states at S *after* its CMA, so member m+1 sees
everything members < m+1 fused. Member m may run its layer ℓ as soon as member m−1's state at ℓ exists;
the API hands a whole step's states at once (the simple batched-per-step form; a per-layer streaming
server can call the CMA blocks' `kv`/`forward` itself). One model object runs one forward per member at a time
(the hooks read that member's inputs from the model); concurrent callers of the same member need their own copy.

Decisions (the spec marks these [inf]; each is tested in tests/methods/test_llmboost.py):
- Members are copies of one base model that share its frozen weights (the same Parameter objects; each copy
  has its own modules and its own LoRA, injected with PEFT), so M members cost one base in memory plus M
  adapters. Heterogeneous members are not supported.
- CMA block: pre-norm (RMSNorm on the query side and on the predecessor side, as the decoder layers
  normalise their inputs), heads = the base's attention heads, no positional encoding (the predecessor's
  states already carry positions; the causal mask alone orders them), W_o zero-initialised: a new member's
  logits are its base's exactly (LoRA's B is zero too). Masked scores use the dtype's minimum, not −inf, so
  a padded query row that sees no key gives finite (unused) values instead of NaN.
- Causality: query position t sees predecessor positions ≤ t and never padding (the attention mask).
- Predecessors (members < the trained one) run under `torch.no_grad()` in eval mode; their hidden states and
  logits are recomputed every step, not cached per example: a cache of |S|·T·d floats per example would
  outgrow the data for any real S, and recomputation keeps dropout-free members exact.
- KV cache: one `LlmBoostCache`, a DynamicCache whose layers are member 1's, then member 2's decoder layers
  and CMA layers (the predecessor's projected K/V at each ℓ ∈ S), and so on; each member decodes with a view
  over its own layer objects. The HF engine's continuous batcher only edits `cache.layers` (merges rows,
  left-pads, trims, drops rows), so it batches a chain with no engine change; `generate()` gets the same cache.
- Checkpoint: `config.json` names the base model; the safetensors hold only the members' LoRA weights and the
  CMA blocks; `manifest.json` lists the members in order with S. `from_pretrained` loads the base by name
  (`ftray.models`), builds the members on it and loads the rest strictly; `members=k` keeps the first k.
- Packed rows are not supported (the CMA mask knows padding, not document boundaries): `llmboost.check` refuses
  `data.packing`.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

MODEL_TYPE = "ftray_llmboost"
MANIFEST = "manifest.json"
_BASE_KEYS = ("vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


class LlmBoostConfig(PretrainedConfig):
    """The base model's name and config, the number of members, S, the CMA heads, the members' LoRA and the ensemble."""

    model_type = MODEL_TYPE

    def __init__(self, base_model: str | None = None, base_gguf_file: str | None = None, base_config: dict | None = None,
                 n_members: int = 1, layers: list[int] | None = None, cma_heads: int | None = None, lora: dict | None = None,
                 ensemble: str = "last", beta: float = 1.0, **kwargs) -> None:
        self.base_model, self.base_gguf_file, self.base_config = base_model, base_gguf_file, base_config or {}
        self.n_members, self.layers, self.cma_heads = n_members, list(layers or []), cma_heads
        self.lora, self.ensemble, self.beta = lora or {}, ensemble, beta
        for key in _BASE_KEYS:  # what engines and generate read from `model.config`
            kwargs.setdefault(key, self.base_config.get(key))
        kwargs["tie_word_embeddings"] = False  # each member's head is its own business; the wrapper ties nothing
        super().__init__(**kwargs)


class MemberCache(DynamicCache):
    """One member's KV cache: `.lm` (its decoder layers) then `.cma` (the predecessor's K/V at each ℓ ∈ S)."""

    def __init__(self, lm: DynamicCache, cma: list[DynamicLayer]) -> None:
        super().__init__()
        self.lm, self.cma = lm, cma
        self.layers = [*lm.layers, *cma]


class LlmBoostCache(DynamicCache):
    """Every member's layers, in chain order, in one DynamicCache; `.members` are views over the same layer objects."""

    def __init__(self, members: list[MemberCache]) -> None:
        super().__init__()
        self.members = members
        self.layers = [layer for m in members for layer in m.layers]


@dataclass
class LlmBoostOutput(CausalLMOutputWithPast):
    """The chain's logits, plus the last predecessor's logits (the error-suppression loss needs them)."""

    prev_logits: torch.Tensor | None = None


class CrossModelAttention(nn.Module):
    """Member m's queries over member m−1's states at one layer: causal, pre-norm, W_o starting at zero."""

    def __init__(self, d_model: int, d_prev: int, heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"CMA: hidden size {d_model} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, d_model // heads
        self.norm_q, self.norm_kv = nn.RMSNorm(d_model, eps=eps), nn.RMSNorm(d_prev, eps=eps)
        self.q, self.k, self.v = (nn.Linear(d, d_model, bias=False) for d in (d_model, d_prev, d_prev))
        self.o = nn.Linear(d_model, d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's defaults for the norms and Q/K/V; zeros for W_o (a new member equals its base)."""
        for module in (self.norm_q, self.norm_kv, self.q, self.k, self.v):
            module.reset_parameters()
        nn.init.zeros_(self.o.weight)

    def kv(self, prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, heads, T, head_dim] of the predecessor's states [B, T, d_prev]."""
        x = self.norm_kv(prev)
        split = lambda t: t.view(*t.shape[:2], self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        return split(self.k(x)), split(self.v(x))

    def forward(self, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """h + W_o·Attn: the T new queries are the last T of the K/V's positions; padding (mask 0) is never seen."""
        b, t, _ = h.shape
        kv_len = k.shape[2]
        q = self.q(self.norm_q(h)).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        pos_q = torch.arange(t, device=h.device) + (kv_len - t)
        allowed = (torch.arange(kv_len, device=h.device)[None, :] <= pos_q[:, None])[None, None]  # [1, 1, T, kv]
        if attention_mask is not None and attention_mask.dim() == 2:
            allowed = allowed & attention_mask[:, None, None, -kv_len:].bool()
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, torch.finfo(q.dtype).min)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=bias)
        return h + self.o(out.transpose(1, 2).reshape(b, t, -1))


class LlmBoostForCausalLM(PreTrainedModel, GenerationMixin):
    """M members (`.members`, LoRA-tuned copies of one base) and their CMA blocks (`.cma[m]`); see the module docstring."""

    config_class = LlmBoostConfig
    base_model_prefix = "llmboost"  # no such attribute: `.base_model` is the wrapper itself
    main_input_name = "input_ids"
    _no_split_modules = ["LlamaDecoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: LlmBoostConfig, base: PreTrainedModel | None = None) -> None:
        n = config.n_members
        super().__init__(config)
        if base is None:  # structure only (random base); from_pretrained passes the loaded base
            base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config.base_config))
        self.post_init()
        # Not a submodule: the pristine base every member is copied from (its Parameters are the members' frozen weights).
        object.__setattr__(self, "_template", base)
        self.members, self.cma = nn.ModuleList(), nn.ModuleList()
        self._runs: dict[int, dict] = {}  # member index -> the running member_forward's inputs and captured states
        self.config.n_members = 0
        for _ in range(n):
            self.add_member()
        self.generation_config = getattr(base, "generation_config", None) or GenerationConfig.from_model_config(config)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, CrossModelAttention):
            module.reset_parameters()

    @property
    def n_members(self) -> int:
        return len(self.members)

    def add_member(self) -> None:
        """Append a new member: a copy of the base sharing its weights, a fresh LoRA and (m ≥ 2) zero-output CMA blocks."""
        from peft import LoraConfig, inject_adapter_in_model

        base, m = self._template, self.n_members
        shared = {id(t): t for t in [*base.parameters(), *base.buffers()]}
        member = copy.deepcopy(base, memo=shared)
        lora = self.config.lora
        inject_adapter_in_model(LoraConfig(r=lora.get("r", 16), lora_alpha=lora.get("alpha", 32), lora_dropout=lora.get("dropout", 0.05),
                                           target_modules=lora.get("target_modules", "all-linear")), member)
        text = base.config.get_text_config()
        heads = self.config.cma_heads or text.num_attention_heads
        blocks = nn.ModuleDict({str(layer): CrossModelAttention(text.hidden_size, text.hidden_size, heads) for layer in self.config.layers} if m else {})
        blocks.to(device=next(base.parameters()).device, dtype=base.dtype)  # a member added mid-run (phased) joins on the base's device
        self.members.append(member)
        self.cma.append(blocks)
        decoder_layers = member.base_model.layers
        for layer in self.config.layers:
            decoder_layers[layer - 1].register_forward_hook(self._layer_hook(m, layer))
        self.config.n_members = m + 1
        self.set_trainable(m)

    def set_trainable(self, m: int) -> None:
        """Train only member m's LoRA and CMA weights; every other member is frozen (and kept in eval mode)."""
        self.trainable_member = m
        for name, p in self.named_parameters(remove_duplicate=False):
            p.requires_grad_(self.is_saved(name) and self.member_of(name) == m)
        self.train(self.training)

    @staticmethod
    def member_of(name: str) -> int:
        """The member index of parameter `name` ("members.1.…" or "cma.1.…")."""
        return int(name.split(".")[1])

    @staticmethod
    def is_saved(name: str) -> bool:
        """Whether `name` is LLMBoost's own weight (a member's LoRA or a CMA block) rather than the base's."""
        return name.startswith("cma.") or (name.startswith("members.") and "lora_" in name)

    def train(self, mode: bool = True) -> LlmBoostForCausalLM:
        super().train(mode)
        for m in range(min(getattr(self, "trainable_member", 0), self.n_members)):
            self.members[m].eval()  # frozen predecessors: no LoRA dropout in the states they hand on
            self.cma[m].eval()
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.members[0].get_input_embeddings()

    def get_output_embeddings(self) -> None:
        return None  # each member's head is used through the member; nothing here to tie or resize

    def new_member_cache(self, m: int) -> MemberCache:
        """An empty KV cache for member m (0-based): its decoder layers plus one CMA K/V layer per ℓ ∈ S (m ≥ 1)."""
        return MemberCache(DynamicCache(config=self.members[m].config), [DynamicLayer() for _ in self.cma[m]])

    def new_cache(self) -> LlmBoostCache:
        """An empty KV cache for the whole chain."""
        return LlmBoostCache([self.new_member_cache(m) for m in range(self.n_members)])

    def _layer_hook(self, m: int, layer: int):
        def hook(module, args, output):
            run = self._runs.get(m)
            if run is None:  # the member called directly, outside member_forward: a plain LoRA model
                return None
            h = output
            if m > 0:
                block = self.cma[m][str(layer)]
                k, v = block.kv(run["prev"][layer].to(h.dtype))
                if run["cache"] is not None:
                    k, v = run["cache"].cma[self.config.layers.index(layer)].update(k, v)
                h = block(h, k, v, run["mask"])
            run["states"][layer] = h
            return h if m > 0 else None
        return hook

    def member_forward(self, m: int, input_ids: torch.LongTensor, prev_states: dict[int, torch.Tensor] | None = None,
                       cache: MemberCache | None = None, attention_mask: torch.Tensor | None = None,
                       position_ids: torch.LongTensor | None = None, logits_to_keep: int | torch.Tensor = 0,
                       ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Member m's (0-based) logits and its states at S, given member m−1's states at S for the same new tokens.

        With `cache` (from `new_member_cache(m)`), only the new tokens are passed and both the member's KV cache
        and its CMA K/V cache grow; `attention_mask` then covers the cached and the new positions.
        """
        if m > 0 and (prev_states is None or set(prev_states) != set(self.config.layers)):
            raise ValueError(f"member {m} needs member {m - 1}'s states at layers {self.config.layers}")
        self._runs[m] = {"prev": prev_states, "cache": cache, "mask": attention_mask, "states": {}}
        try:
            out = self.members[m](input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  past_key_values=None if cache is None else cache.lm, use_cache=cache is not None,
                                  logits_to_keep=logits_to_keep)
            return out.logits, self._runs[m]["states"]
        finally:
            del self._runs[m]

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: LlmBoostCache | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                labels: torch.LongTensor | None = None, **kwargs) -> LlmBoostOutput:
        """The chain's next-token logits (only at `logits_to_keep`), and its last predecessor's logits there."""
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        if past_key_values is not None and not isinstance(past_key_values, LlmBoostCache):
            raise TypeError(f"LLMBoost needs an LlmBoostCache (model.new_cache()), got {type(past_key_values).__name__}")
        last = self.n_members - 1
        states, logits, prev = None, None, None
        for m in range(self.n_members):
            keep = logits_to_keep if m >= last - 1 else 1  # only the last two members' logits are used
            cache = None if past_key_values is None else past_key_values.members[m]
            frozen = m < getattr(self, "trainable_member", last)
            with torch.no_grad() if frozen else contextlib.nullcontext():
                out_logits, states = self.member_forward(m, input_ids, states, cache, attention_mask, position_ids, keep)
            prev, logits = logits, out_logits
        if self.config.ensemble == "additive" and prev is not None:
            logits = logits + self.config.beta * prev
        loss = None
        if labels is not None:  # transformers' convention, for use outside ftray's loop
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return LlmBoostOutput(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None, prev_logits=prev)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs):
        # generate() would make a DynamicCache from this config, which has no layers of its own: give it the chain's.
        if model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False:
            model_kwargs["past_key_values"] = self.new_cache()
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def manifest(self) -> dict:
        """The chain's order and S, as written to `manifest.json`."""
        return {"format": "ftray-llmboost/1", "base_model": self.config.base_model, "layers": self.config.layers,
                "members": [{"member": m + 1, "cma_layers": self.config.layers if m else []} for m in range(self.n_members)],
                "finished_stages": self.n_members, "ensemble": self.config.ensemble, "beta": self.config.beta}

    def save_pretrained(self, save_directory, state_dict: dict | None = None, **kwargs) -> None:
        """Save the members' LoRA and the CMA weights, the config naming the base, and `manifest.json`."""
        state_dict = self.state_dict() if state_dict is None else state_dict
        own = {k: v for k, v in state_dict.items() if self.is_saved(k)}
        super().save_pretrained(save_directory, state_dict=own, **kwargs)
        path = Path(save_directory)
        old = json.loads((path / MANIFEST).read_text()) if (path / MANIFEST).exists() else {}
        (path / MANIFEST).write_text(json.dumps({**old, **self.manifest()}, indent=2))

    def load_own_weights(self, path: str | Path, strict: bool = True) -> None:
        """Load the members' LoRA and CMA weights from a chain directory's safetensors (keys of absent members ignored)."""
        path = Path(path)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{path}: no *.safetensors with LLMBoost's own weights (LoRA, CMA)")
        weights = {k: v for f in files for k, v in load_file(f).items() if self.member_of(k) < self.n_members}
        missing, unexpected = self.load_state_dict(weights, strict=False)
        missing = [k for k in missing if self.is_saved(k)]
        if strict and (missing or unexpected):
            raise ValueError(f"{path}: LLMBoost weights do not match the model built from its config "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config: LlmBoostConfig | None = None,
                        dtype: torch.dtype | str | None = None, members: int | None = None, base: PreTrainedModel | None = None,
                        **kwargs) -> LlmBoostForCausalLM:
        """Load the base from the name in the checkpoint's config, build the members and load their weights.

        `members=k` keeps the first k members (e.g. member 1 alone); `base` reuses an already loaded base model.
        Other `from_pretrained` arguments (device_map, revision, ...) are ignored: the model is built on CPU in full.
        """
        from ftray.models import load_model, resolve_model_path

        path = Path(resolve_model_path(str(pretrained_model_name_or_path)))
        config = config if isinstance(config, LlmBoostConfig) else LlmBoostConfig.from_pretrained(path)
        if not config.base_model:
            raise ValueError(f"{path}: config.json names no base_model; an LLMBoost chain needs the base model's name")
        if members is not None:
            if not 1 <= members <= config.n_members:
                raise ValueError(f"{path}: members={members}, but the chain has {config.n_members}")
            config.n_members = members
        model = cls(config, base=base if base is not None else load_model(config.base_model, gguf_file=config.base_gguf_file))
        model.load_own_weights(path)
        if dtype not in (None, "auto"):
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return model.eval()


AutoConfig.register(MODEL_TYPE, LlmBoostConfig, exist_ok=True)
AutoModelForCausalLM.register(LlmBoostConfig, LlmBoostForCausalLM, exist_ok=True)
