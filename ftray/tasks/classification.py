"""Sequence classification: a linear head on a decoder's last non-pad token, labels from a `label` column.

Rows are `{text, label}` (label an int in [0, num_labels); `label_name` is optional and only used in
reports). The text is tokenized as is, without a chat template: the head reads the final token's
state, which for a decoder is the only one that has seen the whole text.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import datasets
import torch
import torch.nn.functional as F

from ftray.config import RunSpec
from ftray.data.errors import DataError, row_error
from ftray.models import load_model
from ftray.train.loss import Criterion

# Frequency bands of the long-tailed-recognition literature (Liu et al. 2019, OLTR): a class is "head"
# with more than 100 training examples, "tail" with fewer than 20, "medium" in between.
HEAD_MIN, TAIL_MAX = 100, 20


class Classification:
    """Cross-entropy over `num_labels` classes on `AutoModelForSequenceClassification`."""

    name = "classification"

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec

    def load_model(self) -> torch.nn.Module:
        """The backbone with a freshly initialised `score` head of `task.num_labels` outputs."""
        m = self.spec.model
        return load_model(m.name, dtype=m.dtype, gguf_file=m.gguf_file, task="classification",
                          num_labels=self.spec.task.num_labels)

    def tokenize(self, ds: datasets.Dataset, tokenizer: Any, source: str) -> list[dict]:
        """Rows → {input_ids, labels (one int), length}; bad rows are named by number."""
        for col in ("text", "label"):
            if col not in ds.column_names:
                raise DataError(f"{source}: task.type=classification needs columns 'text' and 'label'; found {ds.column_names}")
        texts, labels = list(ds["text"]), list(ds["label"])
        n = self.spec.task.num_labels
        for i, (text, label) in enumerate(zip(texts, labels), 1):
            if not isinstance(text, str) or not text.strip():
                raise row_error(source, i, f"'text' must be a non-empty string, got {text!r}")
            if not isinstance(label, int) or isinstance(label, bool) or label < 0 or (n and label >= n):
                raise row_error(source, i, f"'label' must be an integer in [0, {n or 'num_labels'}), got {label!r}")
        enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=self.spec.data.max_len)
        return [{"input_ids": ids, "labels": y, "length": len(ids)} for ids, y in zip(enc["input_ids"], labels)]

    def collate(self, rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """Right-padded input_ids and attention_mask [B, T], labels [B]."""
        return {**pad(rows, pad_id), "labels": torch.tensor([r["labels"] for r in rows])}

    def forward_and_loss(self, model: torch.nn.Module, batch: dict, amp: torch.dtype | None,
                         criterion: Criterion | None = None) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """(out with logits [B, C] and features [B, H], summed loss, batch size)."""
        out = forward(model, batch, amp)
        loss_sum = criterion(out.logits, batch["labels"]) if criterion else None
        if loss_sum is None:
            loss_sum = F.cross_entropy(out.logits, batch["labels"], reduction="sum")
        return out, loss_sum, torch.tensor(len(batch["labels"]))


def pad(rows: list[dict], pad_id: int, key: str = "input_ids") -> dict[str, torch.Tensor]:
    """Right-pad `rows[i][key]` token lists: input_ids and attention_mask [B, T]."""
    n = max(len(r[key]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r[key])] = torch.as_tensor(r[key])
        mask[i, : len(r[key])] = 1
    return {"input_ids": ids, "attention_mask": mask}


def forward(model: torch.nn.Module, batch: dict, amp: torch.dtype | None) -> SimpleNamespace:
    """Logits (float32) and the pooled features the head reads (the last real token's final state)."""
    device_type = batch["input_ids"].device.type
    with torch.autocast(device_type, dtype=amp or torch.float32, enabled=amp is not None):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True, use_cache=False)
    last = batch["attention_mask"].sum(1) - 1  # right padding: the head pools this same token
    features = out.hidden_states[-1][torch.arange(len(last), device=last.device), last]
    return SimpleNamespace(logits=out.logits.float(), features=features.float(), hidden_states=out.hidden_states)


@torch.no_grad()
def predict(model: torch.nn.Module, rows: list[dict], pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """Class probabilities [N, C] for tokenized rows."""
    from ftray.models import default_autocast_dtype

    model.eval()
    amp = default_autocast_dtype(model.device.type)
    probs = []
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(model.device) for k, v in pad(rows[i : i + batch_size], pad_id).items()}
        probs.append(forward(model, batch, amp).logits.softmax(-1).cpu())
    return torch.cat(probs)


def metrics(probs: torch.Tensor, labels: torch.Tensor, train_counts: list[int], bins: int = 15) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class / worst-class / head-medium-tail accuracy and ECE.

    Written out rather than taken from scikit-learn: each is a line or two on a confusion matrix, and
    the head/medium/tail bands and ECE are not in scikit-learn anyway.
    """
    c = probs.shape[1]
    conf, pred = probs.max(1)
    cm = torch.zeros(c, c, dtype=torch.long)
    cm.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)  # rows = true class
    support, tp = cm.sum(1), cm.diag()
    per_class = [float(tp[k] / support[k]) if support[k] else None for k in range(c)]
    precision = tp / cm.sum(0).clamp(min=1)
    recall = tp / support.clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros(c))
    present = support > 0
    bands = {"head": [k for k in range(c) if train_counts[k] > HEAD_MIN],
             "tail": [k for k in range(c) if train_counts[k] < TAIL_MAX]}
    bands["medium"] = [k for k in range(c) if k not in bands["head"] + bands["tail"]]
    correct = (pred == labels).float()
    ece = 0.0
    edges = torch.linspace(0, 1, bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += float(inside.float().mean() * (conf[inside].mean() - correct[inside].mean()).abs())
    out = {
        "accuracy": float(correct.mean()),
        "macro_f1": float(f1[present].mean()),
        "per_class_accuracy": per_class,
        "worst_class_accuracy": min(a for a in per_class if a is not None),
        "ece": ece,
        "n": len(labels),
    }
    for band, classes in bands.items():
        rows = torch.isin(labels, torch.tensor(classes, dtype=torch.long))
        out[f"{band}_accuracy"] = float(correct[rows].mean()) if rows.any() else None
    return out
