"""Sparse-diff composition (LT-SFT, Ansell et al., ACL 2022): θ = θ⁰ + Σ_t φ_t.

A sparse difference φ = (θ−θ⁰)·[|θ−θ⁰| > 1e-7] is stored as `sparse_diff.safetensors`: per tensor
its flat indices (int64) and values (float64), with shapes and the base model in the metadata.
LT-SFT's `finalize` writes one beside its exported model; any full checkpoint also yields one
(extracted against the base). Values are float64 because the difference of two fp32/bf16 weights is
exact there: applying φ to its own base reproduces the fine-tuned weights bit for bit, and reverting
restores θ⁰ bit for bit. Composition sums the φs in float64 before adding them to θ⁰ once, so it does
not depend on their order (exactly for two φs, which float addition commutes; for more, as long as
float64 sums of the fp32 differences are exact, i.e. their exponents span fewer than 29 bits).

    ftray merge sparse-diff smollm2-135m runs/lang/final runs/task/final --out composed
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from ftray.merge.checkpoints import MergeError, check_compatible, check_out, describe, resolve, write_merged
from ftray.merge.registry import MergeConfig, MergeMethod, register

DIFF_FILE = "sparse_diff.safetensors"
FORMAT = "ftray-sparse-diff/1"


@dataclass
class SparseDiff:
    """φ as COO over each tensor's flattened view: sorted flat indices and float64 values per parameter name."""

    indices: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    shapes: dict[str, list[int]]

    def nnz(self) -> int:
        """Number of stored (nonzero) entries."""
        return sum(v.numel() for v in self.values.values())


@torch.no_grad()
def extract_diff(tuned: dict[str, torch.Tensor], base: dict[str, torch.Tensor], threshold: float = 1e-7) -> SparseDiff:
    """φ = (θ−θ⁰)·[|θ−θ⁰| > threshold] for the floating-point tensors of `tuned` (names → tensors)."""
    indices, values, shapes = {}, {}, {}
    for name, t in tuned.items():
        if not t.is_floating_point():
            continue
        if base[name].shape != t.shape:
            raise MergeError(f"{name}: shape {tuple(t.shape)} differs from the base's {tuple(base[name].shape)}")
        d = t.detach().cpu().flatten().double() - base[name].detach().cpu().flatten().double()
        idx = (d.abs() > threshold).nonzero().flatten()
        if idx.numel():
            indices[name], values[name], shapes[name] = idx, d[idx], list(t.shape)
    return SparseDiff(indices, values, shapes)


