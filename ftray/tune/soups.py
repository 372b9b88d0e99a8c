"""Model soups (Wortsman et al., 2203.05482): uniform and greedy, over checkpoints that share a base.

Uniform averages every ingredient. Greedy (the paper's recipe 2) scores each ingredient on held-out
data, sorts them best first, starts from the best one and adds the next only if the held-out score of
the average strictly rises — one pass, rejected ingredients are not reconsidered — so the soup never
scores below its best ingredient on that data. LoRA ingredients are merged into their base first:
averaging merged weights averages the dense updates s·B·A, which averaging the factors would not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ftray.merge import merge_checkpoints
from ftray.merge.checkpoints import add_into, check_compatible, check_out, check_same_tensors, describe, write_merged
from ftray.merge.run import load_weights
from ftray.tune.heldout import HeldOut, VLMHeldOut


@dataclass
class SoupResult:
    """A soup written to `path`, with what it was made of and, for greedy, the held-out scores."""

    path: Path
    kind: str
    ingredients: list[str]  # accepted ingredients (all of them for uniform)
    order: list[str] = field(default_factory=list)  # greedy: every candidate, best held-out score first
    scores: dict[str, float] = field(default_factory=dict)  # greedy: each candidate's own held-out score
    score: float | None = None  # greedy: the soup's held-out score


def uniform_soup(checkpoints: list[str], out: str | Path) -> SoupResult:
    """Average all `checkpoints` (model soups' uniform recipe)."""
    path = merge_checkpoints("uniform", checkpoints, out)
    return SoupResult(path, "uniform", list(checkpoints))


@torch.no_grad()
def set_mean(model: Any, summed: dict[str, torch.Tensor], count: int, extra: dict[str, torch.Tensor] | None = None) -> Any:
    """Write (summed + extra) / count into `model`'s weights, one tensor at a time."""
    weights = model.state_dict()
    for k, s in summed.items():
        mean = (s + extra[k].double()) / count if extra is not None else s / count
        weights[k].copy_(mean.to(weights[k].dtype))
    return model


def greedy_soup(checkpoints: list[str], held_out: HeldOut | VLMHeldOut, out: str | Path) -> SoupResult:
    """Model soups' greedy recipe: add ingredients in order of held-out score while the score strictly rises."""
    check_out(Path(out))
    shared = check_compatible([describe(c) for c in checkpoints])
    scores = {c: held_out.score(load_weights(c)[0]) for c in checkpoints}
    order = sorted(checkpoints, key=lambda c: -scores[c])  # stable: ties keep the given order
    model, tokenizer = load_weights(order[0])
    summed, best, accepted = add_into(None, model.state_dict(), order[0]), scores[order[0]], [order[0]]
    for ref in order[1:]:
        state = {k: v for k, v in load_weights(ref)[0].state_dict().items() if v.is_floating_point()}
        check_same_tensors(summed, state, ref)
        candidate = held_out.score(set_mean(model, summed, len(accepted) + 1, state))
        if candidate > best:  # strict, as in the paper: a tie adds nothing and is rejected
            add_into(summed, state, ref)
            best = candidate
            accepted.append(ref)
    set_mean(model, summed, len(accepted))  # the accepted soup (the last candidate may have been rejected)
    record = {
        "method": "greedy_soup", "paper": "Wortsman et al. 2022, Model soups (2203.05482)", "base_model": shared,
        "held_out": held_out.name, "score": held_out.metric, "soup_score": best, "accepted": accepted,
        "candidates": [{"checkpoint": c, "score": scores[c]} for c in order],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path = write_merged(model, tokenizer, out, record, like=order[0])
    return SoupResult(path, "greedy", accepted, order, scores, best)


def soup_vs_singles(kind: str, checkpoints: list[str], out: str | Path, held_out: HeldOut) -> dict[str, Any]:
    """Make a soup on one half of `held_out`; score it, the best single and the mean single on both halves.

    The best single is the ingredient with the best score on the selection half — what picking one
    trial would give. The report half is used by nothing else, so its numbers are unbiased.
    """
    select, report = held_out.halves()
    soup = greedy_soup(checkpoints, select, out) if kind == "greedy" else uniform_soup(checkpoints, out)
    singles = {}
    for ref in checkpoints:
        model = load_weights(ref)[0]
        singles[ref] = {"select": soup.scores.get(ref) if soup.scores else select.score(model), "report": report.score(model)}
    model = load_weights(str(soup.path))[0]
    best = max(checkpoints, key=lambda c: singles[c]["select"])
    mean = {half: sum(s[half] for s in singles.values()) / len(singles) for half in ("select", "report")}
    return {
        "kind": kind, "path": str(soup.path), "ingredients": len(checkpoints), "accepted": soup.ingredients,
        "metric": held_out.metric, "select_on": select.name, "report_on": report.name,
        "soup": {"select": select.score(model), "report": report.score(model)},
        "best_single": {"checkpoint": best, **singles[best]}, "mean_single": mean, "singles": singles,
    }
