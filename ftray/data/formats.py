"""Row formats (chat, Alpaca, ShareGPT, prompt/completion, chain-of-thought, classification): detection,
validation, and normalisation to one chat `messages` schema.

| format            | fields                                            | assistant reply(s)                        |
| ----------------- | ------------------------------------------------- | ----------------------------------------- |
| chat              | messages [{role, content}, ...] (OpenAI)          | every assistant message (ends with one)   |
| alpaca            | instruction, input (optional), output             | output                                    |
| sharegpt          | conversations [{from: human|gpt|system, value}]   | every gpt turn (ends with one)            |
| prompt_completion | prompt, completion                                | completion                                |
| cot               | question, rationale, answer                       | "{rationale}\\nThe answer is {answer}."    |
| classification    | text, label (int), label_name                     | label_name                                |
| vision            | images [...], messages with image/text parts      | every assistant message (task vision_language) |

Alpaca's user turn is the instruction, then a blank line and the input when the input is not empty
(an empty input adds no block). Any format but chat and sharegpt may carry an optional `system`
string, sent as a system message first.
"""

from __future__ import annotations

from collections.abc import Iterable

import datasets

from ftray.data.errors import DataError, row_error

FORMATS: dict[str, dict[str, type]] = {
    "chat": {"messages": list},
    "alpaca": {"instruction": str, "output": str},
    "sharegpt": {"conversations": list},
    "cot": {"question": str, "rationale": str, "answer": str},
    "prompt_completion": {"prompt": str, "completion": str},
    "classification": {"text": str, "label": int, "label_name": str},
    "vision": {"images": list, "messages": list},
}
# the columns that identify each format, in the order detection tries them
_SIGNATURES = [("vision", {"images", "messages"}), ("chat", {"messages"}), ("sharegpt", {"conversations"}), ("alpaca", {"instruction", "output"}),
               ("cot", {"question", "rationale", "answer"}), ("prompt_completion", {"prompt", "completion"}),
               ("classification", {"text", "label"})]
ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
ANSWER_PREFIX = "\nThe answer is "


def format_of_columns(columns: Iterable[str]) -> str | None:
    """The format whose identifying columns are all present, or None."""
    cols = set(columns)
    return next((fmt for fmt, needed in _SIGNATURES if needed <= cols), None)


def detect_format(ds: datasets.Dataset, source: str = "data") -> str:
    """'chat' | 'sharegpt' | 'alpaca' | 'cot' | 'prompt_completion' | 'classification', from the dataset's columns."""
    fmt = format_of_columns(ds.column_names)
    if fmt is None:
        raise DataError(
            f"{source}: cannot tell the data format from its columns {ds.column_names}; expected messages (chat), "
            "conversations (sharegpt), instruction + output (alpaca), prompt + completion (prompt_completion), "
            "question + rationale + answer (cot) or text + label (classification). Rename the columns or set "
            "data.format and map them in a method's prepare_data."
        )
    return fmt


_KIND_NAMES = {str: "a string", int: "an integer", list: "a list"}


def _check_field(row: dict, field: str, kind: type, fmt: str) -> str | None:
    value = row.get(field)
    if value is None:
        needs = ", ".join(FORMATS[fmt])
        return f"field '{field}' is missing (format '{fmt}' needs {needs})"
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        return f"field '{field}' must be {_KIND_NAMES[kind]}, got {type(value).__name__} {shown}"
    if kind is str and not value.strip():
        return f"field '{field}' is empty"
    return None


def _check_messages(messages: list, field: str = "messages") -> str | None:
    if len(messages) < 2:
        return f"'{field}' needs at least one prompt message before the final assistant message"
    for j, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            return f"message {j} must be an object with 'role' and 'content', got {type(m).__name__}"
        if m.get("role") not in ROLES:
            return f"message {j} has role {m.get('role')!r}; roles are {', '.join(sorted(ROLES))}"
        if not isinstance(m.get("content"), str):
            return f"message {j} ('{m['role']}') must have a string 'content', got {type(m.get('content')).__name__}"
    if messages[-1]["role"] != "assistant":
        return f"the last message must be the assistant's reply, got role '{messages[-1]['role']}'"
    if not messages[-1]["content"].strip():
        return "the final assistant message is empty"
    return None


def _check_vision(images: list, messages: list) -> str | None:
    """A vision row: chat messages whose content is a string or a list of {type: text, text} / {type: image}
    parts, with exactly one image part per entry of `images` (in order)."""
    if len(messages) < 2 or not all(isinstance(m, dict) for m in messages):
        return "'messages' needs at least one prompt message (objects with role and content) before the final assistant message"
    n_image_parts = 0
    for j, m in enumerate(messages, 1):
        if m.get("role") not in ROLES:
            return f"message {j} has role {m.get('role')!r}; roles are {', '.join(sorted(ROLES))}"
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list) or not all(isinstance(p, dict) and p.get("type") in ("text", "image") for p in parts):
            return f"message {j} ('{m['role']}'): content must be a string or a list of {{type: text, text}} / {{type: image}} parts"
        if any(p["type"] == "text" and not isinstance(p.get("text"), str) for p in parts):
            return f"message {j} ('{m['role']}'): a text part needs a string 'text'"
        n_image_parts += sum(p["type"] == "image" for p in parts)
    if messages[-1]["role"] != "assistant":
        return f"the last message must be the assistant's reply, got role '{messages[-1]['role']}'"
    if n_image_parts != len(images):
        return f"the messages have {n_image_parts} image parts but 'images' has {len(images)} entries; they must match"
    return None


