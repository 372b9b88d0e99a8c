"""Tokenize rows into input_ids, labels (loss only on the assistant replies) and per-token span ids.

The text is rendered with the run's chat template (`data.chat_template`, see `ftray.data.templates`:
the tokenizer's own, else ChatML, or a named one). Every assistant turn is learned: a turn starts
where the conversation before it, rendered with add_generation_prompt=True, ends, and it ends where
the conversation up to and including it ends, so its end-of-turn token(s) are learned too and the
model learns to stop. Everything else (system and user turns, template markup) is masked with -100,
unless `train_on_prompt` puts labels on every token. Spans are located by character offsets; the
rationale/answer spans of a chain-of-thought row are those of the final reply.

(transformers' `return_assistant_tokens_mask` does the same only for templates that carry
`{% generation %}` markers, which few do; comparing prefixes works for any template that renders
earlier turns unchanged.)
"""

from __future__ import annotations

import datasets

from ftray.data.errors import DataError, row_error
from ftray.data.formats import to_messages, validate_rows
from ftray.data.templates import render_chat

SPAN_PROMPT, SPAN_RESPONSE, SPAN_RATIONALE, SPAN_ANSWER = 0, 1, 2, 3
SPAN_IDS = {"rationale": SPAN_RATIONALE, "answer": SPAN_ANSWER}
IGNORE_INDEX = -100
TASK_TYPE = "task_type"  # optional per-row integer label, passed through to the batch
_CHUNK = 1000  # rows per batched tokenizer call: fast tokenizers parallelise inside a call


def render_prompt(prompt_messages: list[dict], tokenizer, chat_template: str = "auto") -> str:
    """The text a model continues from to produce the reply: the messages plus the generation prompt."""
    return render_chat(prompt_messages, tokenizer, chat_template, add_generation_prompt=True)


def assistant_ranges(messages: list[dict], tokenizer, chat_template: str = "auto") -> tuple[str, list[tuple[int, int]]]:
    """(full text, [(start, end) character range of each assistant turn, end-of-turn markup included]).

    Raises ValueError when the template renders an earlier part of the conversation differently on its
    own than inside the whole conversation (then the turns cannot be located).
    """
    full = render_chat(messages, tokenizer, chat_template)
    ranges = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render_chat(messages[:k], tokenizer, chat_template, add_generation_prompt=True)
        upto = full if k == len(messages) - 1 else render_chat(messages[: k + 1], tokenizer, chat_template)
        if not (full.startswith(prefix) and full.startswith(upto) and len(upto) >= len(prefix)):
            raise ValueError("the chat template renders the prompt differently on its own (with "
                             "add_generation_prompt=True) than inside the full conversation (before assistant "
                             f"message {k + 1}), so the prompt cannot be masked; use a tokenizer whose template renders "
                             "earlier turns unchanged, or set data.chat_template to a named template (chatml, ...)")
        ranges.append((len(prefix), len(upto)))
    return full, ranges


def _span_id(start: int, end: int, spans: dict[str, tuple[int, int]]) -> int:
    # a token overlapping the answer is an answer token even if it starts in the text before it
    # (" 13" starts at the space); the answer wins over the rationale for a token touching both
    for name in ("answer", "rationale"):
        if name in spans and start < spans[name][1] and end > spans[name][0]:
            return SPAN_IDS[name]
    return SPAN_RESPONSE


def _prepare(ds: datasets.Dataset, tokenizer, fmt: str, source: str,
             chat_template: str) -> tuple[list[str], list[list[tuple[int, int]]], list[dict]]:
    texts, turn_ranges, char_spans = [], [], []
    for i, row in enumerate(ds, 1):
        messages, spans = to_messages(row, fmt)
        try:
            full, ranges = assistant_ranges(messages, tokenizer, chat_template)
        except ValueError as err:
            raise row_error(source, i, str(err)) from None
        reply_start = full.find(messages[-1]["content"], ranges[-1][0])
        if spans and reply_start < 0:
            raise row_error(source, i, "the chat template changes the assistant reply's text, so the "
                            "rationale/answer spans cannot be located in it")
        texts.append(full)
        turn_ranges.append(ranges)
        char_spans.append({k: (reply_start + s, reply_start + e) for k, (s, e) in spans.items()})
    return texts, turn_ranges, char_spans


def _in_turn(start: int, ranges: list[tuple[int, int]]) -> bool:
    # a token belongs to the turn its first character is in (as the single-turn rule always did)
    return any(a <= start < b for a, b in ranges)


def tokenize_dataset(ds: datasets.Dataset, tokenizer, fmt: str, max_len: int, source_name: str = "data",
                     chat_template: str = "auto", train_on_prompt: bool = False) -> datasets.Dataset:
    """Validate and tokenize `ds`: columns input_ids, labels, span_ids, length (right-truncated to max_len).

    Labels cover every assistant turn (content and end-of-turn markup); with `train_on_prompt` every token.
    span_ids mark prompt tokens (SPAN_PROMPT) and reply tokens either way. A `task_type` column (one
    integer per row, e.g. LoRAMoE's 1 = world knowledge / 0 = downstream) is carried through unchanged
    so that `collate` can put it in the batch.
    """
    if max_len < 2:
        raise DataError(f"{source_name}: data.max_len must be at least 2, got {max_len}")
    if not getattr(tokenizer, "is_fast", True):
        raise DataError(f"{source_name}: tokenization needs a fast tokenizer (for character offsets), "
                        f"got {type(tokenizer).__name__}")
    validate_rows(ds, fmt, source_name)
    texts, turn_ranges, char_spans = _prepare(ds, tokenizer, fmt, source_name, chat_template)
    out: dict[str, list] = {"input_ids": [], "labels": [], "span_ids": [], "length": []}
    for lo in range(0, len(texts), _CHUNK):
        enc = tokenizer(texts[lo:lo + _CHUNK], add_special_tokens=False, return_offsets_mapping=True)
        for j, (ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
            i = lo + j
            in_reply = [_in_turn(s, turn_ranges[i]) for s, _ in offsets]
            first = next((t for t, r in enumerate(in_reply) if r), len(ids))
            if first >= min(len(ids), max_len):
                raise row_error(source_name, i + 1, f"the prompt takes {first} tokens, leaving no reply tokens within "
                                f"data.max_len={max_len} (the whole example is {len(ids)} tokens); raise data.max_len "
                                "or shorten the prompt")
            ids, offsets, in_reply = list(ids[:max_len]), offsets[:max_len], in_reply[:max_len]
            out["input_ids"].append(ids)
            out["labels"].append(ids if train_on_prompt else [t if r else IGNORE_INDEX for t, r in zip(ids, in_reply)])
            out["span_ids"].append([_span_id(s, e, char_spans[i]) if r else SPAN_PROMPT
                                    for (s, e), r in zip(offsets, in_reply)])
            out["length"].append(len(ids))
    if TASK_TYPE in ds.column_names:
        out[TASK_TYPE] = _task_types(ds[TASK_TYPE], source_name)
    return datasets.Dataset.from_dict(out)


def _task_types(values: list, source: str) -> list[int]:
    for i, v in enumerate(values, 1):
        if not isinstance(v, int) or isinstance(v, bool):
            raise row_error(source, i, f"field '{TASK_TYPE}' must be an integer (e.g. 1 = world knowledge, "
                            f"0 = downstream task), got {type(v).__name__} {v!r}")
    return list(values)