def save_diff(diff: SparseDiff, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write φ as a safetensors file: `<name>::indices` and `<name>::values` per tensor."""
    tensors = {f"{n}::{kind}": t.contiguous() for n in diff.indices for kind, t in (("indices", diff.indices[n]), ("values", diff.values[n]))}
    meta = {"format": FORMAT, "shapes": json.dumps(diff.shapes), **{k: str(v) for k, v in (metadata or {}).items()}}
    save_file(tensors, str(path), metadata=meta)
    return Path(path)


def load_diff(path: str | Path) -> tuple[SparseDiff, dict[str, str]]:
    """Read a φ file written by `save_diff`; returns it and the file's metadata."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise MergeError(f"{path}: not a sparse difference written by ftray (format {meta.get('format')!r})")
        shapes = json.loads(meta["shapes"])
        diff = SparseDiff({n: f.get_tensor(f"{n}::indices") for n in shapes}, {n: f.get_tensor(f"{n}::values") for n in shapes}, shapes)
    return diff, meta


def _target(params: dict[str, torch.Tensor], name: str, shape: list[int]) -> torch.Tensor:
    if name not in params:
        raise MergeError(f"the sparse difference has {name!r}, which the model does not have")
    if list(params[name].shape) != shape:
        raise MergeError(f"{name}: the sparse difference has shape {shape}, the model {list(params[name].shape)}")
    return params[name]


@torch.no_grad()
def apply_diff(model: torch.nn.Module, diff: SparseDiff, sign: float = 1.0) -> torch.nn.Module:
    """θ += sign·φ in place (float64 arithmetic, rounded once into each weight's dtype)."""
    params = dict(model.named_parameters())
    for name, idx in diff.indices.items():
        flat = _target(params, name, diff.shapes[name]).data.view(-1)
        idx = idx.to(flat.device)
        flat[idx] = (flat[idx].double() + sign * diff.values[name].to(flat.device)).to(flat.dtype)
    return model


def revert_diff(model: torch.nn.Module, diff: SparseDiff) -> torch.nn.Module:
    """θ −= φ in place: the inverse of `apply_diff` on the base φ was extracted from."""
    return apply_diff(model, diff, sign=-1.0)


@torch.no_grad()
def compose(model: torch.nn.Module, diffs: list[SparseDiff]) -> torch.nn.Module:
    """θ⁰ + Σ_t φ_t in place: the φs are summed in float64 first, so their order does not matter."""
    params = dict(model.named_parameters())
    for name in sorted({n for d in diffs for n in d.indices}):
        p = next(_target(params, name, d.shapes[name]) for d in diffs if name in d.indices)
        total = torch.zeros(p.numel(), dtype=torch.float64)
        for d in diffs:
            if name in d.indices:
                total.index_add_(0, d.indices[name], d.values[name])  # overlapping entries simply add (paper, step 9)
        flat = p.data.view(-1)
        flat.copy_((flat.double().cpu() + total).to(flat.dtype))
    return model


class SparseDiffConfig(MergeConfig):
    threshold: float = Field(1e-7, ge=0, description="For a full checkpoint without an exported φ: entries of θ−θ⁰ at most this large are dropped (LT-SFT's 1e-7).")


@register
class SparseDiffMerge(MergeMethod):
    """Add sparse differences (φ files, dirs holding one, or full checkpoints) to the base: θ⁰ + Σ_t φ_t."""

    name = "sparse_diff"
    paper = "Ansell et al. 2022, Composable Sparse Fine-Tuning for Cross-Lingual Transfer (2110.07560)"
    Config = SparseDiffConfig

    @classmethod
    def merge(cls, checkpoints: list[str], out: str | Path, base: str | None = None, **params: Any) -> Path:
        """Compose the ingredients' φs onto `base`; write a normal HF checkpoint with merge.yaml.

        `merge_checkpoints` hands over to this method because its ingredients need not be full checkpoints.
        """
        try:
            config = SparseDiffConfig.model_validate(params)
        except ValidationError as err:
            raise MergeError(f"{cls.name}: {'; '.join(e['msg'] for e in err.errors())} (its parameters: threshold)") from None
        if base is None:
            raise MergeError("sparse_diff needs the base model the differences were trained from")
        check_out(Path(out))
        base_ing = describe(base)
        own = resolve(base)
        from ftray.eval.loading import load_checkpoint  # heavy (transformers, PEFT): only when merging

        model, tokenizer = load_checkpoint(base, merge=True)
        base_params = {n: p.detach().clone() for n, p in model.named_parameters()}
        diffs = []
        for ref in checkpoints:
            path = Path(ref)
            file = path if path.is_file() else path / DIFF_FILE
            if file.is_file():
                diff, meta = load_diff(file)
                if meta.get("base_model") and meta["base_model"] != own:
                    raise MergeError(f"{ref} is a difference from {meta['base_model']}, not from the base {base} ({own})")
            else:  # a full checkpoint: its difference from the base
                check_compatible([describe(ref)], base_ing)
                tuned = dict(load_checkpoint(ref, merge=True)[0].named_parameters())
                missing = sorted(base_params.keys() - tuned.keys())
                if missing:
                    raise MergeError(f"{ref}: weights differ from the base's (missing {missing[:3]})")
                diff = extract_diff({n: tuned[n] for n in base_params}, base_params, config.threshold)
            diffs.append(diff)
        compose(model, diffs)
        record = {
            "method": cls.name, "paper": cls.paper, "params": config.model_dump(), "base": base, "base_model": own,
            "checkpoints": [str(c) for c in checkpoints], "nnz": [d.nnz() for d in diffs], "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        return write_merged(model, tokenizer, out, record)
