"""`ftray bench methods`: every method against plain SFT on the same data, steps and seed.

Each method trains through the real Ray Train path (`ftray.train.trainer.run`) on the bundled
arithmetic task; the result is scored on the arithmetic test split (target: exact match, perplexity)
and on the bundled factual QA (forgetting probe: the method never trained on it, so a drop against
the untuned model is knowledge lost). Writes `methods.json`, `methods.md` and `methods.png`.

    ftray bench methods --methods full,lora,hft,masked_thought --steps 40
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ftray.config import build_spec
from ftray.eval import evaluate_on_ray
from ftray.methods import REGISTRY
from ftray.models import DEFAULT_MODEL
from ftray.train.trainer import ensure_ray, run

BASELINE = "full"  # plain SFT; a method whose class says `baseline = "lora"` is compared with plain LoRA


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """`a` with `b` merged in, recursively for nested dicts."""
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def bench_spec(name: str, model: str, steps: int, out: Path, eval_n: int, workers: int) -> dict[str, Any]:
    """The run spec that benchmarks `name`: the shared data/budget/seed plus the method class's `bench` overrides."""
    shared = {
        "model": {"name": model},
        "data": {"source": "bundled:arithmetic", "max_len": 256, "eval_max_samples": eval_n},
        "methods": [{"name": name}],
        "train": {"max_steps": steps, "batch_size": 4, "lr": 5e-5, "log_every": 10, "seed": 0},
        "scaling": {"num_workers": workers},
        "output": {"dir": str(out / "runs"), "name": name},
    }
    return deep_merge(shared, REGISTRY[name].bench)


def run_one(name: str, model: str, steps: int, out: Path, eval_n: int, workers: int) -> dict[str, Any]:
    """Train one method and score it; returns its row of the table (cached in `out/rows/<name>.json`)."""
    raw = bench_spec(name, model, steps, out, eval_n, workers)
    cache = out / "rows" / f"{name}.json"
    if cache.exists() and (row := json.loads(cache.read_text())).get("spec") == raw:
        return row  # same method, budget, data and seed: reuse the measured row
    spec = build_spec(raw)
    t0 = time.perf_counter()
    result = run(spec)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    trainable = next(r for r in rows if r.get("event") == "phase")
    peak = max(r.get("peak_rss_mb", 0) for r in rows)
    row = {
        "method": name, "baseline": REGISTRY[name].baseline if name != BASELINE else "–", "train_wall_s": round(wall, 1),
        "trainable": trainable["trainable"], "total": trainable["total"], "peak_rss_mb_rank0": round(peak),
        **score(str(result.final_dir), eval_n), "spec": raw,
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(row, indent=2))
    return row


def score(model_ref: str, eval_n: int) -> dict[str, float]:
    """Target exact match/perplexity on arithmetic, forgetting probe on factual QA."""
    target = evaluate_on_ray(model_ref, source="bundled:arithmetic", split="test", max_samples=eval_n)
    probe = evaluate_on_ray(model_ref, source="bundled:factual_qa", split="test", max_samples=eval_n, max_new_tokens=24)
    return {"arith_em": target["exact_match"], "arith_ppl": round(target["perplexity"], 4),
            "qa_em": probe["exact_match"], "qa_ppl": round(probe["perplexity"], 4)}


def markdown(report: dict[str, Any]) -> str:
    """The table: each method with its deltas against its baseline (plain SFT or plain LoRA)."""
    by_name = {r["method"]: r for r in report["rows"]}
    lines = [
        f"# ftray bench methods — {report['model']}, {report['steps']} steps × {report['examples_per_step']} examples, seed 0",
        "",
        f"Untuned model: arithmetic EM {report['untuned']['arith_em']:.2f}, factual-QA EM {report['untuned']['qa_em']:.2f} "
        f"(the forgetting probe's reference).",
        "",
        "| method | baseline | arith EM | Δ vs baseline | arith ppl | factual-QA EM (forgetting probe) | Δ vs baseline | QA ppl | trainable | peak RSS MB (rank 0) | train wall s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["rows"]:
        base = by_name.get(REGISTRY[r["method"]].baseline) if r["method"] != BASELINE else None
        d_em = f"{r['arith_em'] - base['arith_em']:+.2f}" if base else "–"
        d_qa = f"{r['qa_em'] - base['qa_em']:+.2f}" if base else "–"
        lines.append(
            f"| {r['method']} | {r['baseline'] if base else '–'} | {r['arith_em']:.2f} | {d_em} | {r['arith_ppl']:.3f} | {r['qa_em']:.2f} | {d_qa} | {r['qa_ppl']:.3f} "
            f"| {r['trainable']:,} ({r['trainable'] / r['total']:.1%}) | {r['peak_rss_mb_rank0']} | {r['train_wall_s']} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Bar chart of target and probe exact match per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in report["rows"]]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.5))
    ax.bar([x - 0.2 for x in xs], [r["arith_em"] for r in report["rows"]], 0.4, label="arithmetic EM (target)")
    ax.bar([x + 0.2 for x in xs], [r["qa_em"] for r in report["rows"]], 0.4, label="factual-QA EM (forgetting probe)")
    ax.axhline(report["untuned"]["qa_em"], ls="--", c="gray", lw=1, label="untuned factual-QA EM")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("exact match")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(methods: list[str], steps: int = 40, out_dir: str = "bench_results", model: str = DEFAULT_MODEL,
         eval_n: int = 50, workers: int = 2) -> dict[str, Any]:
    """Benchmark `methods` (plain SFT is added first), write JSON + markdown + PNG; returns the report."""
    ensure_ray()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    baselines = [BASELINE] + sorted({REGISTRY[m].baseline for m in methods} - {BASELINE})
    names = baselines + [m for m in methods if m not in baselines]
    untuned_cache = out / "rows" / "_untuned.json"
    key = {"model": model, "eval_n": eval_n}
    if untuned_cache.exists() and (cached := json.loads(untuned_cache.read_text())).get("key") == key:
        untuned = cached["score"]
    else:
        untuned = score(model, eval_n)
        untuned_cache.parent.mkdir(parents=True, exist_ok=True)
        untuned_cache.write_text(json.dumps({"key": key, "score": untuned}))
    report = {"model": model, "steps": steps, "examples_per_step": 4 * workers, "eval_n": eval_n,
              "untuned": untuned, "rows": []}
    for name in names:
        report["rows"].append(run_one(name, model, steps, out, eval_n, workers))
        (out / "methods.json").write_text(json.dumps(report, indent=2))  # keep partial results
    (out / "methods.md").write_text(markdown(report))
    plot(report, out / "methods.png")
    print(markdown(report))
    return report
