"""A dirty SFT pool for data-curation methods: the bundled arithmetic problems with injected near-duplicates
and self-repeating rationales (2000 train rows; the clean arithmetic test split).

- 1250 clean problems (each once);
- near-duplicates: 50 of those problems get 9 more copies each (450 rows), every copy with one or two
  surface edits (a "Question:"-style prefix, a polite suffix, lower case, doubled spaces): word-level
  near-duplicates that over-weight 50 problems;
- repetition: 300 other problems whose rationale is its first sentence ten times, then the answer line.
Every row says what it is in `injected` ("none", "near_duplicate", "repetition"); the rows are shuffled.
"""

from __future__ import annotations

import random

PREFIXES = ["Question: ", "Please solve: ", "Q: ", "Solve this problem: "]
SUFFIXES = [" Show your work.", " Thanks!", " Please answer.", " Explain briefly."]


def _variant(row: dict, rng: random.Random) -> dict:
    """The same problem with one or two surface edits (same rationale and answer)."""
    q = row["question"]
    for edit in rng.sample(["prefix", "suffix", "lower", "spaces"], rng.choice([1, 2])):
        if edit == "prefix":
            q = rng.choice(PREFIXES) + q
        elif edit == "suffix":
            q = q + rng.choice(SUFFIXES)
        elif edit == "lower":
            q = q.lower()
        else:
            q = q.replace(" ", "  ", 3)
    return {**row, "question": q, "injected": "near_duplicate"}


def _looping(row: dict) -> dict:
    """The problem with a degenerate rationale: its first sentence ten times."""
    first = row["rationale"].split(". ")[0].rstrip(".") + "."
    return {**row, "rationale": " ".join([first] * 10), "injected": "repetition"}


def generate(clean_train: list[dict], clean_test: list[dict], seed: int, n_clean: int = 1250, n_bases: int = 50,
             copies: int = 9, n_looping: int = 300) -> tuple[list[dict], list[dict]]:
    """(train pool, test) from the clean arithmetic splits; the test split is the clean one, unchanged."""
    rng = random.Random(seed + 11)
    clean = [{**r, "injected": "none"} for r in clean_train[:n_clean]]
    bases = rng.sample(clean, n_bases)
    seen = {r["question"] for r in clean_train}
    near = []
    for base in bases:  # every variant a new question string (so no row is an exact copy)
        for _ in range(copies):
            row = _variant(base, rng)
            while row["question"] in seen:
                row = _variant(base, rng)
            seen.add(row["question"])
            near.append(row)
    looping = [_looping(r) for r in clean_train[n_clean:n_clean + n_looping]]
    pool = clean + near + looping
    rng.shuffle(pool)
    return pool, [dict(r) for r in clean_test]
