"""Alpaca and ShareGPT rows: detection from columns, normalisation to chat messages, row-numbered errors."""

from __future__ import annotations

import datasets
import pytest

from ftray.data import DataError, detect_format, format_prompt, reference_answer, to_messages, tokenize_dataset, validate_rows

ALPACA = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                              {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Capital of Peru?"},
                              {"from": "gpt", "value": "Lima"}]}


@pytest.mark.parametrize("columns, fmt", [(["instruction", "input", "output"], "alpaca"),
                                          (["instruction", "output"], "alpaca"), (["conversations", "id"], "sharegpt")])
def test_detect_instruction_formats(columns: list[str], fmt: str) -> None:
    assert detect_format(datasets.Dataset.from_dict({c: [] for c in columns})) == fmt


def test_alpaca_becomes_one_user_turn_and_empty_input_adds_no_block() -> None:
    messages, spans = to_messages(ALPACA, "alpaca")
    assert messages == [{"role": "user", "content": "Translate to French.\n\nGood morning"},
                        {"role": "assistant", "content": "Bonjour"}] and spans == {}
    for empty in ("", "  ", None):
        assert to_messages(dict(ALPACA, input=empty), "alpaca")[0][0]["content"] == "Translate to French."
    assert to_messages({k: v for k, v in ALPACA.items() if k != "input"}, "alpaca")[0][0]["content"] == "Translate to French."
    assert to_messages(dict(ALPACA, system="Be polite."), "alpaca")[0][0] == {"role": "system", "content": "Be polite."}
    assert reference_answer(ALPACA, "alpaca") == "Bonjour"


def test_sharegpt_speakers_map_to_roles() -> None:
    messages, _ = to_messages(SHAREGPT, "sharegpt")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages] == [t["value"] for t in SHAREGPT["conversations"]]
    assert format_prompt(SHAREGPT, "sharegpt") == messages[:-1] and reference_answer(SHAREGPT, "sharegpt") == "Lima"


@pytest.mark.parametrize("fmt, row, message", [
    ("alpaca", {"instruction": "x", "output": ""}, "field 'output' is empty"),
    ("alpaca", {"output": "y"}, "field 'instruction' is missing"),
    ("alpaca", {"instruction": "x", "input": 3, "output": "y"}, "field 'input' must be a string"),
    ("sharegpt", {"conversations": [{"from": "gpt", "value": "y"}]}, "at least one prompt turn"),
    ("sharegpt", {"conversations": [{"from": "user", "value": "x"}, {"from": "gpt", "value": "y"}]},
     "turn 1 has 'from' 'user'; ShareGPT speakers are human, gpt, system"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "text": "y"}]},
     r"turn 2 \('gpt'\) must have a string 'value'"),
    ("sharegpt", {"conversations": [{"from": "gpt", "value": "y"}, {"from": "human", "value": "x"}]},
     "the last turn must be the gpt reply, got from 'human'"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": " "}]}, "final gpt turn is empty"),
])
def test_bad_rows_name_the_row(fmt: str, row: dict, message: str) -> None:
    good = ALPACA if fmt == "alpaca" else SHAREGPT
    with pytest.raises(DataError, match=f"^data.jsonl row 2: .*{message}"):
        validate_rows([good, row], fmt, "data.jsonl")


def test_sharegpt_tokenizes_with_every_gpt_turn_learned(tiny_tokenizer) -> None:
    t = tokenize_dataset(datasets.Dataset.from_list([SHAREGPT]), tiny_tokenizer, "sharegpt", max_len=256)[0]
    labelled = [i for i, label in zip(t["input_ids"], t["labels"]) if label != -100]
    assert tiny_tokenizer.decode(labelled) == "Hello!<|im_end|>\nLima<|im_end|>\n"


def test_alpaca_tokenizes_like_the_equivalent_chat_row(tiny_tokenizer) -> None:
    chat = {"messages": to_messages(ALPACA, "alpaca")[0]}
    a = tokenize_dataset(datasets.Dataset.from_list([ALPACA]), tiny_tokenizer, "alpaca", max_len=256)[0]
    c = tokenize_dataset(datasets.Dataset.from_list([chat]), tiny_tokenizer, "chat", max_len=256)[0]
    assert a == c
