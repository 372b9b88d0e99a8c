"""Q-Tuning: quadrant shares follow the quantile settings, sample pruning keeps only the Q2/Q4 corners (at
least round(r_s·B) samples), token pruning masks only Q2 response tokens down to about r_s·r_t of them, and
the label mask reaches the tokenized rows (r_s = r_t = 1 changes nothing)."""

import datasets
import numpy as np
import pytest

from ftray.config import build_spec
from ftray.data import DataError, load_rows
from ftray.methods import build_methods
from ftray.methods.q_tuning import apply_label_keep, compose_keep, eu_quadrants, quantile_masks, select_samples, token_keep, token_scores
from ftray.tasks import get_task
from tests.methods.helpers import prepare


@pytest.mark.parametrize("alpha,beta", [(0.5, 0.5), (0.25, 0.4), (0.1, 0.3)])
def test_quadrant_shares_match_the_quantile_settings(alpha, beta):
    n = 2000
    rng = np.random.default_rng(0)
    ppl, ent = rng.lognormal(size=n), rng.uniform(size=n)  # independent error and uncertainty
    quad = eu_quadrants(ppl, ent, alpha, beta)
    share = {q: (quad == q).mean() for q in range(5)}
    # the thresholds are exact quantiles: "high"/"low" PPL are the top/bottom α, "high"/"low" Ent the top/bottom β
    (hi_p, lo_p), (hi_e, lo_e) = quantile_masks(ppl, alpha), quantile_masks(ent, beta)
    assert abs(hi_p.mean() - alpha) <= 1 / n and abs(lo_p.mean() - alpha) <= 1 / n
    assert abs(hi_e.mean() - beta) <= 1 / n and abs(lo_e.mean() - beta) <= 1 / n
    assert (quad[hi_p & lo_e] == 2).all() and (quad[lo_p & hi_e] == 4).all()
    assert (quad[hi_p & hi_e] == 1).all() and (quad[lo_p & lo_e] == 3).all()
    # and each corner holds about α·β of independent samples (4 binomial standard deviations)
    for q in (1, 2, 3, 4):
        assert abs(share[q] - alpha * beta) <= 4 * np.sqrt(alpha * beta / n)
    if alpha == beta == 0.5:
        assert share[0] == 0  # at the medians the four quadrants cover the plane


def test_sample_pruning_keeps_the_two_corners_and_at_least_round_rs_b():
    rng = np.random.default_rng(1)
    for b, r_s in [(16, 0.25), (64, 0.25), (200, 0.4), (7, 0.5)]:
        ppl, ent = rng.lognormal(size=b), rng.uniform(size=b)
        keep, quad, alpha = select_samples(ppl, ent, r_s)
        assert keep.sum() >= max(1, round(r_s * b)) and 0 <= alpha <= 0.49
        assert set(quad[keep]) <= {2, 4}
        region = eu_quadrants(ppl, ent, alpha, alpha)
        pn, en = (ppl - ppl.min()) / np.ptp(ppl), (ent - ent.min()) / np.ptp(ent)
        for i in np.flatnonzero(keep):
            if region[i] in (2, 4):  # inside a corner at the bisected thresholds
                assert quad[i] == region[i]
            else:  # topped up: the most off-diagonal samples, Q2 when normalised PPL ≥ normalised Ent
                assert quad[i] == (2 if pn[i] >= en[i] else 4)
                assert np.abs(pn[i] - en[i]) >= np.abs(pn - en)[~keep].max()
        assert not keep[np.isin(region, (1, 3)) & ~keep].any()


def test_token_scores_add_or_average_the_neighbours():
    nll = np.log([2.0, 4.0, 8.0])
    np.testing.assert_allclose(token_scores(nll, 0.5), [0.5 * 2 + 0.5 * 4, 0.5 * 4 + 0.5 * 10, 0.5 * 8 + 0.5 * 4])
    np.testing.assert_allclose(token_scores(nll, 0.5, "mean"), [1 + 1, 2 + 2.5, 4 + 1])


