"""Model-editing metrics: reliability, generality and locality of a model on a set of edit requests.

    ftray eval runs/locft/final --edits          # bundled:factual_edits, base model from the run's spec

Rows need `prompt`, `answer` (the edited target), `rephrase` and `locality_prompt` (see
`ftray.data.bundled.factual_edits`). Answers are greedy generations of at most 32 tokens cut at the
first sentence end, newline or EOS (LocFT-BF's protocol), compared after `normalize_answer`:
- reliability: the answer to the edit prompt is the new target;
- generality: the answer to the rephrased prompt is the new target;
- locality: the answer to an unrelated prompt is the same as the unedited base model's (EasyEdit's
  reading of specificity; the base model need not know the fact, it must only be left alone).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import ray
import torch

from ftray.data import load_rows, normalize_answer
from ftray.eval.generate import generate
from ftray.eval.loading import base_model_of, load_checkpoint

EDIT_FIELDS = ("prompt", "answer", "rephrase", "locality_prompt")
_STOP = re.compile(r"\.(?=\s|$)|\n")  # "3.5" does not end the answer; "Paris." and "Paris\n..." do


def first_answer(text: str) -> str:
    """The generation up to its first sentence end or newline, normalized."""
    return normalize_answer(_STOP.split(text.strip(), maxsplit=1)[0])


def answers(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy first answers to single-turn user `prompts`."""
    outs = generate(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts], max_new_tokens)
    return [first_answer(o) for o in outs]


def edit_scores(rows: list[dict], reliable: list[str], general: list[str], local: list[str], local_base: list[str]) -> dict[str, float]:
    """The three metrics from the answers to each row's edit prompt, rephrase and locality prompt."""
    targets = [normalize_answer(r["answer"]) for r in rows]
    n = max(1, len(rows))
    return {
        "reliability": sum(a == t for a, t in zip(reliable, targets)) / n,
        "generality": sum(a == t for a, t in zip(general, targets)) / n,
        "locality": sum(a == b for a, b in zip(local, local_base)) / n,
    }


def evaluate_edits(model_ref: str, base_ref: str | None = None, source: str = "bundled:factual_edits", split: str = "train",
                   max_samples: int | None = None, max_new_tokens: int = 32, threads: int | None = None) -> dict[str, Any]:
    """Reliability, generality and locality of `model_ref` on the edit rows of `source`.

    `base_ref` is the unedited model locality compares with; by default the base recorded in the
    checkpoint's run spec (or adapter config).
    """
    if threads:
        torch.set_num_threads(threads)
    rows = load_rows(source, split, max_samples).to_list()
    missing = [f for f in EDIT_FIELDS if f not in (rows[0] if rows else {})]
    if missing:
        raise ValueError(f"{source}[{split}]: edit rows need the fields {', '.join(EDIT_FIELDS)}; missing {', '.join(missing)}")
    if base_ref is None:
        ckpt = Path(model_ref)
        if not ((ckpt / "ftray_spec.yaml").exists() or (ckpt / "adapter_config.json").exists()):
            raise ValueError(f"{model_ref}: not an ftray checkpoint, so its base model is unknown; pass the base (--base) for locality")
        base_ref = base_model_of(ckpt)[0]
    locality_prompts = [r["locality_prompt"] for r in rows]
    base, base_tok = load_checkpoint(base_ref)
    local_base = answers(base, base_tok, locality_prompts, max_new_tokens)
    del base
    model, tokenizer = load_checkpoint(model_ref)
    reliable = answers(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens)
    general = answers(model, tokenizer, [r["rephrase"] for r in rows], max_new_tokens)
    local = answers(model, tokenizer, locality_prompts, max_new_tokens)
    examples = [{"prompt": r["prompt"], "target": r["answer"], "output": a} for r, a in list(zip(rows, reliable))[:3]]
    return {"model": model_ref, "base": base_ref, "source": source, "split": split, "n": len(rows),
            **edit_scores(rows, reliable, general, local, local_base), "examples": examples}


def evaluate_edits_on_ray(model_ref: str, num_cpus: int = 2, **kwargs: Any) -> dict[str, Any]:
    """Run `evaluate_edits` as a Ray task (on the cluster when attached to one)."""
    task = ray.remote(num_cpus=num_cpus)(evaluate_edits)
    return ray.get(task.remote(model_ref, threads=num_cpus, **kwargs))
