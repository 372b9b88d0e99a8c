"""GOT-D (Kang et al., ICLR 2024, 2405.02774): optimal-transport data selection toward a target set.

Idea: after light fine-tuning on a subset D_U, the model's data distribution is about λ·D_U + (1−λ)·D_P,
so the best D_U moves the pool's distribution toward the target task's D_R fastest: the candidates with
the most negative gradient of OT(D_S, D_R) with respect to their own probability mass (Thm 1). One
entropic OT solve between the embedded pool and target gives that gradient for every candidate: it is
the candidate's Sinkhorn dual potential g_j, calibrated as in LAVA,

    grad_j = g_j − Σ_{k≠j} g_k / N_S                       select the k most negative

so it picks data that pulls the pool toward the target, not only data resembling the target (a pool
that already holds plenty of one kind of target-like rows gains little from more of them).

Decisions:
- Embeddings are `TextEmbedder`'s (mean-pooled last hidden states, L2-normalised) of the run's model or
  of `encoder`, on Ray Data; each row's text (its messages joined, `to_messages`) is cut to `max_chars`
  characters, the paper's length normalisation (it chunks to 1,000 characters for its NLU runs) [inf].
- The target D_R is `target` (any ftray source), first `target_samples` rows of `target_split`. The
  output is the selected pool rows only (the warm-up set D_U), in pool order, with an `ot_gradient` column.
- OT: POT's log-domain Sinkhorn, squared-Euclidean cost, uniform masses. ε is relative to the mean
  pool–target cost by default: the paper's ε = 0.1 was set for distilBERT features, whose squared
  distances are far larger than those of unit-normalised mean-pooled states, and a relative ε keeps the
  same sharpness for any encoder (ott-jax's `scale_cost="mean"`) [inf]. The cost matrix is built whole
  when it has at most `dense_max_entries` entries, else evaluated in blocks of 2,000 rows every iteration
  (POT's lazy empirical Sinkhorn: memory O(N), as the authors' batched ott-jax solve). The authors'
  momentum (1.3) only speeds convergence and is not used.
- `contrast: true` is GOT-D_contrast: the target is a set to move away from (e.g. toxic text) and the
  largest positive gradients are selected.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field

from ftray.methods.base import Context, Method, MethodConfig
from ftray.methods.ppl_filter import BENCH_POOL, select_rows, short
from ftray.methods.registry import register

if TYPE_CHECKING:
    import ray.data

DENSE_MAX_ENTRIES = 25_000_000  # 200 MB of float64 costs
COST_BLOCK = 2000  # rows per cost block in the lazy solve (the authors' batch size)


class GotDConfig(MethodConfig):
    """Target set, budget and Sinkhorn settings of GOT-D (the authors' values where they exist)."""

    target: str = Field("bundled:arithmetic", description="Target-task rows D_R: 'bundled:<name>', a file or a datasets id.")
    target_split: str = Field("train", description="Split of `target` to read.")
    target_samples: int = Field(1000, ge=1, description="First N target rows used (the authors' demo: about 1,000).")
    fraction: float = Field(0.2, gt=0, le=1, description="Share of the pool selected (when `rows` is not set) [inf: the paper gives absolute budgets].")
    rows: int | None = Field(None, ge=1, description="Number of pool rows selected (the paper: 10k-150k of millions); overrides `fraction`.")
    epsilon: float = Field(0.1, gt=0, description="Entropic regularisation ε of the Sinkhorn solve (authors' code: 0.1).")
    relative_epsilon: bool = Field(True, description="Scale ε by the mean pool–target squared distance (robust to the encoder's geometry).")
    max_iter: int = Field(2000, ge=1, description="Sinkhorn iterations at most (authors' code: 2000).")
    threshold: float = Field(1e-3, gt=0, description="Stop when the L1 error of the target marginal falls below this.")
    max_chars: int = Field(1000, ge=1, description="Characters of each row's text embedded (the paper's length normalisation: 1,000).")
    encoder: str | None = Field(None, description="Embedding model (HF id or path); default the run's model.")
    contrast: bool = Field(False, description="GOT-D_contrast: select the largest positive gradients, moving away from the target.")
    dense_max_entries: int = Field(DENSE_MAX_ENTRIES, ge=1, description="Largest pool×target cost matrix built whole; above it, costs are computed in blocks.")


class RowText:
    """A row's text for embedding: its chat messages' contents joined, cut to `max_chars` characters."""

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars

    def __call__(self, row: dict) -> str:
        """The text of one row (any ftray format)."""
        from ftray.data.formats import format_of_columns, to_messages

        fmt = format_of_columns(row.keys())
        text = "\n".join(m["content"] for m in to_messages(row, fmt)[0]) if fmt else str(row.get("text", ""))
        return text[: self.max_chars]


def ot_potentials(target: np.ndarray, pool: np.ndarray, epsilon: float, max_iter: int = 2000, threshold: float = 1e-3,
                  dense_max_entries: int = DENSE_MAX_ENTRIES) -> np.ndarray:
    """The pool-side dual potentials g (in cost units) of entropic OT between uniform target and pool points."""
    import ot

    target, pool = np.asarray(target, dtype=np.float64), np.asarray(pool, dtype=np.float64)
    a, b = ot.unif(len(target)), ot.unif(len(pool))
    if len(target) * len(pool) <= dense_max_entries:
        cost = ot.dist(target, pool)  # squared Euclidean
        _, log = ot.sinkhorn(a, b, cost, epsilon, method="sinkhorn_log", numItermax=max_iter, stopThr=threshold,
                             log=True, warn=False)
        return epsilon * np.asarray(log["log_v"])
    _, g = ot.bregman.empirical_sinkhorn(target, pool, epsilon, a, b, numIterMax=max_iter, stopThr=threshold,
                                        isLazy=True, batchSize=COST_BLOCK, warn=False)
    return epsilon * np.asarray(g)


def mean_sq_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Mean ‖x_i − y_j‖² over all pairs, in O((n + m)·d): mean‖x‖² + mean‖y‖² − 2·x̄·ȳ."""
    return float((x * x).sum(1).mean() + (y * y).sum(1).mean() - 2 * x.mean(0) @ y.mean(0))


def calibrated_gradient(g: np.ndarray) -> np.ndarray:
    """LAVA's calibration: g_j − Σ_{k≠j} g_k / N (the authors' code); invariant to a constant shift of g in ranking."""
    return g - (g.sum() - g) / len(g)


def ot_gradients(target: np.ndarray, pool: np.ndarray, epsilon: float = 0.1, relative_epsilon: bool = True,
                 max_iter: int = 2000, threshold: float = 1e-3, dense_max_entries: int = DENSE_MAX_ENTRIES) -> tuple[np.ndarray, float]:
    """(calibrated gradient of OT(pool, target) w.r.t. each pool point's mass, the absolute ε used)."""
    target, pool = np.asarray(target, dtype=np.float64), np.asarray(pool, dtype=np.float64)
    eps = epsilon * mean_sq_distance(target, pool) if relative_epsilon else epsilon
    eps = max(eps, 1e-12)
    return calibrated_gradient(ot_potentials(target, pool, eps, max_iter, threshold, dense_max_entries)), eps


def select_lowest(grad: np.ndarray, k: int, contrast: bool = False) -> np.ndarray:
    """Indices of the k most negative gradients (the k most positive for contrast), ties by position."""
    order = np.argsort(-grad if contrast else grad, kind="stable")
    return order[:k]


@register
class GotD(Method):
    """Select the pool rows whose mass most lowers the OT distance to a target set (Sinkhorn dual potentials)."""

    name = "got_d"
    paper = "Kang et al. 2024, Get more for less: Principled Data Selection for Warming Up Fine-Tuning in LLMs (ICLR 2024, 2405.02774)"
    Config = GotDConfig
    # target = 200 clean arithmetic rows (train rows 0-199, disjoint from the pool's rows 1000-1999)
    bench = {"data": {"source": BENCH_POOL, "eval_source": "bundled:arithmetic"},
             "methods": [{"name": "got_d", "target_samples": 200}]}
    bench_metrics = ("ftray.methods.ppl_filter:selection_metrics",)

    def prepare_data(self, ds: ray.data.Dataset, ctx: Context) -> ray.data.Dataset:
        """Embed pool and target in one Ray Data pass, solve OT on the driver, keep the k best pool rows."""
        import operator

        import ray.data

        from ftray.data import load_rows
        from ftray.data.inference import TextEmbedder, map_model

        c = self.config
        text = RowText(c.max_chars)
        pool = ds.materialize()  # fixed block order: the texts, the selection and the examples index the same rows
        texts = [text(r) for r in pool.iter_rows()]
        n_pool = len(texts)
        texts += [text(r) for r in load_rows(c.target, c.target_split, c.target_samples).to_list()]
        # One pass over pool + target (one actor pool, each actor loads the encoder once; it was two); the
        # index column puts the embeddings back in order whatever order Ray Data's blocks finish in.
        items = ray.data.from_items([{"i": i, "text": t} for i, t in enumerate(texts)])
        embedded = map_model(items, TextEmbedder, ctx, text_of=operator.itemgetter("text"), model=c.encoder)
        rows = sorted(embedded.select_columns(["i", "embedding"]).take_all(), key=operator.itemgetter("i"))
        x = np.array([r["embedding"] for r in rows])
        x_pool, x_target = x[:n_pool], x[n_pool:]
        grad, eps = ot_gradients(x_target, x_pool, c.epsilon, c.relative_epsilon, c.max_iter, c.threshold, c.dense_max_entries)
        k = min(len(grad), c.rows or math.ceil(c.fraction * len(grad)))
        chosen = select_lowest(grad, k, c.contrast)
        keep = np.zeros(len(grad), bool)
        keep[chosen] = True
        out = select_rows(pool, keep.tolist(), {"ot_gradient": grad.tolist()})
        report: dict[str, Any] = {"rows_in": len(grad), "rows_selected": k, "target_rows": len(x_target), "epsilon": round(eps, 6),
                                  "gradient_selected_max": round(float(grad[chosen].max()), 6) if k else None,
                                  "gradient_median": round(float(np.median(grad)), 6)}
        if "source" in pool.columns():
            sources = [r["source"] for r in pool.select_columns(["source"]).take_all()]
            report["in_by_source"] = dict(sorted(Counter(sources).items()))
            report["kept_by_source"] = dict(sorted(Counter(sources[i] for i in chosen).items()))
        first = pool.take(min(len(grad), 500))
        ranked = sorted(range(len(first)), key=lambda i: grad[i])
        report["examples"] = [{"ot_gradient": round(float(grad[i]), 6), "selected": bool(keep[i]), "text": short(first[i])}
                              for i in ranked[:2] + ranked[-2:]]
        ctx.report.update(report)
        return out
