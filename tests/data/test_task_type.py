"""An optional per-row `task_type` integer survives tokenization and reaches the batch; batches work without it."""

from __future__ import annotations

import datasets
import pytest

from ftray.data import DataError, collate, load_rows, pack, tokenize_dataset


def test_task_type_reaches_the_batch(tiny_tokenizer) -> None:
    ds = load_rows("bundled:factual_qa", max_samples=4)
    ds = ds.add_column("task_type", [1, 0, 1, 0])
    tok = tokenize_dataset(ds, tiny_tokenizer, "prompt_completion", max_len=64).to_list()
    assert [r["task_type"] for r in tok] == [1, 0, 1, 0]
    batch = collate(tok, pad_id=tiny_tokenizer.pad_token_id)
    assert batch["task_type"].tolist() == [1, 0, 1, 0] and batch["task_type"].shape == (4,)


def test_batches_without_task_type_are_unchanged(tiny_tokenizer) -> None:
    tok = tokenize_dataset(load_rows("bundled:factual_qa", max_samples=2), tiny_tokenizer, "prompt_completion", 64)
    assert "task_type" not in tok.column_names
    assert set(collate(tok.to_list(), pad_id=0)) == {"input_ids", "labels", "attention_mask", "span_ids"}
    assert "task_type" not in pack(tok.to_list(), 128)[0]  # a packed row mixes examples: no single type


def test_non_integer_task_type_names_the_row(tiny_tokenizer) -> None:
    ds = datasets.Dataset.from_dict({"prompt": ["a?", "c?"], "completion": ["b", "d"], "task_type": ["1", "knowledge"]})
    with pytest.raises(DataError, match="row 1.*task_type"):
        tokenize_dataset(ds, tiny_tokenizer, "prompt_completion", 64)
