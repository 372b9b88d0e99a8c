"""Pick rows of a `ray.data.Dataset` by position, for the data methods that choose rows on the driver.

    ds = ds.materialize()                    # positions refer to this order (the pipeline keeps order)
    tags = [r["source"] for r in ds.select_columns(["source"]).take_all()]
    out = take_rows(ds, [7, 3, 3, 0])        # rows 7, 3, 3, 0 in that order (repeats allowed)

The driver decides which positions to keep from small columns (a source tag, a score, a hash
signature); the rows themselves (prompts, replies, messages) stay in Ray's object store. Ray Data
has no gather-by-position (its `zip` with a range is deprecated, and a sort by an output-position
column costs an all-to-all shuffle, many seconds even for a few hundred rows), so a Ray task per chunk of
picks takes the rows from the dataset's Arrow blocks (one worker holds the whole dataset, as the
pipeline's final parquet write does anyway) and the chunks become a dataset again, in order.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

CHUNK_ROWS = 50_000  # output rows per gather task


def _gather(picks: np.ndarray, *blocks: pa.Table) -> pa.Table:
    table = pa.concat_tables([b for b in blocks if b.num_rows] or blocks[:1], promote_options="permissive")
    return table.take(pa.array(picks, pa.int64()))


@functools.cache
def _gather_task() -> object:
    import ray  # not at import time: listing methods must not import Ray

    return ray.remote(num_cpus=1)(_gather)


def take_rows(ds: Any, picks: Sequence[int] | np.ndarray) -> Any:
    """The rows of `ds` at positions `picks` (0-based, in the dataset's order), in that order; a position may repeat."""
    import ray.data

    picks = np.asarray(picks, dtype=np.int64)
    if not len(picks):
        return ds.limit(0)
    blocks, task = ds.to_arrow_refs(), _gather_task()
    return ray.data.from_arrow_refs([task.remote(picks[i:i + CHUNK_ROWS], *blocks) for i in range(0, len(picks), CHUNK_ROWS)])


def prompt_and_response(row: dict) -> tuple[str, str]:
    """A row's prompt text (its user/system turns) and response text (its assistant turns), in any chat-convertible format."""
    from ftray.data.formats import format_of_columns, to_messages

    fmt = format_of_columns(row)
    if fmt is None:
        return "", ""
    messages = to_messages(row, fmt)[0]
    prompt = "\n".join(m["content"] for m in messages if m["role"] != "assistant")
    return prompt, "\n".join(m["content"] for m in messages if m["role"] == "assistant")


def preview(row: dict, width: int = 60) -> str:
    """A one-line look at a row for a data report: the prompt's start → the response's start."""
    prompt, response = prompt_and_response(row)
    cut = lambda s: " ".join(s.split())[:width]  # noqa: E731
    return f"{cut(prompt)} → {cut(response)}"
