"""Held-out scoring for soups: one number per model, higher is better.

`loss` is −(token-mean next-token loss) on the split's label tokens (the same loss as training's
eval_loss; fast: one forward pass per batch). `exact_match` generates greedily and compares final
answers (what `ftray eval` reports; slow on CPU). The model-soups paper scores with held-out accuracy;
for language models negative validation loss is the cheaper stand-in it allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from ftray.data import detect_format, load_rows, tokenize_dataset
from ftray.eval.generate import exact_match, perplexity

Score = Literal["loss", "exact_match"]


@dataclass
class HeldOut:
    """Rows of a held-out split and the score a model gets on them (higher is better)."""

    name: str  # e.g. "bundled:arithmetic[test][0:100]", for reports
    rows: list[dict]  # raw rows, for exact match
    tokenized: list[dict]  # the same rows tokenized, for the loss
    fmt: str
    metric: Score
    tokenizer: Any
    max_new_tokens: int = 96

    def score(self, model: Any) -> float:
        """−loss or exact match of `model` on these rows."""
        if self.metric == "exact_match":
            return exact_match(model, self.tokenizer, self.rows, self.fmt, self.max_new_tokens)["exact_match"]
        return -math.log(perplexity(model, self.tokenized, self.tokenizer.pad_token_id))

    def halves(self) -> tuple[HeldOut, HeldOut]:
        """First and second half of the rows: one to select soup ingredients on, one to report on."""
        n = len(self.rows) // 2
        first = replace(self, name=f"{self.name}[:{n}]", rows=self.rows[:n], tokenized=self.tokenized[:n])
        second = replace(self, name=f"{self.name}[{n}:]", rows=self.rows[n:], tokenized=self.tokenized[n:])
        return first, second


@dataclass
class VLMHeldOut:
    """Held-out `{images, messages}` rows scored with a vision-language model: −(token-mean reply loss), or the
    exact match of greedy replies (POINTS' greedy soup over VLM checkpoints)."""

    name: str
    rows: list[dict]
    metric: Score
    processor: Any
    max_len: int = 1024
    batch_size: int = 4

    def score(self, model: Any) -> float:
        """−loss or exact match of `model` on these rows."""
        import datasets
        import torch

        from ftray.config import build_spec
        from ftray.tasks.vision_language import VisionLanguage, evaluate_vision_language

        if self.metric == "exact_match":
            return evaluate_vision_language(model, self.processor, self.rows)["exact_match"]
        task = VisionLanguage(build_spec({"task": {"type": "vision_language"}, "data": {"max_len": self.max_len}}))
        task._processor = self.processor
        tokenized = task.tokenize(datasets.Dataset.from_list(self.rows), self.processor.tokenizer, self.name)
        total, count = 0.0, 0
        model.eval()
        with torch.no_grad():
            for i in range(0, len(tokenized), self.batch_size):
                batch = task.collate(tokenized[i : i + self.batch_size], self.processor.tokenizer.pad_token_id)
                _, loss_sum, n = task.forward_and_loss(model, batch, None)
                total, count = total + float(loss_sum), count + int(n)
        return -total / max(1, count)

    def halves(self) -> tuple[VLMHeldOut, VLMHeldOut]:
        """First and second half of the rows."""
        n = len(self.rows) // 2
        return replace(self, name=f"{self.name}[:{n}]", rows=self.rows[:n]), replace(self, name=f"{self.name}[{n}:]", rows=self.rows[n:])


def held_out_for(checkpoint: str, source: str, split: str, max_samples: int | None, metric: Score = "loss",
                 max_len: int = 512) -> HeldOut | VLMHeldOut:
    """The held-out scorer for soups of `checkpoint`'s kind: a VLM checkpoint (its spec's task.type) scores
    image rows with its processor, any other the text rows with its tokenizer."""
    from ftray.eval.loading import task_of

    if task_of(checkpoint)[0] != "vision_language":
        return load_held_out(source, split, max_samples, tokenizer_of(checkpoint), metric, max_len)
    from ftray.models import load_processor

    if metric not in ("loss", "exact_match"):
        raise ValueError(f"held-out score {metric!r}: use 'loss' or 'exact_match'")
    return VLMHeldOut(f"{source}[{split}]", load_rows(source, split, max_samples).to_list(), metric, load_processor(checkpoint), max_len)


def display(metric: Score, score: float) -> float:
    """A score as people read it: the loss itself (lower is better), or exact match."""
    return -score if metric == "loss" else score


def tokenizer_of(ref: str) -> Any:
    """The tokenizer saved in a checkpoint dir (adapters have no config.json), else the model's."""
    from transformers import AutoTokenizer

    from ftray.models import load_tokenizer

    from ftray.data.templates import use_chat_template
    from ftray.eval.loading import chat_template_of

    if not (Path(ref) / "tokenizer_config.json").exists():
        return load_tokenizer(ref)
    tokenizer = AutoTokenizer.from_pretrained(ref)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # what load_tokenizer does for models without one
    return use_chat_template(tokenizer, chat_template_of(ref))  # score with the template the checkpoint was trained with


def load_held_out(source: str, split: str, max_samples: int | None, tokenizer: Any, metric: Score = "loss",
                  max_len: int = 512) -> HeldOut:
    """Load and tokenize a held-out split for scoring."""
    if metric not in ("loss", "exact_match"):
        raise ValueError(f"held-out score {metric!r}: use 'loss' or 'exact_match'")
    ds = load_rows(source, split, max_samples)
    fmt = detect_format(ds)
    name = f"{source}[{split}]"
    tokenized = tokenize_dataset(ds, tokenizer, fmt, max_len, source_name=name).to_list()
    return HeldOut(name, ds.to_list(), tokenized, fmt, metric, tokenizer)
