"""KAFT: every built row's target is what its context type calls for, and the type counts follow the mix."""

import pyarrow as pa
import pytest

from ftray.config import SpecError, build_spec
from ftray.data import load_rows
from ftray.methods import build_methods
from ftray.methods.kaft import (
    TYPES, KAFTConfig, build_rows, closed_book_prompt, context_prompt, fact_sentence, item_of, mentions, replace_answer,
    short_answer, type_counts,
)
from tests.methods.helpers import prepare


def _items(n: int | None = None, closed_book: bool = True) -> list[dict]:
    rows = load_rows("bundled:factual_qa", "train", n).to_list()
    items = [item_of(r, "prompt_completion") for r in rows]
    for i, it in enumerate(items):  # a stand-in for the pretrained model's closed-book answer
        it["closed_book"] = f"My guess is Q{i}." if closed_book else None
    return items


def test_fact_sentences_state_the_answer_and_mentions_are_whole_words():
    assert fact_sentence("What is the capital of France?", "Paris") == "The capital of France is Paris."
    assert fact_sentence("How many grams are in 1 kilogram?", "1000") == "There are 1000 grams in 1 kilogram."
    assert fact_sentence("Counting from the Sun, what is the position of Venus?", "2") == "Counting from the Sun, the position of Venus is 2."
    assert fact_sentence("Which country has Paris as its capital?", "France") == "The country that has Paris as its capital is France."
    assert fact_sentence("Which planet do we live on?", "Earth") == "The planet we live on is Earth."
    assert fact_sentence("Who wrote Hamlet?", "Shakespeare") == 'The answer to "Who wrote Hamlet?" is Shakespeare.'
    for r in load_rows("bundled:factual_qa", "train").to_list():
        assert mentions(fact_sentence(r["prompt"], r["answer"]), r["answer"])
    assert not mentions("There are 7 kilograms in 1000 grams.", "1") and mentions("in 1 year", "1")
    assert replace_answer("There are 1 kilograms in 1000 grams.", "1", "7") == "There are 7 kilograms in 1000 grams."
    assert short_answer("The capital is Dakar. It lies on the coast.\nMore") == "The capital is Dakar."
    assert short_answer("  3.5 meters\n") == "3.5 meters"


def test_every_row_has_the_target_its_context_type_calls_for_and_counts_follow_the_mix():
    items = _items()
    by_question = {it["question"]: it for it in items}
    contexts = {it["context"] for it in items}
    rows, report = build_rows(items, KAFTConfig(), seed=0)
    n = len(items)
    wanted = type_counts({"relevant": 1.0, "counterfactual": 1.0, "irrelevant": 1.0, "empty": 0.5}, n)
    assert wanted == {"relevant": n, "counterfactual": n, "irrelevant": n, "empty": round(n / 2)}
    counts = {t: sum(r["context_type"] == t for r in rows) for t in TYPES}
    assert counts == report["rows_per_type"]
    assert counts == wanted and not report["skipped_per_type"]  # every type could be built for every question
    for r in rows:
        it = by_question[r["question"]]
        a, t = it["answer"], r["context_type"]
        assert r["prompt"] == context_prompt(r["context"], r["question"]) and r["completion"] == r["answer"]
        assert r["true_answer"] == a
        if t == "relevant":
            assert r["context"] == it["context"] and r["completion"] == a and mentions(r["context"], a)
        elif t == "counterfactual":
            new = r["completion"]
            assert new.lower() != a.lower() and mentions(r["context"], new) and not mentions(r["context"], a)
            assert r["context"] == replace_answer(it["context"], a, new) and not mentions(r["question"], new)
        elif t == "irrelevant":
            assert r["context"] in contexts and r["context"] != it["context"] and not mentions(r["context"], a)
            assert r["completion"] == it["closed_book"]
        else:
            assert r["context"] == "" and r["completion"] == it["closed_book"]
    assert [r["context_type"] for r in rows[:20]] != sorted(r["context_type"] for r in rows[:20])  # shuffled together


def test_gold_targets_rationale_ratios_and_known_only():
    items = _items(120, closed_book=False)
    rows, _ = build_rows(items, KAFTConfig(irrelevant_target="answer", counterfactual=0, relevant=2.0, rationale=True), seed=1)
    counts = {t: sum(r["context_type"] == t for r in rows) for t in TYPES}
    assert counts == {"relevant": 240, "counterfactual": 0, "irrelevant": 120, "empty": 60}
    for r in rows:
        assert r["answer"] == r["true_answer"]
        assert r["completion"].endswith(f"The answer is {r['true_answer'].rstrip('.')}.")
        assert r["completion"].startswith("There is no context." if r["context_type"] == "empty" else
                                          f"The context is {'irrelevant' if r['context_type'] == 'irrelevant' else 'relevant'}")
    items = _items(40)
    items[3]["closed_book"] = f"I think it is {items[3]['answer']}."
    items[7]["closed_book"] = f"{items[7]['answer']}"
    rows, report = build_rows(items, KAFTConfig(known_only=True), seed=0)
    assert report["questions"] == 2 and {r["question"] for r in rows} == {items[3]["question"], items[7]["question"]}


def test_spec_refuses_known_only_without_closed_book():
    with pytest.raises(SpecError, match="known_only"):
        build_spec({"methods": [{"name": "kaft", "known_only": True, "irrelevant_target": "answer"}]})


def test_closed_book_targets_come_from_the_pretrained_model_on_ray_data(tiny_model_dir, ray_local):
    """Irrelevant and empty targets are the model's own greedy answer to the empty-context prompt."""
    from ftray.data.inference import Answerer

    spec = build_spec({"model": {"name": str(tiny_model_dir)}, "data": {"source": "bundled:factual_qa"},
                       "methods": [{"name": "kaft", "max_new_tokens": 6, "empty": 1.0}]})
    base = load_rows("bundled:factual_qa", "train", 12).to_list()
    (m,) = build_methods(spec.methods)
    rows, report = prepare(m, base, spec)
    probe = Answerer(spec.model_dump(mode="json"), max_new_tokens=6, prompt_of=closed_book_prompt)(pa.Table.from_pylist(base))
    closed_book = {r["prompt"]: short_answer(a[0]) for r, a in zip(base, probe.column("answers").to_pylist())}
    assert closed_book[base[0]["prompt"]] == short_answer(probe.column("answers")[0].as_py()[0])
    for r in rows:
        if r["context_type"] in ("irrelevant", "empty"):
            assert r["completion"] == closed_book[r["question"]]
    assert report["rows_per_type"]["empty"] + report["skipped_per_type"].get("empty", 0) == 12
    assert report["examples"] and "closed_book_mentions_answer" in report
