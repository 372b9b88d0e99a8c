"""R-Tuning: a question the base model answers correctly lands in "certain" (and one it gets wrong in
"uncertain"); every text keeps its gold answer; R-Tuning-U's split is exactly the ⌊N/2⌋ lowest entropies."""

import pyarrow as pa
import pytest

from ftray.config import build_spec
from ftray.data.inference import Answerer
from ftray.eval.confidence import cut_answer, normalize_answer
from ftray.methods import build_methods
from ftray.methods.r_tuning import CONFIDENCE_QUESTION, REFUSALS
from tests.methods.helpers import prepare

QUESTIONS = ["What is the capital of France?", "What is the atomic number of iron?", "Which planet do we live on?",
             "How many days are in 2 weeks?", "What month comes 1 month after May?", "What is the chemical symbol for gold?"]


def spec_for(tiny_model_dir, **fields):
    return build_spec({"model": {"name": str(tiny_model_dir)}, "methods": [{"name": "r_tuning", **fields}],
                       "data": {"infer_batch_size": 4}})


def own_answers(spec, prompts: list[str]) -> list[str]:
    """The tiny model's greedy probe answers, computed with the very Answerer the method uses."""
    table = pa.Table.from_pylist([{"prompt": p, "completion": "x"} for p in prompts])
    out = Answerer(spec.model_dump(mode="json"), max_new_tokens=15)(table)
    return [cut_answer(a[0]) for a in out.column("answers").to_pylist()]


def test_split_puts_what_the_model_answers_in_certain_and_keeps_every_gold(tiny_model_dir, tiny_tokenizer, ray_local):
    spec = spec_for(tiny_model_dir)
    answers = own_answers(spec, QUESTIONS)
    known = [(q, a) for q, a in zip(QUESTIONS, answers) if normalize_answer(a)]
    assert len(known) >= 2, "the tiny model should give a non-empty first sentence to most prompts"
    (q_known, a_known), (q_wrong, _) = known[0], known[1]
    rows = [{"prompt": q_known, "completion": a_known, "answer": a_known},               # gold = the model's own answer
            {"prompt": q_wrong, "completion": "Zanzibar", "answer": "Zanzibar"}]         # an answer it never gives
    out, report = prepare(build_methods(spec.methods)[0], rows, spec, tiny_tokenizer)
    by_prompt = {r["messages"][-2]["content"]: r for r in out}
    assert by_prompt[q_known]["certain"] and not by_prompt[q_wrong]["certain"]
    assert report["certain"] == 1 and report["uncertain"] == 1 and report["probe_accuracy"] == 0.5
    sure = by_prompt[q_known]["messages"][-1]["content"]
    unsure = by_prompt[q_wrong]["messages"][-1]["content"]
    assert sure == f"{a_known.rstrip('.')}. {CONFIDENCE_QUESTION} I am sure."
    assert unsure == f"Zanzibar. {CONFIDENCE_QUESTION} I am unsure."  # the gold answer stays, whatever the label


def test_refusal_variant_replaces_only_uncertain_answers(tiny_model_dir, tiny_tokenizer, ray_local):
    spec = spec_for(tiny_model_dir, variant="refusal")
    rows = [{"prompt": q, "completion": "Zanzibar"} for q in QUESTIONS[:3]]
    out, report = prepare(build_methods(spec.methods)[0], rows, spec, tiny_tokenizer)
    assert report["uncertain"] == 3
    assert all(r["messages"][-1]["content"] in REFUSALS for r in out)


@pytest.mark.parametrize("n", [5, 6])
def test_unsupervised_split_is_the_lowest_half_of_answer_entropy(n):
    method = build_methods(build_spec({"methods": [{"name": "r_tuning", "variant": "unsupervised"}]}).methods)[0]
    samples = [["Paris"] * 5, ["a", "b", "c", "d", "e"], ["x", "x", "y", "y", "z"], ["7", "7", "7", "7", "8"],
               ["Rome", "rome.", "Rome", "ROME", "Rome"], ["q", "q", "r", "s", "t"]][:n]
    rows = [{"prompt": f"q{i}", "completion": "a", "answers": s} for i, s in enumerate(samples)]
    certain = method._split(rows, "prompt_completion")
    assert sum(certain) == n // 2
    assert certain[0] and certain[4]  # one distinct answer (after normalisation): entropy 0
    assert not certain[1]  # five distinct answers: the highest entropy
