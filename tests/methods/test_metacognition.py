"""Metacognition SFT: consistency is the modal answer's share of the samples; targets sit within the noise of
their bin's accuracy; pairs point to the higher target and never share a bin; the trained format parses back."""

import random

from ftray.config import build_spec
from ftray.eval.confidence import parse_confidence
from ftray.methods import build_methods
from ftray.methods.metacognition import calibrate, make_pairs, single_target
from tests.methods.helpers import prepare


def method(**fields):
    return build_methods(build_spec({"methods": [{"name": "metacognition", **fields}]}).methods)[0]


def test_consistency_is_the_modal_answers_share_and_correctness_is_of_the_modal_answer():
    m = method(num_samples=5, n_bins=5)
    row = {"prompt": "What is the capital of France?", "completion": "Paris",
           "answers": ["Paris.", "The capital of France is Paris.", "Lyon", "paris", "Rome is the capital."]}
    s = m.score(row, "prompt_completion")
    assert s["answer"] == "Paris" and s["consistency"] == 0.6 and s["correct"] and s["bin"] == 2
    wrong = m.score({**row, "answers": ["Lyon", "Lyon", "Lyon", "Lyon", "Nice"]}, "prompt_completion")
    assert wrong["answer"] == "Lyon" and wrong["consistency"] == 0.8 and not wrong["correct"] and wrong["bin"] == 3


def items_with(bins_correct: dict[int, list[bool]]) -> list[dict]:
    return [{"bin": b, "correct": c, "prompt": [{"role": "user", "content": f"q{b}-{i}"}], "answer": "a"}
            for b, cs in bins_correct.items() for i, c in enumerate(cs)]


def test_targets_are_bin_accuracy_plus_bounded_noise_and_crowded_bins_are_subsampled():
    rng = random.Random(0)
    items = items_with({0: [False] * 8 + [True] * 2, 4: [True] * 60 + [False] * 20, 2: [True, False, False]})
    kept = calibrate(items, 5, 0.05, 2.0, rng)
    counts = {b: sum(s["bin"] == b for s in kept) for b in (0, 2, 4)}
    assert counts[0] == 10 and counts[2] == 3 and counts[4] == 62  # cap: ceil(2 × 93 / 3) = 62
    for b in (0, 2, 4):
        acc = sum(s["correct"] for s in kept if s["bin"] == b) / counts[b]
        assert all(abs(s["target"] - acc) <= 0.05 + 0.005 and 0 <= s["target"] <= 1 for s in kept if s["bin"] == b)
    untouched = calibrate(items_with({1: [True] * 3}), 5, 0.05, None, rng)
    assert all(s["target"] >= 0.95 and s["target"] <= 1.0 for s in untouched)  # clipped to 1


def test_pairs_point_to_the_higher_target_and_never_share_a_bin():
    rng = random.Random(1)
    items = calibrate(items_with({0: [False] * 10, 3: [True, False] * 5, 4: [True] * 10}), 5, 0.05, None, rng)
    pairs = make_pairs(items, 50, rng)
    assert len(pairs) == 50
    assert all(hi["bin"] != lo["bin"] and hi["target"] > lo["target"] for hi, lo in pairs)
    assert make_pairs(items_with({2: [True] * 5}), 10, rng) == []  # one bin: no pairs


def test_trained_format_parses_back():
    text = single_target("Paris.", 0.37)
    assert text == "The answer is Paris and my confidence score is 0.37."
    assert parse_confidence(text) == 0.37
    assert parse_confidence("my confidence score is 85%") == 0.85 and parse_confidence("no number here") is None


def test_prepare_data_mixes_single_and_pair_rows(tiny_model_dir, tiny_tokenizer, ray_local):
    spec = build_spec({"model": {"name": str(tiny_model_dir)}, "data": {"infer_batch_size": 4},
                       "methods": [{"name": "metacognition", "num_samples": 3, "n_bins": 3, "pairs_per_domain": 4,
                                    "max_new_tokens": 6}]})
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": str(2 * i)} for i in range(8)]
    out, report = prepare(build_methods(spec.methods)[0], rows, spec, tiny_tokenizer)
    singles = [r for r in out if r["task"] == "single"]
    assert len(singles) == report["single"] >= 1 and report["domains"]["all"]["questions"] == len(singles)
    for r in singles:
        assert parse_confidence(r["messages"][-1]["content"]) == r["confidence"]
        assert r["messages"][-1]["content"].startswith("The answer is ")
    for r in out:
        if r["task"] == "pair":
            assert r["messages"][-1]["content"] in ("The answer is Q1.", "The answer is Q2.")
