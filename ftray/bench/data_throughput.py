"""`ftray bench data-throughput`: scoring rows through ftray's Ray Data path vs a plain batched loop.

Both contenders compute the same thing with the same function (`ftray.data.inference.score_rows`):
the perplexity of N rows of `tokens` tokens each under the model, in batches of `batch_size`, bf16
autocast where the CPU has it. The plain loop runs in this process on all the threads the Ray
actors get in total; ftray's path is `map_model(ds, ResponseScorer, ...)`, the code every data
method uses, with the actor pool it picks by itself (or `--actors/--threads`). Timings include
start-up (model load, tokenization; for Ray Data also actor start) and are also split into start-up
(time to the first scored batch less one batch's cost) and steady-state rows/s. The scores of the two
paths are compared row by row. A second Ray Data pass with 1 and then 2 one-thread actors reports how
the same code scales out with actors (on a cluster: with nodes).

    ftray bench data-throughput --rows 2000
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ftray.config import build_spec
from ftray.data import load_rows
from ftray.data.inference import ResponseScorer, map_model, score_rows
from ftray.methods import Context
from ftray.models import DEFAULT_MODEL, default_autocast_dtype, load_model, load_tokenizer


def bench_rows(n: int) -> list[dict]:
    """`n` prompt/completion rows long enough to fill any `tokens` ≤ ~300 (worked arithmetic solutions, rotated)."""
    src = load_rows("bundled:arithmetic", "train").to_list()
    rows = []
    for i in range(n):
        parts = [src[(i * 7 + j) % len(src)] for j in range(4)]
        rows.append({"prompt": "Continue.", "completion": " ".join(f"{p['rationale']} The answer is {p['answer']}." for p in parts)})
    return rows


def rate(seconds_per_row: float) -> float | None:
    """Rows per second, or None when too few batches arrived apart to time (a tiny run)."""
    return round(1 / seconds_per_row, 2) if seconds_per_row > 0 else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is unknown."""
    return round(a / b, 3) if a and b else None


def plain_loop(spec: Any, rows: list[dict], threads: int) -> dict[str, Any]:
    """The baseline: one process, one model, a Python loop over batches."""
    from ftray.tasks import get_task

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        model, tok = load_model(spec.model.name).eval(), load_tokenizer(spec.model.name)
        import datasets

        tokenized = [{**r, "labels": r["input_ids"]} for r in get_task(spec).tokenize(datasets.Dataset.from_list(rows), tok, "bench")]
        amp, bs = default_autocast_dtype("cpu"), spec.data.infer_batch_size
        startup = time.perf_counter() - t0
        nll, times = [], []
        for i in range(0, len(tokenized), bs):
            nll += score_rows(model, tokenized[i:i + bs], tok.pad_token_id, amp)["nll"]
            times.append(time.perf_counter())
        total = time.perf_counter() - t0
    finally:
        torch.set_num_threads(prev)
    steady = (times[-1] - times[0]) / max(1, len(times) - 1) / bs  # s per row after the first batch
    return {"contender": f"plain loop ({threads} threads)", "total_s": round(total, 2), "rows_per_s": round(len(rows) / total, 2),
            "startup_s": round(startup, 2), "steady_rows_per_s": rate(steady), "nll": nll,
            "tokens": [len(r["input_ids"]) for r in tokenized]}


def ray_data(spec: Any, rows: list[dict], actors: int | None = None, threads: int | None = None) -> dict[str, Any]:
    """ftray's path: the rows as a Ray Dataset, scored by ResponseScorer actors (as data methods do)."""
    import pyarrow as pa
    import ray.data

    from ftray.data.inference import pool_size
    from ftray.data.prepare import blocks_of

    spec = spec.model_copy(deep=True)
    spec.data.actors, spec.data.actor_threads = actors, threads
    n_actors, n_threads, _ = pool_size(spec)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    t0 = time.perf_counter()
    ds = ray.data.from_arrow(blocks_of(pa.Table.from_pylist(rows), spec.data.infer_batch_size * 4))
    out = map_model(ds, ResponseScorer, Context(spec=spec, tokenizer=None), scope="all")
    nll, stamps = [], []
    for batch in out.iter_batches(batch_size=None, batch_format="pyarrow"):
        nll += batch.column("nll").to_pylist()
        stamps.append((time.perf_counter(), batch.num_rows))
    total = time.perf_counter() - t0
    later = sum(n for _, n in stamps[1:])
    steady = (stamps[-1][0] - stamps[0][0]) / max(1, later)
    first = stamps[0][0] - t0
    return {"contender": f"Ray Data ({n_actors} actor{'s' * (n_actors > 1)} × {n_threads} thread{'s' * (n_threads > 1)})",
            "actors": n_actors, "threads": n_threads, "total_s": round(total, 2), "rows_per_s": round(len(rows) / total, 2),
            "startup_s": round(max(0.0, first - steady * stamps[0][1]), 2), "steady_rows_per_s": rate(steady), "nll": nll}


