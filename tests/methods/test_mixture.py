"""mixture: each task is drawn at its weight (±2σ for multinomial draws, ±1 row for quotas), the cocktail's
sizes are round(w·n), a single target gives back its own rows, and the shuffle is seeded."""

from collections import Counter

import numpy as np
import pytest

from ftray.config import SpecError, build_spec
from ftray.data.errors import DataError
from ftray.methods import build_methods
from ftray.methods.mixture import MixtureConfig, task_counts
from ftray.train.trainer import training_source_rows
from tests.methods.helpers import prepare

SIZES = {"A": 300, "B": 100, "C": 50}


def rows_of(sizes: dict[str, int]) -> list[dict]:
    return [{"prompt": f"{task} question {i}", "completion": f"{task} answer {i}", "source": task}
            for task, n in sizes.items() for i in range(n)]


def mixture(entry: dict, seed: int = 0):
    spec = build_spec({"methods": [{"name": "mixture", **entry}], "train": {"seed": seed}})
    return build_methods(spec.methods)[0], spec


def test_multinomial_mixture_draws_each_source_at_its_weight_within_two_sigma(ray_local):
    m, spec = mixture({"mode": "weights", "weights": {"A": 1, "B": 1, "C": 2}, "num_rows": 400, "draw": "multinomial"})
    out, report = prepare(m, rows_of(SIZES), spec)
    counts = Counter(r["source"] for r in out)
    assert len(out) == 400 and sum(counts.values()) == 400
    for task, p in {"A": 0.25, "B": 0.25, "C": 0.5}.items():
        sigma = (400 * p * (1 - p)) ** 0.5
        assert abs(counts[task] - 400 * p) <= 2 * sigma, (task, counts)
    assert report["task_rows_out"] == dict(counts) and report["probabilities"] == {"A": 0.25, "B": 0.25, "C": 0.5}
    # C (50 rows) gives ~200: every row at least three times before any fourth copy
    per_row = Counter(r["prompt"] for r in out if r["source"] == "C")
    assert len(per_row) == 50 and max(per_row.values()) - min(per_row.values()) <= 1


def test_multinomial_counts_stay_within_two_sigma_over_many_seeds():
    cfg = MixtureConfig(mode="temperature", temperature=2.0, num_rows=1000, draw="multinomial")
    p = np.sqrt([300, 100, 50]) / np.sqrt([300, 100, 50]).sum()
    inside = 0
    for seed in range(200):
        counts, probs = task_counts(SIZES, cfg, np.random.default_rng(seed))
        assert np.allclose(list(probs.values()), p, atol=1e-6) and sum(counts.values()) == 1000
        inside += all(abs(c - 1000 * q) <= 2 * (1000 * q * (1 - q)) ** 0.5 for c, q in zip(counts.values(), p))
    assert inside >= 0.85 * 200  # ~95% per task at ±2σ; three tasks (sum-constrained) → ~87-90% all at once


def test_quota_is_within_one_row_and_temperature_flattens_toward_uniform():
    rng = np.random.default_rng(0)
    natural, _ = task_counts(SIZES, MixtureConfig(mode="temperature", temperature=1.0), rng)
    assert natural == SIZES  # T = 1: natural proportions, the concatenation's sizes
    hot, probs = task_counts(SIZES, MixtureConfig(mode="temperature", temperature=1000.0, num_rows=301), rng)
    assert all(abs(c - 301 / 3) <= 1 for c in hot.values()) and sum(hot.values()) == 301
    capped, probs = task_counts(SIZES, MixtureConfig(mode="temperature", temperature=1.0, size_cap=100, num_rows=250), rng)
    assert capped == {"A": 100, "B": 100, "C": 50} and probs == {"A": 0.4, "B": 0.4, "C": 0.2}  # T5's K
    weighted, _ = task_counts(SIZES, MixtureConfig(mode="weights", weights={"A": 1, "B": 1, "C": 1}, num_rows=100), rng)
    assert sorted(weighted.values()) == [33, 33, 34]


def test_cocktail_sizes_are_rounded_rates_and_the_target_ratio_scales_the_others():
    rng = np.random.default_rng(0)
    counts, _ = task_counts(SIZES, MixtureConfig(rates={"A": 0.5, "B": 2.0, "C": 0.25}), rng)
    assert counts == {"A": 150, "B": 200, "C": 13}  # round(w·n), halves up: 12.5 → 13
    counts, _ = task_counts(SIZES, MixtureConfig(rates={"A": 0.5}, target="A", related_ratio=1.0), rng)
    assert counts == {"A": 150, "B": 100, "C": 50}  # the others: 150 rows together, in their 100 : 50 proportion
    counts, _ = task_counts(SIZES, MixtureConfig(target="C", related_ratio=0.5, tasks=["C", "B"]), rng)
    assert counts == {"A": 0, "B": 25, "C": 50}  # S = {B, C}: A is left out
    with pytest.raises(DataError, match="'D' names no task; the tasks are A, B, C"):
        task_counts(SIZES, MixtureConfig(rates={"D": 1.0}), rng)


def test_a_single_target_gives_its_own_rows_and_the_shuffle_is_seeded(ray_local):
    rows = rows_of({"A": 30, "B": 20})
    m, spec = mixture({"tasks": ["B"]})
    out, report = prepare(m, rows, spec)
    assert sorted(map(str, out)) == sorted(map(str, (r for r in rows if r["source"] == "B")))  # up to order
    assert report["task_rows_out"] == {"A": 0, "B": 20}
    m, spec = mixture({}, seed=3)
    once, again = prepare(m, rows, spec)[0], prepare(m, rows, spec)[0]
    m4, spec4 = mixture({}, seed=4)
    other = prepare(m4, rows, spec4)[0]
    assert once == again and sorted(map(str, once)) == sorted(map(str, rows))  # default: the whole concatenation
    assert once != other and once != rows and {r["source"] for r in once[:10]} == {"A", "B"}  # shuffled: batches mix tasks


def test_sources_of_different_formats_become_chat_rows_and_names_are_checked_early():
    spec = build_spec({"data": {"sources": ["bundled:arithmetic", "bundled:factual_qa"]},
                       "methods": [{"name": "mixture", "rates": {"factual_qa": 2.0}}]})
    ds = training_source_rows(spec, "train", 3)
    assert ds.column_names == ["messages", "source"] and ds["source"] == ["bundled:arithmetic"] * 3 + ["bundled:factual_qa"] * 3
    assert ds[0]["messages"][-1]["content"].endswith("\nThe answer is 1.")  # cot: rationale + answer line
    assert ds[3]["messages"] == [{"role": "user", "content": "How many grams are in 1 kilogram?"},
                                 {"role": "assistant", "content": "1000"}]
    with pytest.raises(SpecError, match="'qa' names no task"):
        build_spec({"data": {"sources": ["bundled:arithmetic", "bundled:factual_qa"]},
                    "methods": [{"name": "mixture", "weights": {"qa": 1.0}, "mode": "weights"}]})
    with pytest.raises(SpecError, match="target and related_ratio go together"):
        build_spec({"methods": [{"name": "mixture", "target": "A"}]})
