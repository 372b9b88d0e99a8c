"""The bundled edit set and the editing metrics (reliability, generality, locality)."""

import json

import pytest

from ftray.data import bundled, load_rows
from ftray.data.bundled.factual_edits import RELATIONS, UNRELATED, generate
from ftray.eval import edits
from ftray.eval.edits import edit_scores, evaluate_edits, first_answer


def test_edit_set_is_counterfactual_rephrased_and_has_unrelated_locality_prompts():
    train, test = generate(seed=1234, n_edits=100)
    shipped = [json.loads(line) for line in bundled.path("factual_edits", "train").read_text().splitlines()]
    assert shipped == train and (len(train), len(test)) == (100, 200)
    assert len({r["prompt"] for r in train}) == 100 and not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for edit, para, other in zip(train, test[::2], test[1::2]):
        assert edit["completion"] == edit["answer"] != edit["true_answer"]  # a false but same-relation target
        assert edit["rephrase"] != edit["prompt"] and edit["category"] in RELATIONS
        assert para["prompt"] == edit["rephrase"] != other["prompt"] and para["answer"] == other["answer"] == edit["answer"]
        subject_words = set(edit["prompt"].rstrip("?").split()[-2:])
        assert not subject_words & set(edit["locality_prompt"].rstrip("?").split()) - {"the", "of"}
    assert {r["category"] for r in train} == set(RELATIONS)
    assert load_rows("bundled:factual_edits", "test").column_names[:2] == ["prompt", "completion"]
    assert UNRELATED


def test_first_answer_stops_at_sentence_end_or_newline():
    assert first_answer(" Paris. It is in France.") == "paris"
    assert first_answer("3.5 meters\nmore") == "3.5 meters"
    assert first_answer("New Delhi") == "new delhi"


def test_scores_compare_with_the_target_and_with_the_base_model():
    rows = [{"answer": "Berlin"}, {"answer": "47"}]
    s = edit_scores(rows, reliable=["berlin", "47"], general=["berlin", "2"], local=["x", "y"], local_base=["x", "z"])
    assert s == {"reliability": 1.0, "generality": 0.5, "locality": 0.5}


def test_evaluate_edits_end_to_end_on_the_tiny_model(tiny_model_dir, monkeypatch):
    calls = []
    real = edits.answers

    def spy(model, tokenizer, prompts, max_new_tokens=32):
        calls.append(len(prompts))
        return real(model, tokenizer, prompts, max_new_tokens=2)

    monkeypatch.setattr(edits, "answers", spy)
    out = evaluate_edits(str(tiny_model_dir), base_ref=str(tiny_model_dir), max_samples=4)
    assert out["locality"] == 1.0  # the model is its own base: nothing unrelated changed
    assert 0 <= out["reliability"] <= 1 and out["n"] == 4 and calls == [4, 4, 4, 4]
    with pytest.raises(ValueError, match="base model is unknown"):
        evaluate_edits(str(tiny_model_dir), max_samples=2)
    with pytest.raises(ValueError, match="missing rephrase"):
        evaluate_edits(str(tiny_model_dir), base_ref=str(tiny_model_dir), source="bundled:factual_qa", max_samples=2)