def test_token_pruning_masks_only_q2_tokens_down_to_rs_rt():
    rng = np.random.default_rng(2)
    token_nll = [rng.exponential(size=rng.integers(20, 40)).tolist() for _ in range(32)]
    ppl = np.array([np.exp(np.mean(t)) for t in token_nll])
    ent = rng.uniform(size=32)
    keep, quad, _ = select_samples(ppl, ent, 0.25)
    masks, pruned = token_keep(token_nll, keep, quad, 0.25, 0.7, 0.5)
    n = sum(len(t) for t in token_nll)
    kept_tokens = sum(sum(m) for m in masks if m is not None)
    assert kept_tokens == round(n * 0.25 * 0.7) and pruned > 0  # the budget is met exactly when Q2 has enough tokens
    for i, m in enumerate(masks):
        assert (m is None) == (not keep[i])
        if m is not None:
            assert len(m) == len(token_nll[i]) and sum(m) >= 1
            if quad[i] == 4:
                assert all(m)  # Q4 keeps every token
    # the highest-scoring tokens of Q2 rows went first
    q2 = [i for i in np.flatnonzero(keep) if quad[i] == 2]
    dropped = [s for i in q2 for s, k in zip(token_scores(token_nll[i], 0.5), masks[i]) if not k]
    kept_scores = [s for i in q2 for s, k in zip(token_scores(token_nll[i], 0.5), masks[i]) if k]
    floors = {min(token_scores(token_nll[i], 0.5)) for i in q2}
    assert min(dropped) >= max(s for s in kept_scores if s not in floors)


def test_full_budgets_keep_everything():
    rng = np.random.default_rng(3)
    token_nll = [rng.exponential(size=10).tolist() for _ in range(12)]
    keep, quad, _ = select_samples(rng.lognormal(size=12), rng.uniform(size=12), 1.0)
    masks, pruned = token_keep(token_nll, keep, quad, 1.0, 1.0, 0.5)
    assert keep.all() and pruned == 0 and all(all(m) for m in masks)


def test_apply_label_keep_masks_the_listed_label_tokens_and_checks_the_count():
    row = {"input_ids": [5, 6, 7, 8, 9, 10], "labels": [-100, -100, 7, 8, -100, 10]}
    (out,) = apply_label_keep([row], [[1, 0, 1]])
    assert out["labels"] == [-100, -100, 7, -100, -100, 10] and out["input_ids"] == row["input_ids"]
    assert apply_label_keep([row], [None])[0] is row
    with pytest.raises(DataError, match="covers 2 label tokens but the row tokenizes to 3"):
        apply_label_keep([row], [[1, 1]])
    assert compose_keep([1, 0, 1, 1], [1, 0, 1]) == [1, 0, 0, 1] and compose_keep(None, [1, 0]) == [1, 0]


def _tokenized(spec, rows, tokenizer):
    return get_task(spec).tokenize(datasets.Dataset.from_list(rows), tokenizer, "test")


def test_prepare_data_keeps_q2_q4_rows_with_masks_that_reach_the_labels(tiny_model_dir, tiny_tokenizer, ray_local):
    rows = load_rows("bundled:arithmetic_noisy", max_samples=32).to_list()
    spec = build_spec({"model": {"name": str(tiny_model_dir)}, "data": {"max_len": 128}, "methods": ["q_tuning"]})
    out, report = prepare(build_methods(spec.methods)[0], rows, spec, tiny_tokenizer)
    assert len(out) == report["rows_kept"] >= round(0.25 * 32)
    assert {r["quadrant"] for r in out} <= {"Q2", "Q4"} and sum(report["regions"].values()) == 32
    plain = {r["question"]: t for r, t in zip(rows, _tokenized(spec, rows, tiny_tokenizer))}
    masked = _tokenized(spec, out, tiny_tokenizer)
    for r, t in zip(out, masked):
        before = plain[r["question"]]["labels"]
        assert t["input_ids"] == plain[r["question"]]["input_ids"]
        assert len(r["label_keep"]) == sum(x != -100 for x in before[1:])
        assert sum(x != -100 for x in t["labels"][1:]) == sum(r["label_keep"])
        if r["quadrant"] == "Q4":
            assert t["labels"] == before
    kept_tokens = sum(sum(r["label_keep"]) for r in out)
    assert kept_tokens == report["label_tokens_kept"]
    assert abs(kept_tokens - 0.25 * 0.7 * report["label_tokens_in"]) <= 0.05 * report["label_tokens_in"]


def test_full_budgets_leave_the_tokenized_rows_as_plain_sft(tiny_model_dir, tiny_tokenizer, ray_local):
    rows = load_rows("bundled:arithmetic", max_samples=12).to_list()
    spec = build_spec({"model": {"name": str(tiny_model_dir)}, "data": {"max_len": 128},
                       "methods": [{"name": "q_tuning", "data_ratio": 1.0, "token_ratio": 1.0}]})
    out, _ = prepare(build_methods(spec.methods)[0], rows, spec, tiny_tokenizer)
    assert [r["question"] for r in out] == [r["question"] for r in rows]
    assert _tokenized(spec, out, tiny_tokenizer) == _tokenized(spec, rows, tiny_tokenizer)
