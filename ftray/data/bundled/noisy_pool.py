"""A noisy chain-of-thought pool for the data-selection methods (perplexity filter, Q-Tuning, GOT-D).

The arithmetic train rows 1000-1999 (disjoint from rows 0-999, which a selection method may use as its
target set) with 30% of them replaced by injected noise, marked in a `source` column:
- `arithmetic`: the row unchanged (700 rows);
- `noise_shuffled`: the rationale's words shuffled and the answer a random number (150 rows): garbled
  text, the "shuffled-token noise" of POINTS' small-scale check;
- `noise_mismatched`: the rationale and answer of another problem (150 rows): fluent but wrong for its
  question, a noisy label.
The test split is the clean arithmetic test split.
"""

from __future__ import annotations

import random

SOURCE_CLEAN, SOURCE_SHUFFLED, SOURCE_MISMATCHED = "arithmetic", "noise_shuffled", "noise_mismatched"


def _shuffled(row: dict, rng: random.Random) -> dict:
    words = row["rationale"].split()
    rng.shuffle(words)
    return {**row, "rationale": " ".join(words), "answer": str(rng.randint(0, 200)), "source": SOURCE_SHUFFLED}


def generate(arith_train: list[dict], arith_test: list[dict], seed: int, n_shuffled: int = 150,
             n_mismatched: int = 150) -> tuple[list[dict], list[dict]]:
    """(train, test): arithmetic train rows 1000-1999 with injected noise rows; the clean arithmetic test rows."""
    rng = random.Random(seed)
    pool = [dict(r) for r in arith_train[1000:2000]]
    noisy = rng.sample(range(len(pool)), n_shuffled + n_mismatched)
    shuffled, mismatched = set(noisy[:n_shuffled]), noisy[n_shuffled:]
    donors = mismatched[1:] + mismatched[:1]  # each mismatched row takes the next one's rationale (a derangement)
    out = []
    for i, r in enumerate(pool):
        if i in shuffled:
            out.append(_shuffled(r, rng))
        elif i in mismatched:
            d = pool[donors[mismatched.index(i)]]
            out.append({**r, "rationale": d["rationale"], "answer": d["answer"], "source": SOURCE_MISMATCHED})
        else:
            out.append({**r, "source": SOURCE_CLEAN})
    return out, [{**r, "source": SOURCE_CLEAN} for r in arith_test]
