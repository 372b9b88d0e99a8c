"""LEVI's model as one transformers model: pre-trained P + small from-scratch G + adapting layers A_k.

`LeviForCausalLM` (config `LeviConfig`, model_type "ftray_levi") is registered with the Auto classes on
import (`ftray.models.load_model` imports `ftray.methods`), so a LEVI checkpoint loads with
`AutoModelForCausalLM.from_pretrained` in training export, `ftray eval` and `ftray serve` alike.

    g   = G(x)                                    last hidden state of G, [B, T, d_G]
    z_k = n(h_P^(L)) + A_k([n(h_P^(l_k)); g])     A_k = Linear(d_P+d_G → d_A) → GELU → Linear(d_A → d_P)
    logits = lm_head_P(mean_k z_k) = mean_k lm_head_P(z_k)

Decisions (the spec marks these [inf]; each is tested in tests/methods/test_levi.py):
- Checkpoint: only G, the A_k and P's LoRA weights (base_mode "lora") are written; `config.json` names
  the base model (`base_model`, an alias, hub id or absolute local path, plus `base_gguf_file`) and keeps
  P's config. `from_pretrained` is overridden: it loads P from that name (`ftray.models`), then the
  saved weights over it, strictly. transformers' own loader would build P on the meta device and
  expect its weights in the checkpoint. P stays a registered submodule, so `.to()`, DDP and autocast
  treat the model as one; `save_pretrained` drops P's weights instead.
- n is P's final norm. Every tapped layer is seen through it (h_P^(L) is already normed), so each
  adapter input and the head input are at the scale P's head was trained on.
- Residual (default): each view adds its adapter's output to P's last state n(h_P^(L)), and the
  adapters' output layers start at zero, so at step 0 LEVI's logits are exactly P's. The spec's
  literal z_k = A_k(...) (`residual: false`) starts from random logits over the whole vocabulary,
  which a from-scratch G at lr 1e-3 must first unlearn, and loses P's prediction in the meantime.
- Ensemble: the head is linear, so the mean of the views' logits is the head of the views' mean;
  one head matmul instead of K (equal up to float rounding; the per-view logits are still returned
  in training when the per-view loss needs them).
- G is a Llama decoder (RMSNorm, RoPE, SwiGLU) whatever P's family: it only needs P's vocabulary.
  Its MLP width is 4·d_G.
- KV cache: one `LeviCache`, a DynamicCache whose layers are P's then G's; P and G each get a view
  (a DynamicCache over their own layer objects), so both decode incrementally and the HF engine's
  continuous batcher, which only edits `cache.layers`, merges, trims and drops rows of both at once:
  one forward per token, no change to serving. `generate()` gets the same cache.
- A frozen P runs under `torch.no_grad()` and stays in eval mode while the model trains.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoConfig, AutoModelForCausalLM, DynamicCache, GenerationConfig, GenerationMixin, LlamaConfig, LlamaModel,
    PretrainedConfig, PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

MODEL_TYPE = "ftray_levi"
_BASE_KEYS = ("vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


class LeviConfig(PretrainedConfig):
    """P's name and config, G's and the adapters' sizes, and how P is tuned."""

    model_type = MODEL_TYPE

    def __init__(self, base_model: str | None = None, base_gguf_file: str | None = None, base_config: dict | None = None,
                 layers: list[int] | None = None, task_layers: int = 2, task_hidden: int = 128, task_heads: int = 2,
                 adapter_hidden: int = 256, residual: bool = True, per_view_loss: float = 0.0,
                 base_mode: str = "frozen", lora: dict | None = None, **kwargs) -> None:
        self.base_model, self.base_gguf_file, self.base_config = base_model, base_gguf_file, base_config or {}
        self.layers = list(layers or [])
        self.task_layers, self.task_hidden, self.task_heads = task_layers, task_hidden, task_heads
        self.adapter_hidden, self.residual, self.per_view_loss = adapter_hidden, residual, per_view_loss
        self.base_mode, self.lora = base_mode, lora
        for key in _BASE_KEYS:  # what engines and generate read from `model.config`
            kwargs.setdefault(key, self.base_config.get(key))
        kwargs["tie_word_embeddings"] = False  # P's head is P's own business; this wrapper ties nothing
        super().__init__(**kwargs)

    def task_config(self) -> LlamaConfig:
        """G's config: a small Llama decoder over P's vocabulary."""
        return LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.task_hidden, intermediate_size=4 * self.task_hidden,
            num_hidden_layers=self.task_layers, num_attention_heads=self.task_heads, num_key_value_heads=self.task_heads,
            max_position_embeddings=self.max_position_embeddings or 2048, pad_token_id=self.pad_token_id,
            bos_token_id=None, eos_token_id=None, tie_word_embeddings=False,
        )


