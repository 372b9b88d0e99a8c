"""Context-use metrics: controllability, robustness, k-shot accuracy, and their bench measurements."""

import shutil

import pytest
import yaml

from ftray.data import load_rows
from ftray.eval.context import (
    KSHOTS, accuracy, controllability, kaft_cases, kaft_metrics, kaft_prompts, kaft_scores, kshot_accuracy, kshot_prompts,
    manyicl_metrics, robustness,
)
from ftray.methods.kaft import mentions


def test_scores_on_hand_made_outputs():
    assert accuracy(["Paris", "the answer is 12.", "Rome"], ["paris", "12", "Madrid"]) == pytest.approx(2 / 3)
    assert accuracy([], []) == 0.0
    assert controllability(["Lyon", "Paris"], ["Lyon", "Lyon"]) == 0.5
    # agreement with the pretrained closed-book answer; pairs without one are left out
    assert robustness(["I think Paris.", "Berlin", "x"], ["i think paris", "Bonn", ""]) == 0.5
    assert kshot_accuracy({4: ["a", "b"], 0: ["a", "c"]}, ["a", "b"]) == {0: 0.5, 4: 1.0}
    with pytest.raises(ValueError):
        accuracy(["a"], ["a", "b"])


def test_kaft_scores_tell_following_the_context_from_ignoring_it():
    cases = [{"question": "q1", "answer": "Paris", "cf_answer": "Lyon", "irrelevant_answer": "Oslo"},
             {"question": "q2", "answer": "8", "cf_answer": "9", "irrelevant_answer": "Rome"}]
    outputs = {"relevant": ["Paris", "8"], "counterfactual": ["Lyon", "8"], "irrelevant": ["Oslo", "It is 8."],
               "empty": ["Paris.\nMore text", "It is 8."]}
    s = kaft_scores(cases, outputs, ["Paris", "It is 8."])
    assert s["kaft_relevant_acc"] == 1.0 and s["kaft_controllability"] == 0.5 and s["kaft_cf_memorised"] == 0.5
    assert s["kaft_robustness"] == 0.5 and s["kaft_distracted"] == 0.5 and s["kaft_irrelevant_acc"] == 0.5
    assert s["kaft_irrelevant_vs_own_closed_book"] == 0.5 and s["kaft_closed_book_acc"] == 1.0


def test_kaft_cases_hold_each_context_type():
    ds = load_rows("bundled:factual_qa", "test")
    cases = kaft_cases(ds.to_list(), "prompt_completion", 50)
    assert len(cases) == 50
    for c in cases:
        assert mentions(c["relevant"], c["answer"]) and mentions(c["counterfactual"], c["cf_answer"])
        assert not mentions(c["counterfactual"], c["answer"]) and not mentions(c["irrelevant"], c["answer"])
        assert mentions(c["irrelevant"], c["irrelevant_answer"]) and c["cf_answer"] != c["answer"]
    empty = kaft_prompts(cases, "empty")[0][0]["content"]
    assert empty == f"Context: \nQuestion: {cases[0]['question']}"


def test_kshot_prompts_alternate_turns_with_same_category_demos_first_and_nest():
    demos = load_rows("bundled:factual_qa", "train").to_list()
    queries = load_rows("bundled:factual_qa", "test", 5).to_list()
    by_k = {k: kshot_prompts(queries, demos, "prompt_completion", k) for k in KSHOTS}
    category = {d["prompt"]: d["category"] for d in demos}
    for i, q in enumerate(queries):
        assert by_k[0][i] == [{"role": "user", "content": q["prompt"]}]
        p = by_k[16][i]
        assert [m["role"] for m in p] == ["user", "assistant"] * 16 + ["user"] and p[-1]["content"] == q["prompt"]
        cats = [category[m["content"]] for m in p[:-1:2]]
        n_same = min(16, sum(d["category"] == q["category"] for d in demos))  # planets has only 10 train rows
        assert cats[:n_same] == [q["category"]] * n_same and q["category"] not in cats[n_same:]  # its category first
        assert by_k[4][i][:8] == p[:8]  # smaller k: a prefix of the same demonstrations


def test_bench_measurements_run_on_a_checkpoint_and_cache_the_closed_book_answers(tiny_model_dir, tmp_path, ray_local):
    final = tmp_path / "final"
    shutil.copytree(tiny_model_dir, final)
    (final / "ftray_spec.yaml").write_text(yaml.safe_dump({"model": {"name": str(tiny_model_dir)}, "train": {"seed": 0},
                                                           "data": {"source": "bundled:factual_qa"}}))
    out = kaft_metrics(str(final), 3, tmp_path / "bench")
    assert out["kaft_eval_n"] == 3 and all(0 <= v <= 1 for k, v in out.items() if k != "kaft_eval_n")
    assert len(list((tmp_path / "bench" / "kaft").glob("closed_book_*.json"))) == 1
    assert kaft_metrics(str(final), 3, tmp_path / "bench") == out  # greedy, cached reference: the same numbers
    acc = manyicl_metrics(str(final), 2, tmp_path / "bench")
    assert sorted(acc) == sorted(f"manyicl_acc_k{k}" for k in KSHOTS) and all(0 <= v <= 1 for v in acc.values())
