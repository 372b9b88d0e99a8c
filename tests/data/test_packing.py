"""collate / pack / collate_packed, and the property that matters: packed rows give the same token losses."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from ftray.data import DataError, collate, collate_packed, load_rows, pack, tokenize_dataset


def fake_row(n: int, start: int = 10) -> dict:
    ids = list(range(start, start + n))
    half = n // 2
    return {"input_ids": ids, "labels": [-100] * half + ids[half:], "span_ids": [0] * half + [1] * (n - half)}


def naive_first_fit(lengths: list[int], max_len: int) -> list[list[int]]:
    bins: list[list[int]] = []
    for i, n in enumerate(lengths):
        for b in bins:
            if sum(lengths[j] for j in b) + n <= max_len:
                b.append(i)
                break
        else:
            bins.append([i])
    return bins


def test_collate_pads_right() -> None:
    batch = collate([fake_row(3), fake_row(5)], pad_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    assert batch["input_ids"][0].tolist() == [10, 11, 12, 0, 0, 0, 0, 0]
    assert batch["labels"][0].tolist() == [-100, 11, 12] + [-100] * 5
    assert batch["span_ids"][0].tolist() == [0, 1, 1, 0, 0, 0, 0, 0]


def test_pack_is_greedy_first_fit() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(300)]
    rows = [fake_row(n, start=1000 * i) for i, n in enumerate(lengths)]
    packed = pack(rows, max_len=100)
    expected = naive_first_fit(lengths, 100)
    assert [p["input_ids"] for p in packed] == [sum((rows[i]["input_ids"] for i in b), []) for b in expected]
    for p, members in zip(packed, expected):
        assert p["length"] == len(p["input_ids"]) <= 100
        assert p["position_ids"] == sum((list(range(lengths[i])) for i in members), [])
        starts = [k for k, pos in enumerate(p["position_ids"]) if pos == 0]
        assert all(p["labels"][k] == -100 for k in starts)  # no target across an example boundary


def test_pack_rejects_rows_longer_than_max_len() -> None:
    with pytest.raises(DataError, match="row 2 has 9 tokens, more than the packing length 8"):
        pack([fake_row(4), fake_row(9)], max_len=8)


def test_collate_packed_has_no_attention_mask_and_pads_form_their_own_sequence() -> None:
    packed = pack([fake_row(3), fake_row(2), fake_row(4)], max_len=6)
    batch = collate_packed(packed, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "span_ids", "position_ids"}
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["labels"][1, 4].item() == -100 and batch["input_ids"][1, 4].item() == 0


def token_losses(model, batch: dict) -> torch.Tensor:
    """Cross-entropy of every labelled token (targets shifted by one), flattened."""
    labels = batch.pop("labels")
    batch.pop("span_ids")
    logits = model(**batch).logits[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    return F.cross_entropy(logits[keep].float(), targets[keep], reduction="none")


@pytest.fixture(scope="module")
def tokenized(tiny_tokenizer):
    rows = []
    for name, fmt in [("arithmetic", "cot"), ("factual_qa", "prompt_completion"), ("classification", "classification")]:
        rows += list(tokenize_dataset(load_rows(f"bundled:{name}", max_samples=6), tiny_tokenizer, fmt, max_len=256))
    return rows


def test_packed_rows_give_the_same_token_losses(tiny_model_dir, tiny_tokenizer, tokenized) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert model.config._attn_implementation == "sdpa"
    packed = pack(tokenized, max_len=256)
    assert 1 < len(packed) < len(tokenized)  # several packed rows in one batch, several examples per row
    with torch.no_grad():
        plain = token_losses(model, collate(tokenized, pad_id=tiny_tokenizer.pad_token_id))
        batch = collate_packed(packed, pad_id=tiny_tokenizer.pad_token_id)
        packed_losses = token_losses(model, dict(batch, use_cache=False))
        hf_plain = model(**collate(tokenized, pad_id=tiny_tokenizer.pad_token_id)).loss
        hf_packed = model(**{k: v for k, v in batch.items() if k != "span_ids"}, use_cache=False).loss
    assert packed_losses.numel() == plain.numel()
    torch.testing.assert_close(packed_losses.sum(), plain.sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_losses.sort().values, plain.sort().values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hf_packed, hf_plain, rtol=1e-5, atol=1e-5)


def test_packing_needs_use_cache_false(tiny_model_dir, tiny_tokenizer, tokenized) -> None:
    """Documents the transformers 5.19 pitfall the packing docstring warns about.

    With config.use_cache=True (the Llama default) the model creates a cache even in training mode,
    and create_causal_mask skips packed-sequence detection whenever a cache exists, so examples in a
    packed row attend to each other. If this starts passing with equal losses, the warning can go.
    """
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).train()
    assert model.config.use_cache
    batch = collate_packed(pack(tokenized, max_len=256), pad_id=tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        leaky = token_losses(model, dict(batch))
        exact = token_losses(model, dict(batch, use_cache=False))
    assert not torch.allclose(leaky.sum(), exact.sum(), rtol=1e-5, atol=1e-5)
