"""tokenize_dataset: loss only on the replies (+ end of turn), span ids, truncation, template fallbacks."""

from __future__ import annotations

import copy

import datasets
import pytest

from ftray.data import (
    SPAN_ANSWER,
    SPAN_PROMPT,
    SPAN_RATIONALE,
    SPAN_RESPONSE,
    DataError,
    load_rows,
    render_prompt,
    to_messages,
    tokenize_dataset,
)

COT = {"question": "Tom has 12 apples. He buys 5 more. How many apples does Tom have now?",
       "rationale": "Tom starts with 12 apples. He buys 5 more: 12 + 5 = 17.", "answer": "17"}


def labelled(row: dict) -> list[int]:
    return [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]


def test_labels_are_exactly_the_reply_and_end_of_turn(tiny_tokenizer) -> None:
    ds = load_rows("bundled:arithmetic", max_samples=20)
    tok = tokenize_dataset(ds, tiny_tokenizer, "cot", max_len=512)
    assert tok.column_names == ["input_ids", "labels", "span_ids", "length"]
    for row, t in zip(ds, tok):
        reply = to_messages(row, "cot")[0][-1]["content"]
        assert tiny_tokenizer.decode(labelled(t)) == reply + "<|im_end|>\n"
        prompt_ids = [i for i, label in zip(t["input_ids"], t["labels"]) if label == -100]
        prompt = tiny_tokenizer.decode(prompt_ids)
        assert prompt == render_prompt(to_messages(row, "cot")[0][:-1], tiny_tokenizer)
        assert t["length"] == len(t["input_ids"]) == len(t["labels"]) == len(t["span_ids"])


def test_span_ids_cover_rationale_and_answer(tiny_tokenizer) -> None:
    t = tokenize_dataset(datasets.Dataset.from_list([COT]), tiny_tokenizer, "cot", max_len=512)[0]
    spans = {sid: [i for i, s in zip(t["input_ids"], t["span_ids"]) if s == sid]
             for sid in (SPAN_PROMPT, SPAN_RESPONSE, SPAN_RATIONALE, SPAN_ANSWER)}
    # token boundaries may carry a neighbouring space, hence strip()
    assert tiny_tokenizer.decode(spans[SPAN_RATIONALE]).strip() == COT["rationale"]
    assert tiny_tokenizer.decode(spans[SPAN_ANSWER]).strip() == "17"
    assert "The answer is" in tiny_tokenizer.decode(spans[SPAN_RESPONSE])
    # spans partition the sequence: prompt exactly where labels are masked
    assert all((s == SPAN_PROMPT) == (label == -100) for s, label in zip(t["span_ids"], t["labels"]))


def test_non_cot_formats_mark_the_whole_reply_as_response(tiny_tokenizer) -> None:
    ds = load_rows("bundled:classification", max_samples=5)
    tok = tokenize_dataset(ds, tiny_tokenizer, "classification", max_len=256)
    for row, t in zip(ds, tok):
        assert tiny_tokenizer.decode(labelled(t)) == row["label_name"] + "<|im_end|>\n"
        assert set(t["span_ids"]) == {SPAN_PROMPT, SPAN_RESPONSE}


def test_truncation_keeps_the_prompt_and_cuts_the_reply(tiny_tokenizer) -> None:
    full = tokenize_dataset(datasets.Dataset.from_list([COT]), tiny_tokenizer, "cot", max_len=512)[0]
    n_prompt = full["labels"].count(-100)
    cut = tokenize_dataset(datasets.Dataset.from_list([COT]), tiny_tokenizer, "cot", max_len=n_prompt + 3)[0]
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 3]
    assert cut["labels"] == full["labels"][: n_prompt + 3] and cut["length"] == n_prompt + 3


def test_prompt_longer_than_max_len_names_the_row(tiny_tokenizer) -> None:
    long = dict(COT, question="How many apples? " * 60)
    ds = datasets.Dataset.from_list([COT, long])
    with pytest.raises(DataError, match=r"^train.jsonl row 2: the prompt takes \d+ tokens.*raise data.max_len"):
        tokenize_dataset(ds, tiny_tokenizer, "cot", max_len=64, source_name="train.jsonl")


