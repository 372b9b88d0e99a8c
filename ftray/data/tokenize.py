"""Tokenize rows into input_ids, labels (loss only on the assistant reply) and per-token span ids.

The text is rendered with the tokenizer's chat template; the reply starts where the template's
prompt (rendered with add_generation_prompt=True) ends, so everything before it (system and user
turns, template tokens) is masked with -100 and everything after it is learned, including the
end-of-turn token(s), so the model learns to stop. Spans are located by character offsets.

Tokenizers without a chat template use a plain layout instead: the prompt messages' contents
joined by newlines, a newline, then the reply and the eos token:

    "{prompt}\\n{reply}{eos}"
"""

from __future__ import annotations

import datasets

from ftray.data.errors import DataError, row_error
from ftray.data.formats import to_messages, validate_rows

SPAN_PROMPT, SPAN_RESPONSE, SPAN_RATIONALE, SPAN_ANSWER = 0, 1, 2, 3
SPAN_IDS = {"rationale": SPAN_RATIONALE, "answer": SPAN_ANSWER}
IGNORE_INDEX = -100
TASK_TYPE = "task_type"  # optional per-row integer label, passed through to the batch
_CHUNK = 1000  # rows per batched tokenizer call: fast tokenizers parallelise inside a call


def render_prompt(prompt_messages: list[dict], tokenizer) -> str:
    """The text a model continues from to produce the reply: the generation prompt, or the plain layout."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True, tokenize=False)
    return "\n".join(m["content"] for m in prompt_messages) + "\n"


def render(messages: list[dict], tokenizer) -> tuple[str, str]:
    """(full conversation text, prompt prefix text) for messages ending in the assistant reply."""
    prefix = render_prompt(messages[:-1], tokenizer)
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(messages, tokenize=False)
    else:
        full = prefix + messages[-1]["content"] + (tokenizer.eos_token or "")
    return full, prefix


def _span_id(start: int, end: int, spans: dict[str, tuple[int, int]]) -> int:
    # a token overlapping the answer is an answer token even if it starts in the text before it
    # (" 13" starts at the space); the answer wins over the rationale for a token touching both
    for name in ("answer", "rationale"):
        if name in spans and start < spans[name][1] and end > spans[name][0]:
            return SPAN_IDS[name]
    return SPAN_RESPONSE


def _prepare(ds: datasets.Dataset, tokenizer, fmt: str, source: str) -> tuple[list[str], list[int], list[dict]]:
    texts, prefix_lens, char_spans = [], [], []
    for i, row in enumerate(ds, 1):
        messages, spans = to_messages(row, fmt)
        full, prefix = render(messages, tokenizer)
        if not full.startswith(prefix):
            raise row_error(source, i, "the chat template renders the prompt differently on its own (with "
                            "add_generation_prompt=True) than inside the full conversation, so the prompt "
                            "cannot be masked; use a tokenizer whose template renders earlier turns unchanged")
        reply_start = full.find(messages[-1]["content"], len(prefix))
        if spans and reply_start < 0:
            raise row_error(source, i, "the chat template changes the assistant reply's text, so the "
                            "rationale/answer spans cannot be located in it")
        texts.append(full)
        prefix_lens.append(len(prefix))
        char_spans.append({k: (reply_start + s, reply_start + e) for k, (s, e) in spans.items()})
    return texts, prefix_lens, char_spans


def tokenize_dataset(ds: datasets.Dataset, tokenizer, fmt: str, max_len: int,
                     source_name: str = "data") -> datasets.Dataset:
    """Validate and tokenize `ds`: columns input_ids, labels, span_ids, length (right-truncated to max_len).

    A `task_type` column (one integer per row, e.g. LoRAMoE's 1 = world knowledge / 0 = downstream) is
    carried through unchanged so that `collate` can put it in the batch.
    """
    if max_len < 2:
        raise DataError(f"{source_name}: data.max_len must be at least 2, got {max_len}")
    if not getattr(tokenizer, "is_fast", True):
        raise DataError(f"{source_name}: tokenization needs a fast tokenizer (for character offsets), "
                        f"got {type(tokenizer).__name__}")
    validate_rows(ds, fmt, source_name)
    texts, prefix_lens, char_spans = _prepare(ds, tokenizer, fmt, source_name)
    out: dict[str, list] = {"input_ids": [], "labels": [], "span_ids": [], "length": []}
    for lo in range(0, len(texts), _CHUNK):
        enc = tokenizer(texts[lo:lo + _CHUNK], add_special_tokens=False, return_offsets_mapping=True)
        for j, (ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
            i = lo + j
            # offsets are monotonic, so the reply is the tail from the first token starting at or after the prefix
            first = next((t for t, (s, _) in enumerate(offsets) if s >= prefix_lens[i]), len(ids))
            if first >= min(len(ids), max_len):
                raise row_error(source_name, i + 1, f"the prompt takes {first} tokens, leaving no reply tokens within "
                                f"data.max_len={max_len} (the whole example is {len(ids)} tokens); raise data.max_len "
                                "or shorten the prompt")
            ids, offsets = list(ids[:max_len]), offsets[:max_len]
            out["input_ids"].append(ids)
            out["labels"].append([IGNORE_INDEX] * first + ids[first:])
            out["span_ids"].append([SPAN_PROMPT] * first + [_span_id(s, e, char_spans[i]) for s, e in offsets[first:]])
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
