"""Evaluation of classification, retrieval and vision-language checkpoints (causal LM: `ftray.eval.evaluate`)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from ftray.config import build_spec
from ftray.data import load_rows
from ftray.eval.loading import load_checkpoint, task_of


def spec_of(path: str | Path) -> dict[str, Any]:
    """The run spec saved beside a checkpoint ({} when there is none)."""
    f = Path(path) / "ftray_spec.yaml"
    return yaml.safe_load(f.read_text()) if f.exists() else {}


def evaluate_task(model_ref: str, source: str | None = None, split: str = "test", max_samples: int | None = None,
                  threads: int | None = None) -> dict[str, Any]:
    """Classification metrics, retrieval ranking metrics or vision-language exact match of a checkpoint, on its own eval data by default."""
    from ftray.tasks import get_task
    from ftray.tasks.classification import metrics, predict
    from ftray.tasks.retrieval import corpus_rows, evaluate_retrieval

    if threads:
        torch.set_num_threads(threads)
    raw = spec_of(model_ref)
    spec = build_spec({k: raw[k] for k in ("model", "task", "data") if k in raw})
    source = source or spec.data.eval_source or spec.data.source
    kind, _ = task_of(model_ref)
    model, tokenizer = load_checkpoint(model_ref)
    ds = load_rows(source, split, max_samples)
    head = {"model": model_ref, "task": kind, "source": source, "split": split}
    if kind == "vision_language":
        from ftray.models import load_processor
        from ftray.tasks.vision_language import evaluate_vision_language

        return {**head, **evaluate_vision_language(model, load_processor(model_ref), ds.to_list())}
    if kind == "classification":
        rows = get_task(spec).tokenize(ds, tokenizer, f"{source}[{split}]")
        probs = predict(model, rows, tokenizer.pad_token_id)
        train = load_rows(spec.data.source, spec.data.split, spec.data.max_samples)["label"]  # frequency bands
        counts = [sum(1 for y in train if y == k) for k in range(probs.shape[1])]
        return {**head, **metrics(probs, torch.tensor([r["labels"] for r in rows]), counts)}
    with tempfile.TemporaryDirectory(prefix="ftray-encoder-") as tmp:  # Ray Data actors load a plain model dir
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        corpus = corpus_rows(spec.task.eval_corpus)
        return {**head, **evaluate_retrieval(tmp, ds.to_list(), corpus, spec.task.pooling)}