class LeviCache(DynamicCache):
    """P's cache layers then G's, in one DynamicCache; `.base` and `.task` are views over the same layer objects."""

    def __init__(self, base: DynamicCache, task: DynamicCache) -> None:
        super().__init__()
        self.base, self.task = base, task
        self.layers = [*base.layers, *task.layers]


@dataclass
class LeviOutput(CausalLMOutputWithPast):
    """The ensembled logits, plus each view's logits when the per-view loss needs them."""

    view_logits: tuple[torch.Tensor, ...] | None = None


class Adapter(nn.Sequential):
    """A_k: Linear(d_in → d_A) → GELU → Linear(d_A → d_out), the output layer starting at zero."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default init for the first layer; zeros for the output (LEVI starts as P, see module doc)."""
        self[0].reset_parameters()
        nn.init.zeros_(self[2].weight)
        nn.init.zeros_(self[2].bias)


class LeviForCausalLM(PreTrainedModel, GenerationMixin):
    """P (`.base`), G (`.task`) and the adapting layers (`.adapters`); see the module docstring."""

    config_class = LeviConfig
    base_model_prefix = "levi"  # no such attribute: `.base_model` is the wrapper itself
    main_input_name = "input_ids"
    _no_split_modules = ["LlamaDecoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: LeviConfig, base: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        if base is None:  # structure only (random P); from_pretrained passes the loaded P
            base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config.base_config))
        d_p, d_g = base.config.get_text_config().hidden_size, config.task_hidden
        self.task = LlamaModel(config.task_config())
        self.adapters = nn.ModuleList(Adapter(d_p + d_g, config.adapter_hidden, d_p) for _ in config.layers)
        self.post_init()
        # Attached after post_init: its weight (re-)initialisation must not touch P's loaded weights.
        self.base = base
        if config.base_mode == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            lora = config.lora or {}
            inject_adapter_in_model(LoraConfig(r=lora.get("r", 8), lora_alpha=lora.get("alpha", 16), lora_dropout=lora.get(
                "dropout", 0.05), target_modules=lora.get("target_modules", ["q_proj", "v_proj"])), self.base)
        self.generation_config = getattr(base, "generation_config", None) or GenerationConfig.from_model_config(config)
        self.freeze_base()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, Adapter):
            module.reset_parameters()

    def freeze_base(self) -> None:
        """Train only G, the adapters and (base_mode "lora") P's LoRA weights."""
        for name, p in self.named_parameters():
            p.requires_grad_(self.is_saved(name))

    def is_saved(self, name: str) -> bool:
        """Whether parameter/state key `name` is LEVI's own (saved and trained) rather than P's pre-trained weight."""
        return not name.startswith("base.") or (self.config.base_mode == "lora" and "lora_" in name)

    def train(self, mode: bool = True) -> LeviForCausalLM:
        super().train(mode)
        if self.config.base_mode == "frozen":
            self.base.eval()  # a frozen feature extractor: no dropout in P's views
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def get_output_embeddings(self) -> None:
        return None  # P's head is used through `self.base`; nothing here to tie or resize

    @property
    def num_base_layers(self) -> int:
        return self.base.config.get_text_config().num_hidden_layers

    def new_cache(self) -> LeviCache:
        """An empty KV cache for P and G."""
        return LeviCache(DynamicCache(config=self.base.config), DynamicCache(config=self.task.config))

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: LeviCache | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                labels: torch.LongTensor | None = None, **kwargs) -> LeviOutput:
        """Ensembled next-token logits (only at `logits_to_keep`, as transformers' causal LMs do)."""
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        if past_key_values is not None and not isinstance(past_key_values, LeviCache):
            raise TypeError(f"LEVI needs a LeviCache (model.new_cache()), got {type(past_key_values).__name__}")
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "use_cache": use_cache}
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        frozen = self.config.base_mode == "frozen"
        decoder = self.base.base_model
        base_cache, task_cache = (None, None) if past_key_values is None else (past_key_values.base, past_key_values.task)
        with torch.no_grad() if frozen else contextlib.nullcontext():
            out_p = decoder(**inputs, past_key_values=base_cache, output_hidden_states=True)
            last = out_p.last_hidden_state[:, keep]  # after the final norm
            taps = [last if l == self.num_base_layers else decoder.norm(out_p.hidden_states[l][:, keep]) for l in self.config.layers]
        g = self.task(**inputs, past_key_values=task_cache).last_hidden_state[:, keep]
        views = [adapter(torch.cat([h, g.to(h.dtype)], dim=-1)) for h, adapter in zip(taps, self.adapters)]
        if self.config.residual:
            views = [last + z for z in views]
        head = self.base.get_output_embeddings()
        logits = head(torch.stack(views).mean(0))
        view_logits = tuple(head(z) for z in views) if self.training and self.config.per_view_loss > 0 else None
        loss = None
        if labels is not None:  # transformers' convention, for use outside ftray's loop
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return LeviOutput(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None, view_logits=view_logits)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs):
        # generate() would make a DynamicCache from this config, which has no layers of its own: give it P's and G's.
        if model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False:
            model_kwargs["past_key_values"] = self.new_cache()
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def save_pretrained(self, save_directory, state_dict: dict | None = None, **kwargs) -> None:
        """Save G, the adapters and any LoRA on P, plus the config naming P (P's weights are not written)."""
        state_dict = self.state_dict() if state_dict is None else state_dict
        own = {k: v for k, v in state_dict.items() if self.is_saved(k)}
        super().save_pretrained(save_directory, state_dict=own, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config: LeviConfig | None = None,
                        dtype: torch.dtype | str | None = None, **kwargs) -> LeviForCausalLM:
        """Load P from the name in the checkpoint's config, then G, the adapters and any LoRA from the checkpoint.

        Other `from_pretrained` arguments (device_map, revision, ...) are not supported and are ignored: the model
        is built on CPU in full and moved with `.to()` by its user, as ftray's engines and loop do.
        """
        from ftray.models import load_model, resolve_model_path

        path = Path(resolve_model_path(str(pretrained_model_name_or_path)))
        config = config if isinstance(config, LeviConfig) else LeviConfig.from_pretrained(path)
        if not config.base_model:
            raise ValueError(f"{path}: config.json names no base_model; a LEVI checkpoint needs the base model's name")
        base = load_model(config.base_model, gguf_file=config.base_gguf_file)
        model = cls(config, base=base)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{path}: no *.safetensors with LEVI's own weights (G, adapters)")
        weights = {k: v for f in files for k, v in load_file(f).items()}
        missing, unexpected = model.load_state_dict(weights, strict=False)
        missing = [k for k in missing if model.is_saved(k)]
        if missing or unexpected:
            raise ValueError(f"{path}: LEVI weights do not match the model built from its config "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        if dtype not in (None, "auto"):
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return model.eval()


AutoConfig.register(MODEL_TYPE, LeviConfig, exist_ok=True)
AutoModelForCausalLM.register(LeviConfig, LeviForCausalLM, exist_ok=True)
