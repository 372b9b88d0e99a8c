"""Counterfactual knowledge edits built from the factual-QA tables (the bundled model-editing task, ZsRE-style).

Each edit request rewrites one fact to a false but plausible answer of the same relation (France's
capital becomes another country's capital, an element gets another element's symbol or number) and
carries what the three editing metrics need (see `ftray.eval.edits`):

| field             | used for                                                                  |
| ----------------- | ------------------------------------------------------------------------- |
| prompt, completion| the edit request: train on it; reliability = greedy answer == completion |
| rephrase          | a paraphrase of the prompt: generality = greedy answer == completion     |
| locality_prompt   | an unrelated fact (planets, units, calendar): locality = answer unchanged |
| true_answer       | the fact before the edit (for reading results)                           |

The train split is the edit set; the test split is the same edits asked through two rephrasings
each, the first being the edit's `rephrase` (so `ftray train`'s before/after exact match on the test split is generality, and the train and test
prompts stay disjoint like every bundled set's).
"""

from __future__ import annotations

import random

from ftray.data.bundled.factual_qa import CAPITALS, ELEMENTS, facts

# (relation, edit prompt, rephrasings): {s} is the subject
RELATIONS = {
    "capital": ("What is the capital of {s}?", ["Which city is the capital of {s}?", "Name the capital city of {s}.",
                                                 "Which city serves as the capital of {s}?"]),
    "symbol": ("What is the chemical symbol for {s}?", ["Which symbol stands for the element {s}?",
                                                        "How is {s} written as a chemical symbol?"]),
    "atomic_number": ("What is the atomic number of {s}?", ["How many protons does an atom of {s} have?",
                                                            "Which atomic number does {s} have?"]),
}
UNRELATED = ("planets", "units", "weekdays", "months")  # factual-QA categories no edit touches


def _triples() -> list[tuple[str, str, str]]:
    """(relation, subject, true answer) for every editable fact."""
    out = [("capital", c, cap) for c, cap in CAPITALS.items()]
    out += [("symbol", name, sym) for name, sym, _ in ELEMENTS]
    out += [("atomic_number", name, str(num)) for name, _, num in ELEMENTS]
    return out


def generate(seed: int = 0, n_edits: int = 100) -> tuple[list[dict], list[dict]]:
    """(edit requests, the same edits asked through two rephrasings each)."""
    rng = random.Random(seed)
    triples = _triples()
    answers = {rel: sorted({a for r, _, a in triples if r == rel}) for rel in RELATIONS}
    locality = [q for group in facts() for q in group if q["category"] in UNRELATED]
    rng.shuffle(triples)
    edits, generality = [], []
    for rel, subject, truth in triples[:n_edits]:
        prompt, rephrasings = RELATIONS[rel]
        target = rng.choice([a for a in answers[rel] if a != truth])
        loc = rng.choice(locality)
        paraphrases = [r.format(s=subject) for r in rng.sample(rephrasings, 2)]
        edit = {
            "prompt": prompt.format(s=subject), "completion": target, "answer": target,
            "rephrase": paraphrases[0], "true_answer": truth,
            "locality_prompt": loc["prompt"], "locality_answer": loc["answer"], "category": rel,
        }
        edits.append(edit)
        generality += [{**edit, "prompt": p, "rephrase": edit["prompt"]} for p in paraphrases]
    return edits, generality
