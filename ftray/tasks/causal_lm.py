"""The causal-LM task: chat-formatted rows, loss on the reply tokens (the default task)."""

from __future__ import annotations

from typing import Any

import datasets
import torch

from ftray.config import RunSpec
from ftray.data import collate, collate_packed, detect_format, pack, tokenize_dataset
from ftray.models import load_model
from ftray.train.loss import Criterion, forward_and_loss


class CausalLM:
    """Next-token prediction on the assistant reply (chat, prompt/completion, cot, classification-as-text rows)."""

    name = "causal_lm"

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec

    def load_model(self) -> torch.nn.Module:
        """The model with its LM head."""
        m = self.spec.model
        return load_model(m.name, dtype=m.dtype, gguf_file=m.gguf_file)

    def tokenize(self, ds: datasets.Dataset, tokenizer: Any, source: str) -> list[dict]:
        """Rows → input_ids/labels/span_ids (packed when data.packing)."""
        d = self.spec.data
        fmt = detect_format(ds, source) if d.format == "auto" else d.format
        rows = tokenize_dataset(ds, tokenizer, fmt, d.max_len, source_name=source, chat_template=d.chat_template,
                                train_on_prompt=d.train_on_prompt).to_list()
        if "label_keep" in ds.column_names:  # token pruning by a data method (Q-Tuning): a mask over the label tokens
            from ftray.methods.q_tuning import apply_label_keep

            rows = apply_label_keep(rows, ds["label_keep"])
        return pack(rows, d.max_len) if d.packing else rows

    def collate(self, rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """A padded (or packed) micro-batch."""
        return collate_packed(rows, pad_id) if self.spec.data.packing else collate(rows, pad_id)

    def forward_and_loss(self, model: torch.nn.Module, batch: dict, amp: torch.dtype | None,
                         criterion: Criterion | None = None) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """(output, summed loss over label tokens, label-token count)."""
        return forward_and_loss(model, batch, amp, criterion)
