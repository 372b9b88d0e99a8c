"""`ftray bench data-throughput`: scoring rows through ftray's Ray Data path vs a plain batched loop.

Both contenders run the same scorer, `ftray.data.inference.ResponseScorer` (tokenize with the run's task,
perplexity of every token, bf16 autocast where the CPU has it), on the same batches of `batch_size`
rows. The plain loop is one process (no Ray; `malloc_env` as for an actor) that builds one scorer with
all the threads the Ray actors get in total and calls it batch by batch; ftray's path is
`map_model(ds, ResponseScorer, ...)`, the code every data method uses, with the actor pool it picks by
itself (or `--actors/--threads`). Totals include start-up (model load; for Ray Data also actor start).
bf16 matmuls round differently with a different number of threads, so the identity check reruns the
first rows in the plain loop with one actor's thread count and compares bit for bit.

Start-up and per-row cost come from the scorers' own clocks: each stamps when its model is loaded and
when each batch is done (`TimedScorer`, ResponseScorer plus two columns). Start-up is the time until the
first scorer is ready; steady rows/s are the rows over the time from then to the last batch. (Stamps on
the driver cannot do this: Ray Data hands several actors' blocks back in bursts.) A second pass with 1
and then 2 one-thread actors reports how the same code scales out with actors (on a cluster: with nodes).

    ftray bench data-throughput --rows 2000
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from ftray.config import RunSpec, build_spec
from ftray.data import load_rows
from ftray.data.inference import ResponseScorer, malloc_env, map_model, pool_size
from ftray.methods import Context
from ftray.models import DEFAULT_MODEL, default_autocast_dtype


def bench_rows(n: int) -> list[dict]:
    """`n` prompt/completion rows long enough to fill any `tokens` ≤ ~300 (worked arithmetic solutions, rotated)."""
    src = load_rows("bundled:arithmetic", "train").to_list()
    rows = []
    for i in range(n):
        parts = [src[(i * 7 + j) % len(src)] for j in range(4)]
        rows.append({"prompt": "Continue.", "completion": " ".join(f"{p['rationale']} The answer is {p['answer']}." for p in parts)})
    return rows


class TimedScorer(ResponseScorer):
    """ResponseScorer that also stamps (wall clock) when it was ready and when each batch was done."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ready = time.time()

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Score one batch; adds `t_ready` and `t_done`."""
        out = super().__call__(batch)
        return out.append_column("t_ready", pa.array([self.ready] * out.num_rows)).append_column("t_done", pa.array([time.time()] * out.num_rows))


def plain_loop(spec: Any, table: pa.Table, threads: int) -> pa.Table:
    """The baseline: one plain process (no Ray; ftray's allocator settings for its thread count), one scorer, a loop over batches.

    Its clock starts after its imports (Ray Data's start-up includes its actors' imports, so this is the
    stricter comparison) and stops at its last batch (`t_start` / `t_end` columns)."""
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(table, f"{tmp}/in.parquet")
        (Path(tmp) / "spec.json").write_text(spec.model_dump_json())
        subprocess.run([sys.executable, "-m", "ftray.bench.data_throughput", tmp, str(threads)], check=True,
                       env={**os.environ, **malloc_env(threads)})
        return pq.read_table(f"{tmp}/out.parquet")


def _plain_process(tmp: str, threads: str) -> None:
    """`plain_loop`'s process: score tmp/in.parquet batch by batch into tmp/out.parquet."""
    t_start = time.time()
    spec = RunSpec.model_validate_json((Path(tmp) / "spec.json").read_text())
    table, bs = pq.read_table(f"{tmp}/in.parquet"), spec.data.infer_batch_size
    scorer = TimedScorer(spec.model_dump(mode="json"), threads=int(threads), scope="all")
    out = pa.concat_tables([scorer(table.slice(i, bs)) for i in range(0, table.num_rows, bs)])
    n = out.num_rows
    out = out.append_column("t_start", pa.array([t_start] * n)).append_column("t_end", pa.array([time.time()] * n))
    pq.write_table(out, f"{tmp}/out.parquet")


def ray_data(spec: Any, table: pa.Table) -> pa.Table:
    """ftray's path: the rows as a Ray Dataset, scored by ResponseScorer actors (as data methods do)."""
    import ray.data

    from ftray.data.prepare import blocks_of

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = ray.data.from_arrow(blocks_of(table, spec.data.infer_batch_size))
    out = map_model(ds, TimedScorer, Context(spec=spec, tokenizer=None), scope="all")
    return pa.concat_tables(list(out.iter_batches(batch_size=None, batch_format="pyarrow")))


def timed(name: str, run: Callable[[pa.Table], pa.Table], rows: list[dict], **info: Any) -> dict[str, Any]:
    """Run a contender on `rows`: total and rows/s from the driver's clock (or the contender's), start-up and steady rows/s from the scorers'."""
    t0 = time.time()
    out = run(pa.Table.from_pylist(rows))
    end = time.time()
    if "t_start" in out.column_names:  # the contender's own clock (the plain process, after its imports)
        t0, end = out.column("t_start")[0].as_py(), out.column("t_end")[0].as_py()
    total = end - t0
    ready, done = min(out.column("t_ready").to_pylist()), max(out.column("t_done").to_pylist())
    n = len(rows)
    return {"contender": name, **info, "total_s": round(total, 2), "rows_per_s": round(n / total, 2),
            "startup_s": round(ready - t0, 2), "ms_per_row": round(1000 * (done - ready) / n, 1),
            "steady_rows_per_s": round(n / (done - ready), 2) if done > ready else None, "nll": out.column("nll").to_pylist()}


def with_pool(spec: Any, actors: int | None, threads: int | None) -> Any:
    """A copy of `spec` whose inference pool is `actors` × `threads` (None: ftray's own choice)."""
    spec = spec.model_copy(deep=True)
    spec.data.actors, spec.data.actor_threads = actors, threads
    return spec


def main(rows: int = 2000, tokens: int = 128, batch_size: int = 16, out_dir: str = "bench_results", model: str = DEFAULT_MODEL,
         scaling_rows: int = 256, actors: int | None = None, threads: int | None = None, check_rows: int = 64) -> dict[str, Any]:
    """Run both contenders (and the 1 → 2 actor scaling pass), write data_throughput.{json,md}; returns the report."""
    import ray

    from ftray.train.trainer import ensure_ray

    ensure_ray()
    spec = build_spec({"model": {"name": model}, "data": {"max_len": tokens, "infer_batch_size": batch_size},
                       "output": {"dir": str(Path(out_dir) / "runs")}})
    spec.data.packing = False
    spec = with_pool(spec, actors, threads)
    n_actors, n_threads, _ = pool_size(spec)
    data = bench_rows(rows)
    fast = timed(f"Ray Data ({n_actors} actor{'s' * (n_actors > 1)} × {n_threads} thread{'s' * (n_threads > 1)})",
                 lambda t: ray_data(spec, t), data, actors=n_actors, threads=n_threads)
    plain = timed(f"plain loop ({n_actors * n_threads} threads)", lambda t: plain_loop(spec, t, n_actors * n_threads), data)
    diff = max(abs(a - b) for a, b in zip(plain["nll"], fast["nll"]))
    check = plain_loop(spec, pa.Table.from_pylist(data[:check_rows]), n_threads).column("nll").to_pylist()
    small = bench_rows(scaling_rows)
    scale = [timed(f"{a} actor(s)", lambda t, s=with_pool(spec, a, 1): ray_data(s, t), small, actors=a) for a in (1, 2)]
    strip = lambda c: {k: v for k, v in c.items() if k != "nll"}  # noqa: E731
    report = {
        "model": model, "rows": rows, "tokens_per_row": tokens, "batch_size": batch_size,
        "cpus": int(ray.cluster_resources().get("CPU", 0)), "bf16": default_autocast_dtype("cpu") is not None,
        "contenders": [strip(plain), strip(fast)],
        "ratio_total": round(fast["rows_per_s"] / plain["rows_per_s"], 3),
        "ratio_steady": round(fast["steady_rows_per_s"] / plain["steady_rows_per_s"], 3) if fast["steady_rows_per_s"] and plain["steady_rows_per_s"] else None,
        "identical_scores": check == fast["nll"][:check_rows], "check_rows": check_rows, "check_threads": n_threads,
        "max_abs_nll_diff": diff, "target": "Ray Data ≥ 0.95× plain rows/s at 2,000 rows, start-up included",
        "scaling": {"rows": scaling_rows, "runs": [strip(c) for c in scale],
                    "speedup_1_to_2_actors": round(scale[0]["ms_per_row"] / scale[1]["ms_per_row"], 3) if scale[1]["ms_per_row"] else None},
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
             "| contender | total s | rows/s (start-up included) | start-up s | ms per row | steady rows/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {c['contender']} | {c['total_s']} | {c['rows_per_s']} | {c['startup_s']} | {c['ms_per_row']} | {c['steady_rows_per_s']} |"
              for c in r["contenders"]]
    lines += ["", f"Ray Data / plain, start-up included: **{r['ratio_total']:.3f}×** (target ≥ 0.95×: {'PASS' if r['pass'] else 'FAIL'}); "
              f"steady state {r['ratio_steady']}×.", "",
              f"Scores identical bit for bit to the plain loop's with the actors' {r['check_threads']} thread(s) on the first "
              f"{r['check_rows']} rows: {r['identical_scores']}. Against the {r['contenders'][0]['contender']} (other bf16 rounding): "
              f"max |Δ nll| {r['max_abs_nll_diff']:.2e}.", "",
              "Start-up: until the first scorer has its model loaded; ms per row and steady rows/s: from then to the last batch "
              "(the scorers' own clocks).", "",
              f"Scaling out by actors ({r['scaling']['rows']} rows, one thread each):", "",
              "| actors | total s | start-up s | ms per row | steady rows/s |", "| ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {c['actors']} | {c['total_s']} | {c['startup_s']} | {c['ms_per_row']} | {c['steady_rows_per_s']} |" for c in r["scaling"]["runs"]]
    lines += ["", f"1 → 2 actors: {r['scaling']['speedup_1_to_2_actors']}× steady rows/s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    _plain_process(*sys.argv[1:])