def main(rows: int = 2000, tokens: int = 128, batch_size: int = 16, out_dir: str = "bench_results", model: str = DEFAULT_MODEL,
         scaling_rows: int = 256) -> dict[str, Any]:
    """Run both contenders (and the 1 → 2 actor scaling pass), write data_throughput.{json,md}; returns the report."""
    from ftray.train.trainer import ensure_ray

    ensure_ray()
    spec = build_spec({"model": {"name": model}, "data": {"max_len": tokens, "infer_batch_size": batch_size},
                       "output": {"dir": str(Path(out_dir) / "runs")}})
    spec.data.packing = False
    data = bench_rows(rows)
    fast = ray_data(spec, data)
    plain = plain_loop(spec, data, threads=fast["actors"] * fast["threads"])
    diff = max(abs(a - b) for a, b in zip(plain["nll"], fast["nll"]))
    small = bench_rows(scaling_rows)
    scale = [ray_data(spec, small, actors=a, threads=1) for a in (1, 2)]
    report = {
        "model": model, "rows": rows, "tokens_per_row": sorted(set(plain.pop("tokens"))), "batch_size": batch_size,
        "cpus": int(__import__("ray").cluster_resources().get("CPU", 0)), "bf16": default_autocast_dtype("cpu") is not None,
        "contenders": [{k: v for k, v in c.items() if k != "nll"} for c in (plain, fast)],
        "ratio_total": round(plain["total_s"] / fast["total_s"], 3), "ratio_steady": ratio(fast["steady_rows_per_s"], plain["steady_rows_per_s"]),
        "identical_scores": diff == 0.0, "max_abs_nll_diff": diff, "target": "Ray Data ≥ 0.95× plain rows/s at 2,000 rows, start-up included",
        "scaling": {"rows": scaling_rows, "runs": [{k: v for k, v in c.items() if k != "nll"} for c in scale],
                    "speedup_1_to_2_actors": ratio(scale[1]["steady_rows_per_s"], scale[0]["steady_rows_per_s"])},
    }
    report["pass"] = report["ratio_total"] >= 0.95
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_throughput.json").write_text(json.dumps(report, indent=2))
    (out / "data_throughput.md").write_text(markdown(report))
    print(markdown(report))
    return report


def markdown(r: dict[str, Any]) -> str:
    """The report as a markdown table plus the verdict."""
    lines = [f"# ftray bench data-throughput — {r['model']}, {r['rows']} rows × {r['tokens_per_row']} tokens, batch {r['batch_size']}, "
             f"{r['cpus']} CPUs, bf16 autocast {'on' if r['bf16'] else 'off'}", "",
             "| contender | total s | rows/s (start-up included) | start-up s | steady rows/s |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {c['contender']} | {c['total_s']} | {c['rows_per_s']} | {c['startup_s']} | {c['steady_rows_per_s']} |" for c in r["contenders"]]
    lines += ["", f"Ray Data / plain, start-up included: **{r['ratio_total']:.3f}×** (target ≥ 0.95×: {'PASS' if r['pass'] else 'FAIL'}); "
              f"steady state {r['ratio_steady']}×. Scores identical: {r['identical_scores']} (max |Δ nll| {r['max_abs_nll_diff']:.2e}).", "",
              f"Scaling out by actors ({r['scaling']['rows']} rows, one thread each):", "",
              "| actors | total s | start-up s | steady rows/s |", "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {c['actors']} | {c['total_s']} | {c['startup_s']} | {c['steady_rows_per_s']} |" for c in r["scaling"]["runs"]]
    lines += ["", f"1 → 2 actors: {r['scaling']['speedup_1_to_2_actors']}× steady rows/s."]
    return "\n".join(lines) + "\n"