def _check_conversations(turns: list) -> str | None:
    if len(turns) < 2:
        return "'conversations' needs at least one prompt turn before the final gpt turn"
    for j, t in enumerate(turns, 1):
        if not isinstance(t, dict):
            return f"turn {j} must be an object with 'from' and 'value', got {type(t).__name__}"
        if t.get("from") not in SHAREGPT_ROLES:
            return f"turn {j} has 'from' {t.get('from')!r}; ShareGPT speakers are {', '.join(SHAREGPT_ROLES)}"
        if not isinstance(t.get("value"), str):
            return f"turn {j} ('{t['from']}') must have a string 'value', got {type(t.get('value')).__name__}"
    if turns[-1]["from"] != "gpt":
        return f"the last turn must be the gpt reply, got from '{turns[-1]['from']}'"
    if not turns[-1]["value"].strip():
        return "the final gpt turn is empty"
    return None


def row_problem(row: dict, fmt: str) -> str | None:
    """What is wrong with one row for `fmt`, or None when it is valid."""
    for field, kind in FORMATS[fmt].items():
        problem = _check_field(row, field, kind, fmt)
        if problem:
            return problem
    if fmt == "chat":
        return _check_messages(row["messages"])
    if fmt == "vision":
        return _check_vision(row["images"], row["messages"])
    if fmt == "sharegpt":
        return _check_conversations(row["conversations"])
    if fmt == "alpaca" and row.get("input") is not None and not isinstance(row["input"], str):
        return f"field 'input' must be a string (or empty), got {type(row['input']).__name__}"
    if row.get("system") is not None and not isinstance(row["system"], str):
        return f"field 'system' must be a string, got {type(row['system']).__name__}"
    return None


def validate_rows(rows: Iterable[dict], fmt: str, source: str = "data") -> None:
    """Raise DataError naming the first invalid row (1-based) of `rows` for format `fmt`."""
    if fmt not in FORMATS:
        raise DataError(f"{source}: unknown data format {fmt!r}; formats are {', '.join(FORMATS)}")
    for i, row in enumerate(rows, 1):
        problem = row_problem(row, fmt)
        if problem:
            raise row_error(source, i, problem)


def _system(row: dict) -> list[dict]:
    return [{"role": "system", "content": row["system"]}] if row.get("system") else []


def _sharegpt_messages(turns: list[dict]) -> list[dict]:
    return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]


def alpaca_prompt(row: dict) -> str:
    """The user turn of an Alpaca row: the instruction, plus a blank line and the input when it is not empty."""
    extra = (row.get("input") or "").strip()
    return f"{row['instruction']}\n\n{extra}" if extra else row["instruction"]


def classification_prompt(row: dict) -> str:
    """The user turn of a classification row; lists the label names when the row carries 'options'."""
    options = row.get("options")
    suffix = f"\nOptions: {', '.join(options)}" if options else ""
    return f"Classify the topic: {row['text']}{suffix}"


def to_messages(row: dict, fmt: str) -> tuple[list[dict], dict[str, tuple[int, int]]]:
    """Chat messages for a valid row, and {'rationale'|'answer': (start, end)} character spans in the final reply."""
    if fmt == "chat":
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]], {}
    if fmt == "sharegpt":
        return _sharegpt_messages(row["conversations"]), {}
    if fmt == "cot":
        rationale, answer = row["rationale"], row["answer"].rstrip(".")
        reply = f"{rationale}{ANSWER_PREFIX}{answer}."
        start = len(rationale) + len(ANSWER_PREFIX)
        spans = {"rationale": (0, len(rationale)), "answer": (start, start + len(answer))}
        return _system(row) + [{"role": "user", "content": row["question"]},
                               {"role": "assistant", "content": reply}], spans
    if fmt == "prompt_completion":
        prompt, reply = row["prompt"], row["completion"]
    elif fmt == "alpaca":
        prompt, reply = alpaca_prompt(row), row["output"]
    elif fmt == "classification":
        prompt, reply = classification_prompt(row), row["label_name"]
    else:
        raise DataError(f"unknown data format {fmt!r}; formats are {', '.join(FORMATS)}")
    return _system(row) + [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}], {}


def format_prompt(row: dict, fmt: str) -> list[dict]:
    """The prompt messages only (everything before the final assistant reply), for generation."""
    return to_messages(row, fmt)[0][:-1]


def reference_answer(row: dict, fmt: str) -> str:
    """The gold answer for exact match; compare normalize_answer(extract_answer(gen) or gen) to it."""
    if fmt == "cot":
        return row["answer"]
    if fmt == "prompt_completion":
        return row.get("answer") or row["completion"]
    if fmt == "classification":
        return row["label_name"]
    return to_messages(row, fmt)[0][-1]["content"]


def add_classification_info(ds: datasets.Dataset, source: str = "data") -> datasets.Dataset:
    """Fill 'label_name' from a ClassLabel feature and add an 'options' column (label names in label order).

    The options are computed once over the whole split, so training prompts and eval prompts list
    the same labels.
    """
    label_feature = ds.features.get("label")
    if isinstance(label_feature, datasets.ClassLabel):
        names = list(label_feature.names)
        if "label_name" not in ds.column_names:
            ds = ds.map(lambda r: {"label_name": names[r["label"]]})
    else:
        validate_rows(ds, "classification", source)
        by_label: dict[int, str] = {}
        for label, name in zip(ds["label"], ds["label_name"]):
            if by_label.setdefault(label, name) != name:
                raise DataError(f"{source}: label {label} is named both {by_label[label]!r} and {name!r}")
        names = [by_label[k] for k in sorted(by_label)]
    if "options" in ds.column_names:
        return ds
    return ds.add_column("options", [names] * len(ds))
