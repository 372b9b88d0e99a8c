"""ftray's data layer: load rows, recognise their format, tokenize with masked prompts and spans, batch and pack.

    ds = load_rows("bundled:arithmetic")                  # or a .jsonl/.json/.csv/.parquet, a dir, a HF id
    fmt = detect_format(ds)                               # chat | alpaca | sharegpt | prompt_completion | cot | classification
    tok = tokenize_dataset(ds, tokenizer, fmt, max_len=512, source_name="bundled:arithmetic")
    batch = collate(tok.to_list()[:8], pad_id=tokenizer.pad_token_id)    # or collate_packed(pack(...), ...)
"""

from ftray.data.answers import extract_answer, normalize_answer
from ftray.data.bundled import BUNDLED
from ftray.data.errors import DataError
from ftray.data.formats import (
    FORMATS,
    detect_format,
    format_prompt,
    reference_answer,
    to_messages,
    validate_rows,
)
from ftray.data.packing import collate, collate_packed, pack
from ftray.data.sources import load_rows
from ftray.data.tokenize import (
    IGNORE_INDEX,
    SPAN_ANSWER,
    SPAN_PROMPT,
    SPAN_RATIONALE,
    SPAN_RESPONSE,
    render_prompt,
    tokenize_dataset,
)

__all__ = [
    "BUNDLED", "FORMATS", "IGNORE_INDEX", "SPAN_ANSWER", "SPAN_PROMPT", "SPAN_RATIONALE", "SPAN_RESPONSE",
    "DataError", "collate", "collate_packed", "detect_format", "extract_answer", "format_prompt", "load_rows",
    "normalize_answer", "pack", "reference_answer", "render_prompt", "to_messages", "tokenize_dataset",
    "validate_rows",
]
