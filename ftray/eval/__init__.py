"""Evaluation: exact match by greedy generation, perplexity; `evaluate` runs both on a model or checkpoint."""

from __future__ import annotations

from typing import Any

import ray
import torch

from ftray.data import detect_format, load_rows, tokenize_dataset
from ftray.data.templates import use_chat_template
from ftray.eval.generate import exact_match, perplexity
from ftray.eval.loading import load_checkpoint, task_of
from ftray.eval.tasks import evaluate_task


def evaluate(model_ref: str, source: str | None = None, split: str = "test", max_samples: int | None = 200,
             max_new_tokens: int = 96, max_len: int = 512, threads: int | None = None, prompt_prefix: str = "",
             chat_template: str | None = None) -> dict[str, Any]:
    """Exact match (generation) and perplexity of `model_ref` (checkpoint dir, path or alias) on a split.

    `prompt_prefix` goes before every rendered prompt (a UL2 mode token such as "[S2S]", see
    `ftray.methods.ul2.mode_prompt`). Classification and retrieval checkpoints get their task's
    metrics instead (`ftray.eval.tasks`). `chat_template` (a `data.chat_template` name) overrides the one
    the checkpoint was trained with, e.g. to score a base model as its fine-tuned version will be prompted.
    """
    if task_of(model_ref)[0] != "causal_lm":
        return evaluate_task(model_ref, source, split, max_samples, threads)
    source = source or "bundled:arithmetic"
    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_checkpoint(model_ref)
    if chat_template:
        use_chat_template(tokenizer, chat_template)
    ds = load_rows(source, split, max_samples)
    fmt = detect_format(ds)
    rows = ds.to_list()
    result = exact_match(model, tokenizer, rows, fmt, max_new_tokens, prefix=prompt_prefix)
    tokenized = tokenize_dataset(ds, tokenizer, fmt, max_len, source_name=f"{source}[{split}]").to_list()
    result["perplexity"] = perplexity(model, tokenized, tokenizer.pad_token_id)
    return {"model": model_ref, "source": source, "split": split, **result}


def evaluate_on_ray(model_ref: str, num_cpus: int = 2, **kwargs: Any) -> dict[str, Any]:
    """Run `evaluate` as a Ray task (on the cluster when attached to one).

    Retrieval runs in the caller instead: its corpus embedding is itself a Ray Data job, whose actors
    would wait forever for the CPUs this task holds on a small machine.
    """
    if task_of(model_ref)[0] == "retrieval":
        return evaluate(model_ref, **kwargs)
    task = ray.remote(num_cpus=num_cpus)(evaluate)
    return ray.get(task.remote(model_ref, threads=num_cpus, **kwargs))
