"""Depth upscaling (Yi: Open Foundation Models, 01.AI, 2403.04652, the Yi-9B section): grow a model
deeper by duplicating a contiguous block of middle decoder layers, chosen where each layer's output is
nearly its input (cosine close to 1), then continue training.

    ftray merge depth-upscale smollm2-135m --out merged/smollm2-38 --n-layers 8    # block chosen by cosine
    ftray merge --depth-upscale smollm2-135m --out merged/smollm2-38 --block 11,19  # the issue's spelling

The layer order is mergekit's "passthrough" slice merge of one model with itself: layers 0..e−1, then a
copy of s..e−1, then e..L−1. This file holds the one implementation (`choose_block`, `upscale`); the
training method `ftray.methods.depth_upscale` calls it from `prepare_model`.

Decisions (the paper gives only Yi-6B → Yi-9B, 32 → 48 layers by duplicating layers 12–28):
- n_layers defaults to half the layers (Yi's 16 of 32).
- Candidate blocks leave out the first and the last layer (which change the representation the most;
  Yi's block 12–28 also stays off both ends) whenever the model is deep enough, otherwise any block.
- A block's score is the mean over its layers of each layer's input/output cosine, averaged over the
  real (non-pad) tokens of the calibration text; ties go to the earliest block.
- Calibration text is the first `calibration_rows` rows of a bundled dataset rendered with the
  tokenizer's chat template: fixed text, so every Ray Train worker chooses the same block.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator

from ftray.merge.checkpoints import MergeError, check_out, resolve, write_merged
from ftray.merge.registry import MergeConfig, MergeMethod, register

PAPER = "Young et al. 2024, Yi: Open Foundation Models by 01.AI (2403.04652), depth upscaling of Yi-9B"
ZEROED = ("self_attn.o_proj", "mlp.down_proj")  # the residual writers of a Llama-style block


class DepthUpscaleConfig(MergeConfig):
    block: list[int] | None = Field(
        None, description="[s, e): the layers to duplicate (0-based, end exclusive); null = choose by the cosine criterion.",
    )
    n_layers: int | None = Field(
        None, ge=1, description="Layers to duplicate when choosing by cosine; null = half the layers (Yi: 16 of 32).",
    )
    zero_copies: bool = Field(
        False, description="Zero the copies' o_proj and down_proj so the deeper model starts equal to the original "
        "(not in Yi, which copies the weights as they are).",
    )
    calibration_source: str = Field("bundled:arithmetic", description="Text for the cosine criterion (its train split).")
    calibration_rows: int = Field(32, ge=1, description="Calibration rows (the first ones of the source: fixed, same on every worker).")

    @field_validator("block")
    @classmethod
    def _block_is_a_range(cls, block: list[int] | None) -> list[int] | None:
        if block is not None and (len(block) != 2 or not 0 <= block[0] < block[1]):
            raise ValueError(f"block: expected [s, e] with 0 <= s < e, got {block}")
        return block


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of decoder blocks (children with `self_attn` or `attn`), e.g. `model.model.layers`."""
    for _, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) and all(hasattr(m, "self_attn") or hasattr(m, "attn") for m in mod):
            return mod
    raise MergeError(f"{type(model).__name__}: no list of decoder layers (modules with self_attn) to upscale")


def text_config(model: torch.nn.Module) -> Any:
    """The config that holds `num_hidden_layers` (the text config of a multimodal model)."""
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


@torch.no_grad()
def layer_cosines(model: torch.nn.Module, tokenizer: Any, texts: list[str], batch_size: int = 8) -> list[float]:
    """Per decoder layer, the mean cosine between its input and output hidden states over real tokens."""
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    mask: torch.Tensor | None = None

    def hook(i: int):
        def record(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)
            sums[i] += (cos * mask).sum().cpu()
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    training, pad = model.training, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    device = next(model.parameters()).device
    try:
        for i in range(0, len(texts), batch_size):
            ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[i : i + batch_size]]
            width = max(map(len, ids))
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
            mask = torch.tensor([[1.0] * len(x) + [0.0] * (width - len(x)) for x in ids], device=device, dtype=torch.float64)
            model(input_ids=input_ids, attention_mask=mask.long(), use_cache=False)
            count += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    return (sums / max(1, count)).tolist()


def candidate_starts(num_layers: int, n: int) -> range:
    """Block starts allowed for an n-layer block: off the first and last layer when the model is deep enough."""
    if not 1 <= n <= num_layers:
        raise MergeError(f"n_layers {n}: the model has {num_layers} layers; duplicate between 1 and {num_layers}")
    return range(1, num_layers - n) if num_layers - n >= 2 else range(0, num_layers - n + 1)


def best_block(cosines: list[float], n: int) -> tuple[int, int]:
    """The n-layer block [s, s+n) with the highest mean input/output cosine (earliest on ties)."""
    best = max(candidate_starts(len(cosines), n), key=lambda s: (sum(cosines[s : s + n]) / n, -s))
    return best, best + n


