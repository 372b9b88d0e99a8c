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
from ftray.models import DEFAULT_MODEL
from ftray.train.trainer import ensure_ray, run

BASELINE = "full"  # plain SFT: every method is compared with it on the same budget


def method_entries(name: str) -> list[dict[str, Any]]:
    """The `methods:` list that benchmarks `name` (a method alone: its defaults, on full fine-tuning where it needs weights)."""
    return [{"name": name}]


def run_one(name: str, model: str, steps: int, out: Path, eval_n: int, workers: int) -> dict[str, Any]:
    """Train one method and score it; returns its row of the table."""
    spec = build_spec({
        "model": {"name": model},
        "data": {"source": "bundled:arithmetic", "max_len": 256, "eval_max_samples": eval_n},
        "methods": method_entries(name),
        "train": {"max_steps": steps, "batch_size": 4, "lr": 1e-3 if name == "lora" else 5e-5, "log_every": 10},
        "scaling": {"num_workers": workers},
        "output": {"dir": str(out / "runs"), "name": name},
    })
    t0 = time.perf_counter()
    result = run(spec)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    trainable = next(r for r in rows if r.get("event") == "phase")
    peak = max(r.get("peak_rss_mb", 0) for r in rows)
    return {
        "method": name, "train_wall_s": round(wall, 1), "trainable": trainable["trainable"], "total": trainable["total"],
        "peak_rss_mb_rank0": round(peak), **score(str(result.final_dir), eval_n),
    }


def score(model_ref: str, eval_n: int) -> dict[str, float]:
    """Target exact match/perplexity on arithmetic, forgetting probe on factual QA."""
    target = evaluate_on_ray(model_ref, source="bundled:arithmetic", split="test", max_samples=eval_n)
    probe = evaluate_on_ray(model_ref, source="bundled:factual_qa", split="test", max_samples=eval_n, max_new_tokens=24)
    return {"arith_em": target["exact_match"], "arith_ppl": round(target["perplexity"], 4),
            "qa_em": probe["exact_match"], "qa_ppl": round(probe["perplexity"], 4)}


def markdown(report: dict[str, Any]) -> str:
    """The table: each method with its deltas against plain SFT."""
    base = next((r for r in report["rows"] if r["method"] == BASELINE), None)
    lines = [
        f"# ftray bench methods — {report['model']}, {report['steps']} steps × {report['examples_per_step']} examples, seed 0",
        "",
        f"Untuned model: arithmetic EM {report['untuned']['arith_em']:.2f}, factual-QA EM {report['untuned']['qa_em']:.2f} "
        f"(the forgetting probe's reference).",
        "",
        "| method | arith EM | Δ vs SFT | arith ppl | factual-QA EM (forgetting probe) | Δ vs SFT | QA ppl | trainable | peak RSS MB (rank 0) | train wall s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["rows"]:
        d_em = f"{r['arith_em'] - base['arith_em']:+.2f}" if base else "–"
        d_qa = f"{r['qa_em'] - base['qa_em']:+.2f}" if base else "–"
        lines.append(
            f"| {r['method']} | {r['arith_em']:.2f} | {d_em} | {r['arith_ppl']:.3f} | {r['qa_em']:.2f} | {d_qa} | {r['qa_ppl']:.3f} "
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
    names = [BASELINE] + [m for m in methods if m != BASELINE]
    report = {"model": model, "steps": steps, "examples_per_step": 4 * workers, "eval_n": eval_n,
              "untuned": score(model, eval_n), "rows": []}
    for name in names:
        report["rows"].append(run_one(name, model, steps, out, eval_n, workers))
        (out / "methods.json").write_text(json.dumps(report, indent=2))  # keep partial results
    (out / "methods.md").write_text(markdown(report))
    plot(report, out / "methods.png")
    print(markdown(report))
    return report
