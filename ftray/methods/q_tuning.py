"""Q-Tuning (Wang et al., 2509.23873, 2025): joint sample and token pruning on the Error–Uncertainty plane.

Idea: place every sample on the EU plane, error = its perplexity (PPL) and uncertainty = its mean
predictive entropy (Ent), and split it at quantile thresholds into four quadrants:
  Q1 high PPL, high Ent: harmful noise → drop        Q2 high PPL, low Ent: valuable misconception → keep, prune tokens
  Q3 low PPL, low Ent:   redundant → drop            Q4 low PPL, high Ent: calibration data → keep every token
With quantile setting α (PPL) and β (Ent), "high PPL" is PPL > quantile(PPL, 1−α), "low PPL" is
PPL ≤ quantile(PPL, α) (the same for Ent with β); α = β is found by bisection so that Q2 ∪ Q4 holds the
sample keep ratio r_s, then topped up to round(r_s·B) by the most off-diagonal samples. Inside Q2, the
tokens with the highest context-aware score s_t = (1−λ)·ppl_t + λ·(ppl_{t−1} + ppl_{t+1}) lose their
labels until the batch keeps about r_s·r_t of its tokens.

Decisions:
- Offline, on Ray Data. The paper scores each mini-batch with the model being trained, inside the loss;
  ftray runs it as a `prepare_data` pass with the run's model before training (`ResponseScorer`,
  per-token NLL over the label tokens), so it is one more data method that composes with every other
  method and loss [inf]. `group_size` reproduces the per-batch decision (seeded groups of B rows);
  by default the quantiles are taken over the whole pool.
- Token pruning is a label mask: the kept rows carry `label_keep` (1 = keep, 0 = drop; one entry per
  label token in order, as `ResponseScorer(per_token=True)` lists them), which `apply_label_keep` turns
  into labels of -100 when the causal-LM task tokenizes the rows (ftray/tasks/causal_lm.py). The mask
  lives in the tokenized labels, not in the batch, so it composes with packing and with any loss.
- Ent is the mean entropy over the response (label) tokens; the authors' code averages over every
  non-pad position, prompt included, which the spec leaves open [inf].
- The token budget counts label tokens (N = the group's label tokens; target kept = round(N·r_s·r_t)),
  the tokens a label mask can drop; the authors' code counts every non-pad token [inf]. Each Q2 row keeps
  at least its lowest-scoring token, so no kept row is left without a label.
- Neighbours outside a row's label tokens count as 0; `neighbours: mean` averages them instead of adding
  them (a paper summary's reading; the code adds them).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
from pydantic import Field

from ftray.methods.base import Context, Method, MethodConfig, stable_seed
from ftray.methods.ppl_filter import BENCH_POOL, SCORE_COLUMNS, select_rows, short
from ftray.methods.registry import register

if TYPE_CHECKING:
    import ray.data

LABEL_KEEP = "label_keep"
ALPHA_MAX, BISECT_ITERS, BISECT_TOL = 0.49, 10, 0.01  # the authors' search range, iterations and tolerance
QUADRANT_NAMES = {0: "mid", 1: "Q1", 2: "Q2", 3: "Q3", 4: "Q4"}


class QTuningConfig(MethodConfig):
    """Budgets and token-score settings of Q-Tuning (the authors' defaults)."""

    data_ratio: float = Field(0.25, gt=0, le=1, description="Sample keep ratio r_s: the share of samples kept (paper headline: 0.25).")
    token_ratio: float = Field(0.7, gt=0, le=1, description="Token keep ratio r_t: about r_s·r_t of the label tokens stay supervised (paper: 0.7).")
    wise_lambda: float = Field(0.5, ge=0, le=1, description="λ of the token score s_t = (1−λ)·ppl_t + λ·(ppl_{t−1} + ppl_{t+1}).")
    neighbours: Literal["sum", "mean"] = Field("sum", description="Combine the two neighbours' ppl by sum (the authors' code) or mean (a paper summary).")
    group_size: int | None = Field(None, ge=2, description="Decide per seeded group of this many rows (the paper's mini-batch B); "
                                   "null = one decision over the whole pool.")


def quantile_masks(values: np.ndarray, q: float) -> tuple[np.ndarray, np.ndarray]:
    """(high, low): values > quantile(1−q) and values ≤ quantile(q) (linear interpolation, as torch.quantile)."""
    return values > np.quantile(values, 1 - q), values <= np.quantile(values, q)


def eu_quadrants(ppl: Sequence[float], ent: Sequence[float], alpha: float, beta: float) -> np.ndarray:
    """Each sample's region of the EU plane at quantile settings α (PPL) and β (Ent): 1-4, or 0 (middle bands)."""
    hi_p, lo_p = quantile_masks(np.asarray(ppl, dtype=float), alpha)
    hi_e, lo_e = quantile_masks(np.asarray(ent, dtype=float), beta)
    quad = np.zeros(len(hi_p), dtype=int)
    quad[hi_p & hi_e], quad[hi_p & lo_e], quad[lo_p & lo_e], quad[lo_p & hi_e] = 1, 2, 3, 4
    return quad


def bisect_alpha(ppl: Sequence[float], ent: Sequence[float], r_s: float) -> float:
    """α = β in [0, 0.49] at which Q2 ∪ Q4 holds about r_s of the samples (the authors' bisection)."""
    lo, hi = 0.0, ALPHA_MAX
    alpha = (lo + hi) / 2
    for _ in range(BISECT_ITERS):
        alpha = (lo + hi) / 2
        share = np.isin(eu_quadrants(ppl, ent, alpha, alpha), (2, 4)).mean()
        if abs(share - r_s) < BISECT_TOL:
            break
        lo, hi = (alpha, hi) if share < r_s else (lo, alpha)
    return alpha


def _minmax(x: np.ndarray) -> np.ndarray:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def select_samples(ppl: Sequence[float], ent: Sequence[float], r_s: float) -> tuple[np.ndarray, np.ndarray, float]:
    """(keep mask, quadrant 1-4/0 of each sample, α): Q2 ∪ Q4 at the bisected α, topped up to round(r_s·B).

    Topped-up samples are the most off-diagonal ones on the min-max normalised plane; they count as Q2
    when their normalised PPL ≥ normalised Ent, else as Q4 (the authors' rule).
    """
    ppl, ent = np.asarray(ppl, dtype=float), np.asarray(ent, dtype=float)
    alpha = bisect_alpha(ppl, ent, r_s)
    quad = eu_quadrants(ppl, ent, alpha, alpha)
    keep = np.isin(quad, (2, 4))
    need = max(1, round(r_s * len(ppl))) - int(keep.sum())
    if need > 0:
        pn, en = _minmax(ppl), _minmax(ent)
        order = np.argsort(-np.abs(pn - en), kind="stable")
        extra = order[~keep[order]][:need]
        keep[extra] = True
        quad[extra] = np.where(pn[extra] >= en[extra], 2, 4)
    return keep, quad, alpha


def token_scores(token_nll: Sequence[float], lam: float, neighbours: str = "sum") -> np.ndarray:
    """s_t = (1−λ)·ppl_t + λ·(ppl_{t−1} + ppl_{t+1}) over one row's label tokens (neighbours past the ends = 0)."""
    p = np.exp(np.minimum(np.asarray(token_nll, dtype=float), 50.0))
    padded = np.concatenate([[0.0], p, [0.0]])
    side = padded[:-2] + padded[2:]
    return (1 - lam) * p + lam * (side / 2 if neighbours == "mean" else side)


def token_keep(token_nll: Sequence[Sequence[float]], keep: np.ndarray, quad: np.ndarray, r_s: float, r_t: float,
               lam: float, neighbours: str = "sum") -> tuple[list[list[int] | None], int]:
    """Per-row label masks (None for dropped rows) and the number of label tokens dropped inside Q2 rows.

    Budget: N label tokens, target kept round(N·r_s·r_t); the dropped samples' tokens count first, the
    rest comes from the highest-scoring tokens of Q2 rows (each keeps at least its lowest-scoring one).
    """
    n = np.array([len(t) for t in token_nll])
    need = int(n.sum() - round(n.sum() * r_s * r_t) - n[~keep].sum())
    masks: list[list[int] | None] = [[1] * int(k) if kept else None for k, kept in zip(n, keep)]
    candidates = []  # (score, row, position)
    for i in np.flatnonzero(keep & (quad == 2)):
        s = token_scores(token_nll[i], lam, neighbours)
        floor = int(np.argmin(s)) if len(s) else -1
        candidates += [(float(s[t]), int(i), t) for t in range(len(s)) if t != floor]
    if need <= 0 or not candidates:
        return masks, 0
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    chosen = candidates[:need]
    for _, i, t in chosen:
        masks[i][t] = 0
    return masks, len(chosen)


def compose_keep(old: Sequence[int] | None, new: Sequence[int]) -> list[int]:
    """A label mask over the original label tokens from `new`, a mask over the tokens `old` kept."""
    if old is None:
        return list(new)
    it = iter(new)
    return [int(next(it)) if k else 0 for k in old]


def apply_label_keep(rows: list[dict], keeps: Sequence[Sequence[int] | None]) -> list[dict]:
    """Tokenized rows with labels set to -100 where their `label_keep` drops a label token.

    Label tokens are the positions t ≥ 1 with labels[t] != -100, in order (position 0 is never a target),
    i.e. the order of `ResponseScorer(per_token=True)`'s token lists. Called by the causal-LM task's
    tokenize when the rows carry a `label_keep` column.
    """
    from ftray.data.errors import DataError
    from ftray.data.tokenize import IGNORE_INDEX

    out = []
    for i, (row, keep) in enumerate(zip(rows, keeps), 1):
        if keep is None:
            out.append(row)
            continue
        labels = list(row["labels"])
        positions = [t for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX]
        if len(positions) != len(keep):
            raise DataError(f"training row {i}: its '{LABEL_KEEP}' mask covers {len(keep)} label tokens but the row "
                            f"tokenizes to {len(positions)}; the mask was made with another tokenizer, chat template "
                            "or data.max_len: rerun the data methods (data.recompute=true)")
        for t, k in zip(positions, keep):
            if not k:
                labels[t] = IGNORE_INDEX
        out.append({**row, "labels": labels})
    return out


def groups(n: int, size: int | None, seed: int) -> list[np.ndarray]:
    """Row indices split into seeded random groups of `size` (one group of all rows when size is None)."""
    if not size or size >= n:
        return [np.arange(n)]
    order = np.random.default_rng(seed).permutation(n)
    return [order[i:i + size] for i in range(0, n, size)]


@register
class QTuning(Method):
    """Drop Q1/Q3 samples of the error–uncertainty plane and mask the highest-perplexity tokens of Q2 samples."""

    name = "q_tuning"
    paper = ("Wang et al. 2025, Winning the Pruning Gamble: A Unified Approach to Joint Sample and Token Pruning "
             "for Efficient Supervised Fine-Tuning (2509.23873)")
    Config = QTuningConfig
    bench = {"data": {"source": BENCH_POOL, "eval_source": "bundled:arithmetic"}}
    bench_metrics = ("ftray.methods.ppl_filter:selection_metrics",)

    def prepare_data(self, ds: ray.data.Dataset, ctx: Context) -> ray.data.Dataset:
        """Score every row's PPL, Ent and token NLLs (Ray Data actors); keep Q2 ∪ Q4 rows with their label masks."""
        from ftray.data.inference import ResponseScorer, map_model

        c = self.config
        scored = map_model(ds, ResponseScorer, ctx, per_token=True).materialize()
        cols = ["ppl", "entropy", "token_nll"] + [x for x in (LABEL_KEEP, "source") if x in scored.columns()]
        rows = scored.select_columns(cols).take_all()
        n = len(rows)
        keep, quad, region = np.zeros(n, bool), np.zeros(n, int), np.zeros(n, int)
        masks: list[list[int] | None] = [None] * n
        alphas, pruned = [], 0
        for idx in groups(n, c.group_size, stable_seed(ctx.spec.train.seed, self.name)):
            ppl, ent = [rows[i]["ppl"] for i in idx], [rows[i]["entropy"] for i in idx]
            k, q, alpha = select_samples(ppl, ent, c.data_ratio)
            region[idx] = eu_quadrants(ppl, ent, alpha, alpha)
            m, dropped = token_keep([rows[i]["token_nll"] for i in idx], k, q, c.data_ratio, c.token_ratio,
                                    c.wise_lambda, c.neighbours)
            keep[idx], quad[idx], pruned = k, q, pruned + dropped
            for j, i in enumerate(idx):
                masks[i] = m[j]
            alphas.append(alpha)
        masks = [compose_keep(rows[i].get(LABEL_KEEP), m) if m is not None else None for i, m in enumerate(masks)]
        drop = [x for x in scored.columns() if x in SCORE_COLUMNS and x not in ("ppl", "entropy")]
        out = select_rows(scored.drop_columns(drop), keep.tolist(),
                          {LABEL_KEEP: masks, "quadrant": [QUADRANT_NAMES[int(q)] for q in quad]})
        ctx.report.update(self._report(rows, keep, quad, region, alphas, pruned, scored))
        return out

    def _report(self, rows: list[dict], keep: np.ndarray, quad: np.ndarray, region: np.ndarray, alphas: list[float],
                pruned: int, scored: ray.data.Dataset) -> dict[str, Any]:
        tokens = sum(len(r["token_nll"]) for r in rows)
        kept_tokens = sum(len(r["token_nll"]) for r, k in zip(rows, keep) if k) - pruned
        report: dict[str, Any] = {
            "rows_in": len(rows), "rows_kept": int(keep.sum()),
            "regions": {QUADRANT_NAMES[q]: int((region == q).sum()) for q in range(5)},
            "kept_as": {QUADRANT_NAMES[q]: int((keep & (quad == q)).sum()) for q in (2, 4)},
            "topped_up": int((keep & ~np.isin(region, (2, 4))).sum()),
            "alpha": round(float(np.median(alphas)), 4), "groups": len(alphas),
            "label_tokens_in": tokens, "label_tokens_kept": kept_tokens, "tokens_pruned_in_q2": pruned,
            "kept_token_fraction": round(kept_tokens / max(tokens, 1), 4),
        }
        if rows and "source" in rows[0]:
            sources = [r["source"] for r in rows]
            report["in_by_source"] = dict(sorted(Counter(sources).items()))
            report["kept_by_source"] = dict(sorted(Counter(s for s, k in zip(sources, keep) if k).items()))
            report["regions_by_source"] = {s: dict(sorted(Counter(QUADRANT_NAMES[int(q)] for x, q in zip(sources, region) if x == s).items()))
                                           for s in sorted(set(sources))}
        first = scored.take(min(len(rows), 500))
        examples = []
        for q in (1, 2, 3, 4):
            i = next((i for i in range(len(first)) if region[i] == q), None)
            if i is not None:
                examples.append({"region": QUADRANT_NAMES[q], "kept": bool(keep[i]), "ppl": round(rows[i]["ppl"], 2),
                                 "entropy": round(rows[i]["entropy"], 2), "text": short(first[i])})
        report["examples"] = examples
        return report
