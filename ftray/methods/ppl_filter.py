"""Perplexity filter (POINTS: Liu et al., 2409.04828, 2024): keep the lowest-perplexity fraction of the pool.

Idea: score every training row with a frozen model and keep only the ⌈r·N⌉ rows it finds most
predictable (POINTS keeps the lowest-perplexity 20% of its pre-training pool and matches or beats the
whole pool); high-perplexity rows are mostly noise (garbled text, mismatched pairs).

    ppl_i = exp(mean NLL of row i's scored tokens)      keep the first ⌈r·N⌉ rows in ascending ppl

Decisions:
- The scorer is the run's own model before training (or `scorer`, any model id/path), through
  `ResponseScorer` on Ray Data (`VLMScorer` for task.type vision_language: the reply given image and prompt). `scope: response` scores the reply given the prompt (the SFT analogue of
  POINTS' "caption given the image"); `scope: all` scores every token of the rendered example.
- Ties are broken by row order, so exactly ⌈r·N⌉ rows come out and every kept ppl ≤ every dropped ppl.
- The output keeps the input order (training shuffles anyway) and adds a `ppl` column.
- `selection_metrics` is the bench measurement shared by the selection methods (ppl_filter, q_tuning,
  got_d): which share of the rows a run trained on are the injected noise rows of the bench pool.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from pydantic import Field

from ftray.methods.base import Context, Method, MethodConfig
from ftray.methods.registry import register

if TYPE_CHECKING:
    import ray.data

# The bench pool (bundled:arithmetic_noisy): clean arithmetic rows plus injected noise, marked in `source`.
BENCH_POOL = "bundled:arithmetic_noisy"
SCORE_COLUMNS = ("nll", "ppl", "entropy", "n_tokens", "token_nll", "token_entropy")


class PplFilterConfig(MethodConfig):
    """Keep ratio and scorer of the perplexity filter (POINTS defaults)."""

    keep_ratio: float = Field(0.2, gt=0, le=1, description="Fraction r of the rows kept: the ⌈r·N⌉ lowest-perplexity ones (POINTS: 0.2).")
    scope: Literal["response", "all"] = Field(
        "response", description="Tokens scored: the reply given the prompt (response) or every token of the rendered example (all).")
    scorer: str | None = Field(None, description="Frozen scoring model (HF id or path); default the run's model before training.")


def lowest(values: Sequence[float], k: int) -> list[bool]:
    """A mask of the k smallest values, ties broken by position (so exactly k are True)."""
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    keep = [False] * len(values)
    for i in order[:k]:
        keep[i] = True
    return keep


def select_rows(ds: ray.data.Dataset, keep: Sequence[bool], columns: dict[str, list] | None = None) -> ray.data.Dataset:
    """The rows of `ds` where `keep` is true (in order), with `columns` (one value per input row) added.

    The decision is global (made on the driver over score columns), so it is applied block by block in
    the dataset's order: `Dataset.zip` is deprecated in Ray 2.60 and a `join` needs a key the raw rows lack.
    """
    import pyarrow as pa
    import ray.data

    columns = columns or {}
    tables, start = [], 0
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        n = block.num_rows
        for name, values in columns.items():
            if name in block.column_names:
                block = block.drop_columns([name])
            block = block.append_column(name, pa.array(values[start:start + n]))
        tables.append(block.filter(pa.array(keep[start:start + n], type=pa.bool_())))
        start += n
    if start != len(keep):
        raise RuntimeError(f"select_rows: the dataset has {start} rows but the selection covers {len(keep)}")
    return ray.data.from_arrow([t for t in tables if t.num_rows] or tables[:1])


def short(row: dict, fields: Sequence[str] = ("question", "prompt", "text", "rationale", "completion"), n: int = 90) -> str:
    """The first text field of a row, cut to `n` characters (for report examples)."""
    for f in fields:
        if isinstance(row.get(f), str):
            return row[f][:n]
    return str(row)[:n]


@register
class PplFilter(Method):
    """Score every row's perplexity with a frozen model and keep the lowest ⌈keep_ratio·N⌉."""

    name = "ppl_filter"
    paper = "Liu et al. 2024, POINTS: Improving Your Vision-language Model with Affordable Strategies (2409.04828), §3 perplexity filtering"
    Config = PplFilterConfig
    # the noisy arithmetic pool (30% injected noise rows); the baseline is plain SFT on the whole pool
    bench = {"data": {"source": BENCH_POOL, "eval_source": "bundled:arithmetic"}}
    bench_metrics = ("ftray.methods.ppl_filter:selection_metrics",)
    tasks = ("causal_lm", "vision_language")

    def check(self, spec: Any) -> None:
        """A VLM's rows are scored on their replies (given image and prompt) only."""
        if spec.task.type == "vision_language" and self.config.scope != "response":
            raise ValueError("methods.ppl_filter.scope: task.type=vision_language scores the reply given the image; use scope: response")

    def prepare_data(self, ds: ray.data.Dataset, ctx: Context) -> ray.data.Dataset:
        """Score each row (Ray Data actors), keep the ⌈keep_ratio·N⌉ lowest-perplexity rows."""
        from ftray.data.inference import ResponseScorer, map_model

        c = self.config
        if ctx.spec.task.type == "vision_language":  # POINTS' own setting: the caption given the image, scored by the VLM
            from ftray.data.vlm_inference import VLMScorer

            scored = map_model(ds, VLMScorer, ctx, model=c.scorer).materialize()
        else:
            scored = map_model(ds, ResponseScorer, ctx, scope=c.scope, model=c.scorer).materialize()
        ppl = [r["ppl"] for r in scored.select_columns(["ppl"]).take_all()]
        k = math.ceil(c.keep_ratio * len(ppl))
        keep = lowest(ppl, k)
        drop = [x for x in scored.columns() if x in SCORE_COLUMNS and x != "ppl"]
        out = select_rows(scored.drop_columns(drop), keep)
        kept_ppl = sorted(p for p, m in zip(ppl, keep) if m)
        dropped_ppl = sorted(p for p, m in zip(ppl, keep) if not m)
        report: dict[str, Any] = {"rows_in": len(ppl), "rows_kept": k, "max_kept_ppl": round(kept_ppl[-1], 3) if kept_ppl else None,
                                  "min_dropped_ppl": round(dropped_ppl[0], 3) if dropped_ppl else None,
                                  "median_ppl": round(sorted(ppl)[len(ppl) // 2], 3) if ppl else None}
        if "source" in scored.columns():
            sources = [r["source"] for r in scored.select_columns(["source"]).take_all()]
            report["in_by_source"] = dict(sorted(Counter(sources).items()))
            report["kept_by_source"] = dict(sorted(Counter(s for s, m in zip(sources, keep) if m).items()))
        rows = scored.take(2000)  # examples only: the most and least predictable of the first rows
        by_ppl = sorted(range(len(rows)), key=lambda i: rows[i]["ppl"])
        report["examples"] = [{"ppl": round(rows[i]["ppl"], 2), "kept": keep[i], "text": short(rows[i])}
                              for i in by_ppl[:2] + by_ppl[-2:]]
        ctx.report.update(report)
        return out


def selection_metrics(final_dir: str, eval_n: int, out_dir: Path) -> dict[str, Any]:
    """Bench measurement: the rows a run trained on, and the share of them that are injected noise rows.

    A data method's run has its `data_report.json` (rows kept per `source`) next to `final`; a baseline
    trained on the whole pool, whose sources are counted from the data itself.
    """
    from ftray.config import load_spec
    from ftray.data import load_rows

    run_dir = Path(final_dir).parent
    report = run_dir / "data_report.json"
    by_source = None
    if report.exists():
        entries = [e for e in json.loads(report.read_text()).values() if isinstance(e, dict) and e.get("kept_by_source")]
        by_source = entries[-1]["kept_by_source"] if entries else None
    if by_source is None:
        spec = load_spec(str(Path(final_dir) / "ftray_spec.yaml"))
        d = spec.data
        rows = load_rows(d.source, d.split, d.max_samples)
        by_source = dict(Counter(rows["source"])) if "source" in rows.column_names else {}
    total = sum(by_source.values())
    noise = sum(v for k, v in by_source.items() if k.startswith("noise"))
    return {"pool_rows_trained_on": total, "noise_share": round(noise / total, 4) if total else None}
