"""NLKI: BM25 ranks the fact sharing the question's words first, the noisy-label variant flips exactly
label_noise of the answers to another answer of the same type, the loss is noise_robust's, and a
knowledge row tokenizes with the tiny LLaVA with labels on the answer only."""

from __future__ import annotations

import pytest
import torch

from ftray.config import SpecError, build_spec
from ftray.data import load_rows
from ftray.methods import Context, build_methods
from ftray.methods.nlki import FACTS, BM25, knowledge_prompt, noise_plan, question_answer, with_knowledge
from tests.methods.helpers import prepare


def test_bm25_puts_the_fact_sharing_the_questions_words_first():
    index = BM25(list(FACTS))
    assert FACTS[index.top_k("How many corners does a triangle have?", 3)[0]] == "A triangle has three corners and three straight sides."
    assert FACTS[index.top_k("How many red shapes are there?", 3)[0]].startswith("To count the red shapes")
    docs = ["the cat sat on the mat", "a dog and a cat", "zebras eat grass", "a dog barks at a dog"]
    small = BM25(docs)
    assert small.top_k("Where is the zebra?", 4) == [2]  # only facts sharing a term; "zebras" → "zebra"
    assert small.top_k("dog", 2) == [3, 1]  # more occurrences of the term rank higher
    assert small.top_k("cat dog", 4)[0] == 1  # both words beat either alone
    assert small.top_k("unrelated words", 3) == []
    s = small.scores("mat cat")
    assert s[0] > s[1] > 0 == s[2]  # the rare term (mat, in one doc) counts more than the common one


def _scan(n: int, types: int = 3) -> list[dict]:
    return [{"uid": f"row{i}", "qtype": f"t{i % types}", "answer": str(i % 5), "question": f"q{i % types}"} for i in range(n)]


@pytest.mark.parametrize("noise", [0.0, 0.1, 0.25, 0.37])
def test_noise_plan_flips_exactly_the_rounded_share(noise):
    from ftray.methods.nlki import flips

    scan = _scan(203)
    pool, threshold, flippable = noise_plan(scan, noise, seed=0)
    assert flippable == 203 and sum(flips(r, pool, threshold, 0) for r in scan) == round(noise * 203)
    # a type with a single answer cannot be flipped
    lone = [{"uid": "x", "qtype": "only", "answer": "7", "question": "q"}]
    pool, threshold, flippable = noise_plan(scan + lone, 0.9, seed=0)
    assert flippable == 203 and not flips(lone[0], pool, threshold, 0)


def test_prepared_rows_carry_knowledge_and_a_noisy_answer_of_the_same_type(tiny_llava_dir, ray_local):
    base = load_rows("bundled:shapes_vqa", "train", 60).to_list()
    spec = build_spec({"model": {"name": str(tiny_llava_dir)}, "task": {"type": "vision_language"},
                       "methods": [{"name": "nlki", "label_noise": 0.25, "top_k": 2}]})
    (m,) = build_methods(spec.methods)
    rows, report = prepare(m, base, spec)
    assert len(rows) == 60 and report["rows"] == 60 and report["flipped"] == 15 == sum(r["label_flipped"] for r in rows)
    answers_of = {}
    for r in base:
        answers_of.setdefault(r["question_type"], set()).add(r["answer"])
    for r, b in zip(rows, base):
        (text, a), (q, _) = question_answer(r), question_answer(b)
        assert text == knowledge_prompt(list(r["knowledge"]), q) and r["true_answer"] == b["answer"] and a == r["answer"]
        assert (a != b["answer"]) == r["label_flipped"]  # flipped answers differ from the gold, the rest keep it
        assert a in answers_of[b["question_type"]]  # a wrong answer of the same question type
        user = next(msg for msg in r["messages"] if msg["role"] == "user")
        assert [p["type"] for p in user["content"]] == ["image", "text"]
        assert user["content"][1]["text"] == text and 1 <= len(r["knowledge"]) <= 2
    assert report["mean_facts"] == pytest.approx(sum(len(r["knowledge"]) for r in rows) / 60, abs=1e-3)
    assert len(report["examples"]) == 2 and "flipped" in report["examples"][0]
    again, _ = prepare(m, base, spec)  # seeded: the same rows flip to the same answers
    assert [r["answer"] for r in again] == [r["answer"] for r in rows]