def test_bad_rows_are_rejected_before_tokenizing(tiny_tokenizer) -> None:
    ds = datasets.Dataset.from_list([COT, dict(COT, rationale="")])
    with pytest.raises(DataError, match="^my_data row 2: field 'rationale' is empty"):
        tokenize_dataset(ds, tiny_tokenizer, "cot", max_len=64, source_name="my_data")


def test_system_turn_is_masked(tiny_tokenizer) -> None:
    row = {"prompt": "Capital of France?", "completion": "Paris", "system": "Answer in one word."}
    t = tokenize_dataset(datasets.Dataset.from_list([row]), tiny_tokenizer, "prompt_completion", max_len=128)[0]
    assert tiny_tokenizer.decode(labelled(t)) == "Paris<|im_end|>\n"
    assert tiny_tokenizer.decode(t["input_ids"]).startswith("<|im_start|>system\nAnswer in one word.")


def test_multi_turn_chat_learns_every_assistant_turn(tiny_tokenizer) -> None:
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima"}]}
    t = tokenize_dataset(datasets.Dataset.from_list([row]), tiny_tokenizer, "chat", max_len=128)[0]
    assert tiny_tokenizer.decode(labelled(t)) == "Hello!<|im_end|>\nLima<|im_end|>\n"
    # span ids still mark exactly the unlabelled tokens as prompt
    assert all((s == SPAN_PROMPT) == (label == -100) for s, label in zip(t["span_ids"], t["labels"]))


def test_named_plain_template_is_the_old_template_less_layout(tiny_tokenizer) -> None:
    t = tokenize_dataset(datasets.Dataset.from_list([COT]), tiny_tokenizer, "cot", max_len=512, chat_template="plain")[0]
    reply = to_messages(COT, "cot")[0][-1]["content"]
    assert tiny_tokenizer.decode(t["input_ids"]) == COT["question"] + "\n" + reply + "<|im_end|>"
    assert tiny_tokenizer.decode(labelled(t)) == reply + "<|im_end|>"
    assert tiny_tokenizer.decode([i for i, s in zip(t["input_ids"], t["span_ids"]) if s == SPAN_ANSWER]).strip() == "17"


def test_tokenizer_without_chat_template_falls_back_to_chatml(tiny_tokenizer) -> None:
    bare = copy.deepcopy(tiny_tokenizer)
    bare.chat_template = None
    t = tokenize_dataset(datasets.Dataset.from_list([COT]), bare, "cot", max_len=512)[0]
    reply = to_messages(COT, "cot")[0][-1]["content"]
    assert bare.decode(t["input_ids"]) == f"<|im_start|>user\n{COT['question']}<|im_end|>\n<|im_start|>assistant\n{reply}<|im_end|>\n"
    assert bare.decode(labelled(t)) == reply + "<|im_end|>\n"
    assert render_prompt([{"role": "user", "content": "q"}], bare) == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"


def test_train_on_prompt_labels_every_token_and_keeps_span_ids(tiny_tokenizer) -> None:
    ds = datasets.Dataset.from_list([COT])
    masked = tokenize_dataset(ds, tiny_tokenizer, "cot", max_len=512)[0]
    t = tokenize_dataset(ds, tiny_tokenizer, "cot", max_len=512, train_on_prompt=True)[0]
    assert t["labels"] == t["input_ids"] == masked["input_ids"]
    assert t["span_ids"] == masked["span_ids"]


def test_template_that_rewrites_the_prompt_is_an_error(tiny_tokenizer) -> None:
    odd = copy.deepcopy(tiny_tokenizer)
    # renders a different first line when a generation prompt is requested
    odd.chat_template = ("{% if add_generation_prompt %}GEN{% endif %}{% for m in messages %}"
                         "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(DataError, match="row 1: the chat template renders the prompt differently"):
        tokenize_dataset(datasets.Dataset.from_list([COT]), odd, "cot", max_len=512)
