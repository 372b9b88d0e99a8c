"""Formats: detection, chat layout with spans, prompts and gold answers for eval, answer extraction."""

from __future__ import annotations

import datasets
import pytest

from ftray.data import (
    DataError,
    detect_format,
    extract_answer,
    format_prompt,
    normalize_answer,
    reference_answer,
    to_messages,
    validate_rows,
)

COT = {"question": "Tom has 12 apples. He buys 5 more. How many?", "rationale": "He buys 5 more: 12 + 5 = 17.",
       "answer": "17"}


@pytest.mark.parametrize("columns, fmt", [
    (["messages"], "chat"), (["prompt", "completion", "answer", "category"], "prompt_completion"),
    (["question", "rationale", "answer"], "cot"), (["text", "label", "label_name"], "classification"),
])
def test_detect_format(columns: list[str], fmt: str) -> None:
    assert detect_format(datasets.Dataset.from_dict({c: [] for c in columns})) == fmt


def test_cot_reply_and_spans() -> None:
    messages, spans = to_messages(COT, "cot")
    assert messages == [{"role": "user", "content": COT["question"]},
                        {"role": "assistant", "content": "He buys 5 more: 12 + 5 = 17.\nThe answer is 17."}]
    reply = messages[-1]["content"]
    assert reply[slice(*spans["rationale"])] == COT["rationale"]
    assert reply[slice(*spans["answer"])] == "17"
    assert extract_answer(reply) == reference_answer(COT, "cot") == "17"


def test_optional_system_message_and_prompt_only_messages() -> None:
    row = {"prompt": "Capital of France?", "completion": "Paris", "system": "Be brief."}
    messages, spans = to_messages(row, "prompt_completion")
    assert [m["role"] for m in messages] == ["system", "user", "assistant"] and spans == {}
    assert format_prompt(row, "prompt_completion") == messages[:-1]
    assert reference_answer({"prompt": "q", "completion": "Paris.", "answer": "Paris"}, "prompt_completion") == "Paris"


def test_classification_prompt_lists_options() -> None:
    row = {"text": "The striker scored.", "label": 0, "label_name": "sports", "options": ["sports", "science"]}
    messages, _ = to_messages(row, "classification")
    assert messages[0]["content"] == "Classify the topic: The striker scored.\nOptions: sports, science"
    assert messages[1]["content"] == reference_answer(row, "classification") == "sports"


def test_chat_reference_is_the_final_assistant_message() -> None:
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert reference_answer(row, "chat") == "hello"
    assert format_prompt(row, "chat") == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "assistant", "content": "x"}]}, "at least one prompt message"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}, "message 2 has role 'bot'"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
     "must have a string 'content'"),
    ({"messages": "hi"}, "field 'messages' must be a list, got str"),
])
def test_bad_chat_rows(row: dict, message: str) -> None:
    with pytest.raises(DataError, match=f"^chats.jsonl row 1: .*{message}"):
        validate_rows([row], "chat", "chats.jsonl")


def test_empty_reply_and_bool_label_are_rejected() -> None:
    with pytest.raises(DataError, match="row 2: field 'completion' is empty"):
        validate_rows([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": "  "}], "prompt_completion")
    with pytest.raises(DataError, match="field 'label' must be an integer, got bool True"):
        validate_rows([{"text": "a", "label": True, "label_name": "x"}], "classification")


@pytest.mark.parametrize("text, answer", [
    ("12 + 5 = 17. 17 - 4 = 13.\nThe answer is 13.", "13"),
    ("The answer is 3.5.", "3.5"),
    ("so the answer is: New Delhi", "New Delhi"),
    ("The answer is 1,200. Anything after", "1,200"),
    ("no phrase, but 4 then 42", "42"),
    ("nothing numeric", None),
])
def test_extract_answer(text: str, answer: str | None) -> None:
    assert extract_answer(text) == answer


def test_normalize_answer() -> None:
    assert normalize_answer("  Paris. ") == "paris"
    assert normalize_answer("1,200") == normalize_answer("1200") == "1200"
    assert normalize_answer("New  Delhi") == "new delhi"
