"""Run a registered merge over checkpoints: stream them into a float64 sum, merge per tensor, write.

    from ftray.merge import merge_checkpoints
    merge_checkpoints("lines", ["runs/a/final", "runs/b/final"], "merged/ab", base="smollm2-135m", beta=0.6)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from ftray.eval.loading import load_checkpoint
from ftray.merge.checkpoints import (
    MergeError, add_into, check_compatible, check_out, check_same_tensors, describe, num_layers, write_merged,
)
from ftray.merge.registry import MERGES, MergeMethod


def build_merge(method: str, count: int, layers: int, params: dict[str, Any]) -> MergeMethod:
    """Instantiate registered merge `method` with `params`, failing with the method's known fields."""
    cls = MERGES.get(method.replace("-", "_"))
    if cls is None:
        raise MergeError(f"unknown merge method {method!r}; known: {', '.join(sorted(MERGES))}")
    try:
        config = cls.Config.model_validate(params)
    except ValidationError as err:
        fields = ", ".join(cls.Config.model_fields) or "none"
        raise MergeError(f"{cls.name}: {'; '.join(e['msg'] + ' ' + '.'.join(map(str, e['loc'])) for e in err.errors())} "
                         f"(its parameters: {fields})") from None
    return cls(config, count, layers)


def load_weights(ref: str) -> tuple[Any, Any]:
    """(model, tokenizer) with full weights: a LoRA adapter comes back merged into its base."""
    return load_checkpoint(ref, merge=True)


def merge_checkpoints(method: str, checkpoints: list[str], out: str | Path, base: str | None = None, **params: Any) -> Path:
    """Merge `checkpoints` with `method` (against `base` when it needs one); write a normal HF checkpoint."""
    if not checkpoints:
        raise MergeError("no checkpoints to merge")
    custom = getattr(MERGES.get(method.replace("-", "_")), "merge", None)
    if custom is not None:  # a method whose ingredients are not (only) full checkpoints, e.g. sparse_diff's φ files
        return custom(checkpoints, out, base=base, **params)
    check_out(Path(out))
    ingredients = [describe(c) for c in checkpoints]
    merger = build_merge(method, len(checkpoints), num_layers(ingredients[0].arch, checkpoints[0]), params)
    if merger.needs_base and base is None:
        raise MergeError(f"{merger.name} needs the base model the checkpoints were fine-tuned from")
    shared = check_compatible(ingredients, describe(base) if base else None)

    model = tokenizer = summed = None
    for ref in checkpoints:  # one checkpoint in memory at a time, plus the sum and the first as skeleton
        loaded, tok = load_weights(ref)
        summed = add_into(summed, loaded.state_dict(), ref)
        if model is None:
            model, tokenizer = loaded, tok
    base_state = load_weights(base)[0].state_dict() if merger.needs_base else None
    if base_state is not None:
        check_same_tensors(summed, {k: v for k, v in base_state.items() if v.is_floating_point()}, str(base))
    weights = model.state_dict()  # the skeleton's live tensors, overwritten below
    with torch.no_grad():
        for key in list(summed):  # merge and write back one tensor at a time: no second full copy
            theta0 = base_state[key].double() if base_state is not None else None
            weights[key].copy_(merger.tensor(key, summed.pop(key), theta0).to(weights[key].dtype))
    record = {
        "method": merger.name, "paper": merger.paper, "params": merger.resolved(), "base": base,
        "base_model": shared, "checkpoints": [str(c) for c in checkpoints], "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return write_merged(model, tokenizer, out, record, like=checkpoints[0])
