"""Confidence and refusal metrics on hand-made inputs, the answer checks, the out-of-domain set, and the
bench measurements end to end on the tiny model."""

import json
import random

import pytest

from ftray.data import bundled
from ftray.data.bundled.factual_qa import CAPITALS, ELEMENTS, PLANETS
from ftray.eval.confidence import (
    answer_correct, answer_key, answered_accuracy, auroc, average_precision, cut_answer, entropy, expected_calibration_error,
    is_refusal, parse_confidence, refusal_rate,
)


def test_average_precision_matches_hand_computed_values_with_ties():
    # thresholds 0.9 (P=1, R=.5), 0.8 (P=.5, R=.5), 0.7 (P=2/3, R=1): AP = .5·1 + .5·2/3
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(0.5 + 1 / 3)
    # the tied 0.5s form one threshold (sklearn's rule): 0.9 (P=1, R=.5), 0.5 (P=2/3, R=1)
    assert average_precision([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.5 + 1 / 3)
    assert average_precision([0.1, 0.2, 0.3], [0, 1, 1]) == 1.0
    assert average_precision([0.3, 0.2], [0, 0]) is None


def test_auroc_perfect_reversed_ties_and_random():
    assert auroc([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == 0.75
    assert auroc([0.9, 0.1], [1, 0]) == 1.0 and auroc([0.1, 0.9], [1, 0]) == 0.0
    assert auroc([0.5, 0.5, 0.5], [1, 0, 1]) == 0.5
    rng = random.Random(0)
    scores, labels = [rng.random() for _ in range(4000)], [rng.random() < 0.3 for _ in range(4000)]
    assert auroc(scores, labels) == pytest.approx(0.5, abs=0.03)
    assert auroc([0.2, 0.4], [1, 1]) is None


def test_ece_is_zero_when_calibrated_and_the_gap_otherwise():
    assert expected_calibration_error([0.25] * 4, [1, 0, 0, 0]) == pytest.approx(0)
    assert expected_calibration_error([0.9, 0.9, 0.05, 0.05], [1, 0, 0, 0]) == pytest.approx(0.5 * 0.4 + 0.5 * 0.05)
    assert expected_calibration_error([1.0], [1]) == 0  # 1.0 falls in the last bin
    assert expected_calibration_error([], []) is None


def test_refusal_rate_and_answered_accuracy():
    assert refusal_rate([True, False, False, False]) == 0.25 and refusal_rate([]) is None
    assert answered_accuracy([1, 0, 1, 0], [True, True, True, False]) == pytest.approx(2 / 3)
    assert answered_accuracy([1], [False]) is None


def test_answer_checks():
    assert cut_answer("The capital of Senegal is Dakar. It lies on the coast.") == "The capital of Senegal is Dakar"
    assert cut_answer("Mercury is 0.39 AU away.") == "Mercury is 0.39 AU away"
    assert answer_correct("The capital of Senegal is Dakar", "Dakar")
    assert answer_correct("There are 1,000 grams in 1 kilogram", "1000")
    assert not answer_correct("There are 100 grams in it", "1") and not answer_correct("anything", None)
    assert answer_key("The capital of France is Paris.") == answer_key("paris") == "paris"
    assert entropy(["a", "a"]) == 0 and entropy(["a", "b"]) == pytest.approx(0.6931, abs=1e-4)
    assert is_refusal("ANSWER: Not Provided") and is_refusal("I don't know.") and not is_refusal("Paris")
    assert parse_confidence("The answer is 7 and my confidence score is 0.9.") == 0.9
    assert parse_confidence("confidence: 150") is None


def test_ood_set_is_half_made_up_with_no_real_names():
    rows = [json.loads(line) for line in bundled.path("ood_qa", "test").read_text().splitlines()]
    assert sum(r["answerable"] for r in rows) == 100 and len(rows) == 200
    real = {s.lower() for s in [*CAPITALS, *CAPITALS.values(), *(e[0] for e in ELEMENTS), *PLANETS]}
    for r in rows:
        assert (r["answer"] is None) == (not r["answerable"])
        if not r["answerable"]:
            assert not any(w.strip("?.,'").lower() in real for w in r["prompt"].split() if w[:1].isupper() or "ium" in w)


def test_bench_measurements_run_on_a_checkpoint(tiny_model_dir):
    from ftray.eval.confidence_bench import _metacognition, _r_tuning, _us_tuning

    rt = _r_tuning(str(tiny_model_dir), 3)
    assert set(rt) >= {"rt_ap", "rt_ap_sure", "rt_answered_acc", "rt_refusal_in", "rt_refusal_ood_unanswerable", "rt_ap_ood"}
    assert 0 <= rt["rt_refusal_in"] <= 1 and 0 <= rt["rt_refusal_ood_unanswerable"] <= 1
    mc = _metacognition(str(tiny_model_dir), 2)
    assert 0 <= mc["mc_parse_rate"] <= 1 and "mc_ece_ood" in mc
    us = _us_tuning(str(tiny_model_dir), 2)
    assert 0 <= us["us_acc_answerable"] <= 1 and 0 <= us["us_judgement_acc"] <= 1 and "us_overall_ood" in us
