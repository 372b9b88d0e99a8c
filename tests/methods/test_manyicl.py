"""ManyICL: packed many-shot sequences supervise every answer (or only the last) and never pass max_len."""

import datasets
import pytest
import torch

from ftray.config import SpecError, build_spec
from ftray.data import load_rows, tokenize_dataset
from ftray.data.tokenize import IGNORE_INDEX
from ftray.methods import Context, build_methods
from ftray.methods.manyicl import last_answer_labels, pack_lengths
from tests.methods.helpers import prepare

MAX_LEN = 128


def label_runs(labels: list[int]) -> list[list[int]]:
    """The contiguous runs of labelled tokens (one per supervised answer)."""
    runs, cur = [], []
    for t in labels:
        if t != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def packed(tiny_tokenizer, n: int = 80, **fields) -> tuple[list[dict], dict, list[dict], object]:
    spec = build_spec({"data": {"source": "bundled:factual_qa", "max_len": MAX_LEN},
                       "methods": [{"name": "manyicl", "task_field": "category", **fields}]})
    base = load_rows("bundled:factual_qa", "train", n).to_list()
    (m,) = build_methods(spec.methods)
    rows, report = prepare(m, base, spec, tiny_tokenizer)
    return rows, report, base, m


def test_pack_lengths_fills_up_to_the_budget_and_drops_oversized_examples():
    assert pack_lengths([3, 3, 3, 10, 3, 1], overhead=2, max_len=9) == ([[0, 1], [2, 4, 5]], [3])
    assert pack_lengths([], 0, 5) == ([], [])


def test_every_answer_is_supervised_one_task_per_sequence_and_none_passes_max_len(tiny_tokenizer, ray_local):
    rows, report, base, _ = packed(tiny_tokenizer)
    category = {r["prompt"]: r["category"] for r in base}
    tok = tokenize_dataset(datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows]), tiny_tokenizer, "chat",
                           max_len=10_000).to_list()
    questions = []
    for r, t in zip(rows, tok):
        users = [m["content"] for m in r["messages"] if m["role"] == "user"]
        answers = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        assert t["length"] <= MAX_LEN  # measured untruncated: the sequence itself fits
        assert len({category[u] for u in users}) == 1 and r["task"] == category[users[0]]
        runs = label_runs(t["labels"])
        assert len(runs) == len(answers) == r["shots"]  # every answer is a supervised span, nothing else is
        for run, answer in zip(runs, answers):
            assert tiny_tokenizer.decode(run) == answer + "<|im_end|>\n"
        questions += users
    assert sorted(questions) == sorted(category) and report["dropped_too_long"] == 0  # each example once
    assert report["answers"] == len(base) and report["sequences"] == len(rows) and report["shots_max"] > 2
    assert sum(t["length"] for t in tok) / len(tok) > MAX_LEN / 2  # sequences are filled, not one example each


def test_shuffles_emit_every_example_once_per_shuffle_with_new_neighbours(tiny_tokenizer, ray_local):
    rows, report, base, _ = packed(tiny_tokenizer, n=40, shuffles=2)
    users = [tuple(m["content"] for m in r["messages"] if m["role"] == "user") for r in rows]
    flat = [u for seq in users for u in seq]
    assert len(flat) == 2 * len(base) and set(flat) == {r["prompt"] for r in base}
    assert len(set(users)) > len(users) / 2  # the second packing groups examples differently


def test_targets_last_keeps_only_the_final_answer(tiny_tokenizer, ray_local):
    labels = torch.tensor([[-100, 5, 6, -100, -100, 7, 8, -100, 9, -100], [-100, -100, 1, 2, 3, -100, -100, -100, -100, -100]])
    assert last_answer_labels(labels).tolist() == [[-100] * 8 + [9, -100], [-100, -100, 1, 2, 3] + [-100] * 5]
    rows, _, _, m = packed(tiny_tokenizer, n=20, targets="last")
    tok = tokenize_dataset(datasets.Dataset.from_list([{"messages": rows[0]["messages"]}]), tiny_tokenizer, "chat", MAX_LEN).to_list()[0]
    batch = {"input_ids": torch.tensor([tok["input_ids"]]), "labels": torch.tensor([tok["labels"]])}
    out = m.corrupt_batch(batch, Context(spec=build_spec({}), tokenizer=tiny_tokenizer))
    runs = label_runs(out["labels"][0].tolist())
    assert len(runs) == 1 and tiny_tokenizer.decode(runs[0]) == rows[0]["messages"][-1]["content"] + "<|im_end|>\n"
    assert torch.equal(out["input_ids"], batch["input_ids"])
    (all_targets,) = build_methods(build_spec({"methods": ["manyicl"]}).methods)
    assert all_targets.corrupt_batch(batch, None) is batch


def test_spec_refuses_ftray_packing():
    with pytest.raises(SpecError, match="packing"):
        build_spec({"data": {"packing": True}, "methods": ["manyicl"]})


@pytest.mark.parametrize("template", ["plain", "alpaca", "llama3"])
def test_packing_is_exact_for_templates_whose_turns_merge_at_the_boundary(tiny_tokenizer, template):
    """The per-example estimate may be off where a template joins turns with text; every sequence is re-measured."""
    from ftray.methods.manyicl import n_tokens, pack_task

    rows = load_rows("bundled:factual_qa", "train", 60).to_list()
    for max_len in (40, 64, 97):
        seqs, dropped = pack_task(rows, "prompt_completion", tiny_tokenizer, template, max_len)
        assert all(n_tokens(s, tiny_tokenizer, template) <= max_len for s in seqs)
        assert sum(m["role"] == "assistant" for s in seqs for m in s) + dropped == len(rows)
