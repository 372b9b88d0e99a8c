"""Batching tokenized rows: padded batches, and packed rows whose examples cannot see each other.

How packing stays exact (transformers 5.19, `masking_utils.create_causal_mask`): when a forward pass
gets `position_ids` and `attention_mask is None` and `past_key_values is None`, transformers finds
where position_ids stop increasing by one (`find_packed_sequence_indices`) and ANDs the causal mask
with a same-sequence mask, per batch row. So a packed batch must be fed as

    model(input_ids=..., position_ids=..., labels=..., use_cache=False)   # no attention_mask

- `use_cache=False` is required: Llama-style models default to `config.use_cache=True`, which
  creates an empty DynamicCache even in training, and with any cache the packed check is skipped,
  so examples would silently attend to the previous examples in the row.
- sdpa (the default), eager and flex attention build the block-diagonal mask for any batch size;
  flash_attention_2 derives its varlen boundaries from position_ids only when the batch size is 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ftray.data.errors import DataError
from ftray.data.tokenize import IGNORE_INDEX, SPAN_PROMPT, TASK_TYPE


def _padded_length(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def collate(rows: Sequence[dict], pad_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest: input_ids, labels (-100 on pads), attention_mask, span_ids (0 on pads).

    When every row carries a `task_type`, the batch gets it too, as a (batch,) tensor.
    """
    n = _padded_length(max(len(r["input_ids"]) for r in rows), pad_to_multiple_of)
    batch = {
        "input_ids": torch.full((len(rows), n), pad_id, dtype=torch.long),
        "labels": torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), n), dtype=torch.long),
        "span_ids": torch.full((len(rows), n), SPAN_PROMPT, dtype=torch.long),
    }
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        for key in ("input_ids", "labels", "span_ids"):
            batch[key][i, :k] = torch.as_tensor(r[key], dtype=torch.long)
        batch["attention_mask"][i, :k] = 1
    if all(r.get(TASK_TYPE) is not None for r in rows):
        batch[TASK_TYPE] = torch.tensor([r[TASK_TYPE] for r in rows], dtype=torch.long)
    return batch


class _FirstFit:
    """First-fit bin choice in O(log n): a max-segment-tree over the bins' free space.

    Unopened bins start with full capacity, so "the leftmost bin with room" opens a new bin exactly
    when no open bin has room, which is the greedy first-fit rule.
    """

    def __init__(self, n_items: int, capacity: int):
        self.size = 1 << max(0, (n_items - 1).bit_length())
        self.free = [capacity] * (2 * self.size)

    def place(self, need: int) -> int:
        i = 1
        while i < self.size:
            i = 2 * i if self.free[2 * i] >= need else 2 * i + 1
        self.free[i] -= need
        leaf = i - self.size
        i //= 2
        while i:
            self.free[i] = max(self.free[2 * i], self.free[2 * i + 1])
            i //= 2
        return leaf


def pack(rows: Iterable[dict], max_len: int) -> list[dict]:
    """Greedy first-fit packing into rows of <= max_len tokens (see the module docstring for how to feed them).

    Output rows: input_ids, labels, span_ids, position_ids (restarting at 0 per example), length.
    """
    rows = list(rows)
    if not rows:
        return []
    fit = _FirstFit(len(rows), max_len)
    bins: list[list[dict]] = []
    for i, r in enumerate(rows, 1):
        n = len(r["input_ids"])
        if n > max_len:
            raise DataError(f"tokenized row {i} has {n} tokens, more than the packing length {max_len}; "
                            "tokenize with data.max_len <= the packing length")
        b = fit.place(n)
        if b == len(bins):
            bins.append([])
        bins[b].append(r)
    packed = []
    for members in bins:
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "span_ids": [], "position_ids": []}
        for r in members:
            n = len(r["input_ids"])
            row["input_ids"] += list(r["input_ids"])
            # the first label of an example is never a target when it stands alone (targets are
            # shifted by one); masking it here stops the previous example's last token predicting it
            row["labels"] += [IGNORE_INDEX] + list(r["labels"][1:])
            row["span_ids"] += list(r["span_ids"])
            row["position_ids"] += list(range(n))
        row["length"] = len(row["input_ids"])
        packed.append(row)
    return packed


def collate_packed(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad packed rows: input_ids, labels, span_ids, position_ids; no attention_mask (see module docstring).

    Pads get position_ids 0, 1, 2, ... so they form their own sequence that no real token attends to.
    """
    n = max(len(r["input_ids"]) for r in rows)
    batch = {
        "input_ids": torch.full((len(rows), n), pad_id, dtype=torch.long),
        "labels": torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long),
        "span_ids": torch.full((len(rows), n), SPAN_PROMPT, dtype=torch.long),
        "position_ids": torch.zeros((len(rows), n), dtype=torch.long),
    }
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        for key in ("input_ids", "labels", "span_ids", "position_ids"):
            batch[key][i, :k] = torch.as_tensor(r[key], dtype=torch.long)
        batch["position_ids"][i, k:] = torch.arange(n - k)
    return batch
