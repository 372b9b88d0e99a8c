"""Checkpoints as merge ingredients: the base and architecture each one records, its full weights
(a LoRA adapter is merged into its base first), and the merged result written as a normal HF dir.

Compatibility is decided from small files only (config.json, ftray_spec.yaml, adapter_config.json,
merge.yaml), so incompatible inputs are refused before any weights are loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ftray.models import ModelLoadError, resolve_model_path

MERGE_RECORD = "merge.yaml"
# config.json fields that must agree for two state dicts to be the same network
ARCH_KEYS = (
    "model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings",
)


class MergeError(ValueError):
    """Checkpoints that cannot be merged, or an unusable output dir; the message says why."""


@dataclass
class Ingredient:
    """What a checkpoint (or model name) says about itself."""

    path: str
    base: str | None  # local dir of the model it was fine-tuned from; None when it records none
    arch: dict[str, Any]  # the ARCH_KEYS of its config.json


def resolve(name: str, gguf_file: str | None = None) -> str:
    """A model reference as the local HF dir it loads from, so aliases and paths compare equal."""
    try:
        return resolve_model_path(name, gguf_file)
    except ModelLoadError:
        return name


def recorded_base(path: Path) -> str | None:
    """The base model a checkpoint dir records: merge.yaml, ftray_spec.yaml, or the adapter config."""
    if (path / MERGE_RECORD).exists():
        return yaml.safe_load((path / MERGE_RECORD).read_text()).get("base_model")
    if (path / "ftray_spec.yaml").exists():
        model = yaml.safe_load((path / "ftray_spec.yaml").read_text())["model"]
        return resolve(model["name"], model.get("gguf_file"))
    if (path / "adapter_config.json").exists():
        name = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        return resolve(name) if name else None
    return None


def describe(ref: str) -> Ingredient:
    """Read a checkpoint dir's (or model name's) base and architecture without loading weights."""
    path = Path(ref)
    if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        if path.exists():
            raise MergeError(f"{ref}: not a checkpoint (no config.json or adapter_config.json)")
        try:
            path = Path(resolve_model_path(ref))  # a model name or alias: it is its own base
        except ModelLoadError as err:
            raise MergeError(f"{ref}: {err}") from None
    base = recorded_base(path)
    config_dir = path if (path / "config.json").exists() else Path(base or "")
    if not (config_dir / "config.json").exists():
        raise MergeError(f"{ref}: an adapter whose base model {base!r} is not a local directory; train or load it once first")
    config = json.loads((config_dir / "config.json").read_text())
    return Ingredient(ref, base, {k: config.get(k) for k in ARCH_KEYS})


def check_compatible(ingredients: list[Ingredient], base: Ingredient | None = None) -> str | None:
    """Refuse ingredients of different architectures or base models; return the shared base (or None)."""
    ref = base or ingredients[0]
    for ing in ingredients:
        diff = [f"{k}: {ing.arch[k]!r} vs {ref.arch[k]!r}" for k in ARCH_KEYS if ref.arch[k] != ing.arch[k]]
        if diff:
            raise MergeError(f"{ing.path} and {ref.path} have different architectures ({'; '.join(diff)}); "
                             "weights can only be merged between copies of one network")
    if base is not None:
        own = resolve(base.path)
        for ing in ingredients:
            if ing.base and ing.base != own:
                raise MergeError(f"{ing.path} was fine-tuned from {ing.base}, not from the base {base.path} ({own}); "
                                 "a task vector is only meaningful against the model it was trained from")
        return own
    bases = {ing.base for ing in ingredients if ing.base}
    if len(bases) > 1:
        listing = "; ".join(f"{ing.path} ← {ing.base}" for ing in ingredients)
        raise MergeError(f"the checkpoints were fine-tuned from different base models ({listing}); "
                         "a soup needs ingredients fine-tuned from one shared pre-trained model")
    return bases.pop() if bases else None


def num_layers(arch: dict[str, Any], ref: str) -> int:
    """The number of transformer blocks recorded in config.json."""
    if not arch.get("num_hidden_layers"):
        raise MergeError(f"{ref}: config.json has no num_hidden_layers")
    return int(arch["num_hidden_layers"])


def add_into(summed: dict[str, torch.Tensor] | None, state: dict[str, torch.Tensor], ref: str) -> dict[str, torch.Tensor]:
    """Add a state dict's floating-point tensors into a float64 running sum (integer buffers are not averaged)."""
    floats = {k: v for k, v in state.items() if v.is_floating_point()}
    if summed is None:
        return {k: v.detach().to(torch.float64, copy=True) for k, v in floats.items()}
    check_same_tensors(summed, floats, ref)
    for k, v in floats.items():
        summed[k] += v.detach().to(torch.float64)
    return summed


def check_same_tensors(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], ref: str) -> None:
    """Fail, naming the first key, unless `state` has exactly `expected`'s keys and shapes."""
    missing, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or extra:
        raise MergeError(f"{ref}: weights differ from the first checkpoint's (missing {missing[:3]}, extra {extra[:3]})")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise MergeError(f"{ref}: {k} has shape {tuple(v.shape)}, the first checkpoint {tuple(expected[k].shape)}")


@torch.no_grad()
def assign(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Copy `tensors` into `model`'s weights in place, in each weight's own dtype."""
    state = model.state_dict()  # references to the live parameters and buffers
    for k, v in tensors.items():
        state[k].copy_(v.to(state[k].dtype))
    return model


def check_out(out: Path) -> None:
    """Refuse an existing, non-empty output dir unless an earlier merge wrote it."""
    if out.exists() and any(out.iterdir()) and not (out / MERGE_RECORD).exists():
        raise MergeError(f"--out {out}: exists and is not an earlier merge's output; choose a new directory")


# a vision-language checkpoint's processor (image processor, processor config, chat template) beside its tokenizer
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja", "ftray_spec.yaml")


def write_merged(model: Any, tokenizer: Any, out: str | Path, record: dict[str, Any], like: str | Path | None = None) -> Path:
    """Write model (safetensors), tokenizer and merge.yaml to `out` atomically: a temp dir renamed into place
    (with `like`'s processor files, so a soup of VLM checkpoints loads with its image processor)."""
    out = Path(out)
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name in PROCESSOR_FILES if like is not None else ():
            if (Path(like) / name).is_file():
                shutil.copy2(Path(like) / name, tmp / name)
        (tmp / MERGE_RECORD).write_text(yaml.safe_dump(record, sort_keys=False))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