def choose_block(model: torch.nn.Module, tokenizer: Any, texts: list[str], n: int) -> tuple[int, int]:
    """The block [s, e) of n layers whose layers change the hidden state least on `texts` (Yi's criterion)."""
    return best_block(layer_cosines(model, tokenizer, texts), n)


def calibration_texts(source: str, rows: int, tokenizer: Any) -> list[str]:
    """The first `rows` rows of `source` (train split) as whole conversations: chat template, else plain lines."""
    from ftray.data import detect_format, load_rows, to_messages

    ds = load_rows(source, "train", rows)
    fmt = detect_format(ds, source)
    conversations = [to_messages(row, fmt)[0] for row in ds]
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template(m, tokenize=False) for m in conversations]
    return ["\n".join(turn["content"] for turn in m) for m in conversations]


def resolve_block(model: torch.nn.Module, tokenizer: Any, config: DepthUpscaleConfig) -> tuple[tuple[int, int], list[float] | None]:
    """The block to duplicate: `config.block`, else the cosine choice (with the per-layer cosines)."""
    num = len(decoder_layers(model))
    if config.block is not None:
        s, e = config.block
        if e > num:
            raise MergeError(f"block [{s}, {e}): the model has {num} layers (0..{num - 1})")
        return (s, e), None
    texts = calibration_texts(config.calibration_source, config.calibration_rows, tokenizer)
    cosines = layer_cosines(model, tokenizer, texts)
    return best_block(cosines, config.n_layers or max(1, num // 2)), cosines


@torch.no_grad()
def upscale(model: torch.nn.Module, block: tuple[int, int], zero_copies: bool = False) -> torch.nn.Module:
    """Insert exact copies of layers [s, e) after layer e−1, in place; renumber layers and the config."""
    layers, config = decoder_layers(model), text_config(model)
    s, e = block
    if not 0 <= s < e <= len(layers):
        raise MergeError(f"block [{s}, {e}): expected 0 <= s < e <= {len(layers)} (the model's layers)")
    # Layers keep a reference to the shared config (e.g. attention reads `_attn_implementation` from it at
    # every forward): the memo makes deepcopy share it instead of giving each copy a stale private config.
    memo = {id(model.config): model.config, id(config): config}
    copies = [copy.deepcopy(layers[i], memo) for i in range(s, e)]
    for k, layer in enumerate(copies):
        layers.insert(e + k, layer)
    for i, layer in enumerate(layers):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):  # the KV-cache slot of attention (and of any per-layer cache user)
                mod.layer_idx = i
    if isinstance(getattr(config, "layer_types", None), list):  # sliding/full attention per layer (Qwen2/3, Gemma, …)
        config.layer_types = config.layer_types[:e] + config.layer_types[s:e] + config.layer_types[e:]
    config.num_hidden_layers = len(layers)  # the decoder loops over layers[:num_hidden_layers]
    if zero_copies:
        for layer in copies:
            for name in ZEROED:
                try:
                    linear = layer.get_submodule(name)
                except AttributeError:
                    raise MergeError(f"zero_copies: {type(layer).__name__} has no {name}; it needs Llama-style blocks") from None
                linear.weight.zero_()
                if getattr(linear, "bias", None) is not None:
                    linear.bias.zero_()
    return model


@register
class DepthUpscaleMerge(MergeMethod):
    """Duplicate a middle block of one model's layers (Yi-9B's depth upscaling; mergekit passthrough order)."""

    name = "depth_upscale"
    paper = PAPER
    needs_base = False
    Config = DepthUpscaleConfig

    @classmethod
    def merge(cls, checkpoints: list[str], out: str | Path, base: str | None = None, **params: Any) -> Path:
        """Upscale the one model given (as `base` or as the only checkpoint); write it with merge.yaml."""
        from ftray.merge.run import build_merge, load_weights

        sources = [base] if base else []
        sources += list(checkpoints)
        if len(sources) != 1:
            raise MergeError(f"depth_upscale takes exactly one model to make deeper, got {len(sources)}: {sources}")
        config = build_merge(cls.name, 1, 1, params).config
        check_out(Path(out))
        model, tokenizer = load_weights(sources[0])
        before = len(decoder_layers(model))
        block, cosines = resolve_block(model, tokenizer, config)
        upscale(model, block, config.zero_copies)
        record = {
            "method": cls.name, "paper": cls.paper, "params": {**config.model_dump(), "block": list(block)},
            "source": sources[0], "source_model": resolve(sources[0]), "base_model": None,  # a new network: no task-vector base
            "layers": {"before": before, "after": len(decoder_layers(model))},
            "layer_cosines": [round(c, 6) for c in cosines] if cosines else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        return write_merged(model, tokenizer, out, record)

    def tensor(self, key: str, summed: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        """Not a per-tensor merge: the layer list itself changes (see `merge`)."""
        raise NotImplementedError("depth_upscale changes the layer list; it runs through `merge`")
