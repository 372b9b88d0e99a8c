"""Uni-MuMER: the four tasks at their ratios from the same images, EDL readings are near misses whose
described errors turn them into the truth, every CoT reply ends in the truth, and the HMER metrics."""

import random

import pytest

from ftray.config import build_spec
from ftray.data import load_rows
from ftray.methods import Context, build_methods
from ftray.methods.uni_mumer import TASKS, describe_errors, final_latex, hmer_scores, synthetic_error, token_edits


def test_exprate_on_identical_strings_is_100_and_counts_edits():
    refs = ["\\frac { x } { 6 }", "a + b = c"]
    assert hmer_scores(refs, refs) == {"exprate": 100.0, "exprate_le1": 100.0, "exprate_le2": 100.0, "cer": 0.0}
    s = hmer_scores(["\\frac { y } { 6 }", "a + b"], refs)  # one substitution, two deletions
    assert s["exprate"] == 0 and s["exprate_le1"] == 50 and s["exprate_le2"] == 100
    assert final_latex("Tree: (seq a + b)\nLaTeX: a  +  b") == "a + b"


def test_synthetic_errors_are_near_misses_and_their_description_names_the_edits():
    rng = random.Random(0)
    truth = "\\sqrt { n + b } - 2 = 8"
    for _ in range(50):
        wrong = synthetic_error(truth, rng, 2, truth.split())
        assert wrong != truth and 1 <= token_edits(wrong.split(), truth.split()) <= 4  # an insert+delete pair may count as 2 each
    assert describe_errors("a - b = c", "a + b = c") == "'-' should be '+'"
    assert describe_errors("a + b", "a + b = c") == "missing '= c'"
    assert describe_errors("a + b", "a + b") == "no errors"


@pytest.mark.parametrize("ratios,expected", [({}, {t: 12 for t in TASKS}),
                                             ({"tree_cot": 0.5, "edl": 0.0, "symbol_counting": 2.0}, {"vanilla": 12, "tree_cot": 6, "edl": 0, "symbol_counting": 24})])
def test_prepare_data_builds_each_task_at_its_ratio_from_the_same_images(ray_local, tiny_llava_dir, ratios, expected):
    import ray.data

    spec = build_spec({"model": {"name": str(tiny_llava_dir)}, "task": {"type": "vision_language"},
                       "data": {"source": "bundled:math_images"}, "methods": [{"name": "uni_mumer", **ratios}]})
    rows = load_rows("bundled:math_images", "train", 12).to_list()
    ctx = Context(spec=spec, tokenizer=None)
    out = build_methods(spec.methods)[0].prepare_data(ray.data.from_items(rows), ctx).take_all()
    assert ctx.report["rows_per_task"] == expected and len(out) == sum(expected.values())
    images = {r["images"][0] for r in rows}
    for r in out:
        assert r["images"][0] in images
        prompt, reply = r["messages"][0]["content"][1]["text"], r["messages"][1]["content"][0]["text"]
        assert final_latex(reply) == " ".join(r["latex"].split())  # every task's reply ends in the truth
        if r["task"] == "edl":
            reading = prompt.split("as: ", 1)[1].split("\n", 1)[0]
            assert reading != r["latex"] and reply.startswith("Errors: ") and "no errors" not in reply
        if r["task"] == "tree_cot":
            assert reply.startswith("Tree: ") and "\nLaTeX: " in reply


def test_all_zero_ratios_fail_before_training():
    with pytest.raises(ValueError, match="every task ratio is 0"):
        build_spec({"task": {"type": "vision_language"}, "methods": [{"name": "uni_mumer", "vanilla": 0, "tree_cot": 0, "edl": 0, "symbol_counting": 0}]})