def test_dense_retriever_from_the_retrieval_task_ranks_an_identical_fact_first(tiny_model_dir, ray_local):
    from ftray.methods.nlki import dense_top_k

    facts = ["A triangle has three corners.", "Blue is the colour of a clear sky.", "The center is the middle cell."]
    picked = dense_top_k(str(tiny_model_dir), "mean", ["Blue is the colour of a clear sky."], facts, 2)
    assert len(picked[0]) == 2 and picked[0][0] == 1


def _criterion(name: str, **fields):
    spec = build_spec({"model": {"name": "x"}, "task": {"type": "vision_language"}, "methods": [{"name": name, **fields}]})
    (m,) = build_methods(spec.methods)
    return lambda z, y: m.criterion(z, y, Context(spec=spec, tokenizer=None))


@pytest.mark.parametrize("fields", [{}, {"loss": "gce", "q": 0.8, "ce_weight": 0.6},
                                    {"loss": "sce", "alpha": 0.1, "beta": 1.0, "rce_form": "nlki"}, {"loss": "sce"}])
def test_criterion_is_noise_robusts_for_the_same_settings(fields):
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(12, 50, generator=g), torch.randint(0, 50, (12,), generator=g)
    y[3] = -100
    ours = _criterion("nlki", **fields)(z, y)
    spec = build_spec({"methods": [{"name": "noise_robust", **fields}], "task": {"type": "classification"}})
    (nr,) = build_methods(spec.methods)
    torch.testing.assert_close(ours, nr.criterion(z, y, Context(spec=spec, tokenizer=None)))
    assert _criterion("nlki", loss="ce")(z, y) is None  # plain CE: the loop's own cross-entropy


def test_nlki_cannot_run_with_noise_robust():
    with pytest.raises(SpecError, match="noise_robust"):
        build_spec({"task": {"type": "vision_language"}, "methods": [{"name": "nlki"}, {"name": "noise_robust"}]})


def test_a_knowledge_row_tokenizes_with_the_tiny_llava_and_labels_only_the_answer(tiny_llava_dir):
    import datasets

    from ftray.tasks.vision_language import VisionLanguage

    base = load_rows("bundled:shapes_vqa", "train", 2).to_list()
    rows = [with_knowledge(r, list(FACTS[:2]), answer="wrong answer" if i else None) for i, r in enumerate(base)]
    spec = build_spec({"model": {"name": str(tiny_llava_dir)}, "task": {"type": "vision_language"}, "data": {"max_len": 512},
                       "methods": [{"name": "nlki"}]})
    task = VisionLanguage(spec)
    tok = task.processor.tokenizer
    out = task.tokenize(datasets.Dataset.from_list(rows), tok, "test")
    for r, enc, answer in zip(rows, out, [base[0]["answer"], "wrong answer"]):
        labelled = [t for t, y in zip(enc["input_ids"], enc["labels"]) if y != -100]
        assert tok.decode(labelled).strip() == f"{answer}<|im_end|>"
        assert "Knowledge: " + FACTS[0] in tok.decode(enc["input_ids"])


def test_bench_scores_evaluate_with_knowledge_prompts(tiny_llava_dir, tmp_path):
    import shutil

    from ftray.methods.nlki import bench_scores

    final = shutil.copytree(tiny_llava_dir, tmp_path / "final")  # a checkpoint: the weights plus the run's spec
    (final / "ftray_spec.yaml").write_text("task: {type: vision_language}\n")
    out = bench_scores(str(final), 2, tmp_path)
    assert out["knowledge_n"] == 2 and 0 <= out["knowledge_em"] <= 1
