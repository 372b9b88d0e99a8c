"""`ftray bench methods`: every method against its baseline on the same data, task, steps and seed.

Each method trains through the real Ray Train path (`ftray.train.trainer.run`). By default on the
bundled arithmetic task, scored on the arithmetic test split (target: exact match, perplexity) and
on the bundled factual QA (forgetting probe: the method never trained on it, so a drop against the
untuned model is knowledge lost). A method's `bench` overrides may move it to another task or data
(e.g. classification on the long-tailed set); its baseline is then the same run spec with the
method taken out (plain CE / plain InfoNCE / plain LoRA), so the pair differs only in the method.
Classification rows are scored with the task's metrics on the clean test split, retrieval rows with
ranking metrics over the bundled corpus. Every row also records the cost of a step: seconds per
step and forward passes per micro-batch. Writes `methods.json`, `methods.md` and `methods.png`.

    ftray bench methods --methods full,lora,hft,masked_thought --steps 40
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from pathlib import Path
from typing import Any, Callable

from ftray.config import build_spec
from ftray.eval import evaluate_on_ray
from ftray.methods import REGISTRY
from ftray.models import DEFAULT_MODEL, TINY_VLM
from ftray.train.trainer import ensure_ray, run

BASELINE = "full"  # plain SFT; a method whose class says `baseline = "lora"` is compared with plain LoRA


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """`a` with `b` merged in, recursively for nested dicts."""
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def is_vision(name: str) -> bool:
    """Whether method `name` is benchmarked on the vision_language task."""
    return REGISTRY[name].bench.get("task", {}).get("type") == "vision_language"


def bench_spec(name: str, model: str, steps: int, out: Path, eval_n: int, workers: int, vlm_model: str = TINY_VLM) -> dict[str, Any]:
    """The run spec that benchmarks `name`: the shared data/budget/seed plus the method class's `bench` overrides
    (a vision-language method runs on `vlm_model`)."""
    if is_vision(name):
        model = vlm_model
    shared = {
        "model": {"name": model},
        "data": {"source": "bundled:arithmetic", "max_len": 256, "eval_max_samples": eval_n},
        "methods": [{"name": name}],
        "train": {"max_steps": steps, "batch_size": 4, "lr": 5e-5, "log_every": 10, "seed": 0},
        "scaling": {"num_workers": workers},
        "output": {"dir": str(out / "runs"), "name": name},
    }
    return deep_merge(shared, REGISTRY[name].bench)


def baseline_spec(name: str, raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` with method `name` taken out (its baseline method put in if nothing is left; or the method's own
    `bench_baseline` methods), named by content."""
    methods = REGISTRY[name].bench_baseline or [m for m in raw["methods"] if (m if isinstance(m, str) else m["name"]) != name] \
        or [{"name": REGISTRY[name].baseline}]
    base = {**raw, "methods": methods}
    label = methods[0] if isinstance(methods[0], str) else methods[0]["name"]
    digest = hashlib.blake2b(json.dumps({k: v for k, v in base.items() if k != "output"}, sort_keys=True).encode(), digest_size=3).hexdigest()
    return deep_merge(base, {"output": {"name": f"{label}@{digest}"}})


def median(values: list[float]) -> float | None:
    """The middle value (a typical step, not a one-off first step such as NoiseFiT's layer selection)."""
    return sorted(values)[len(values) // 2] if values else None


def without_output(raw: dict[str, Any]) -> dict[str, Any]:
    """A bench spec without its output section (the run's name and place), for comparing what is trained."""
    return json.loads(json.dumps({k: v for k, v in raw.items() if k != "output"}, sort_keys=True))


def run_one(name: str, model: str, steps: int, out: Path, eval_n: int, workers: int, raw: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one method and score it; returns its row of the table (cached in `out/rows/<run name>.json`)."""
    raw = raw or bench_spec(name, model, steps, out, eval_n, workers)
    cache = out / "rows" / f"{raw['output']['name']}.json"
    if cache.exists() and (row := json.loads(cache.read_text())).get("spec") == raw:
        return row  # same method, budget, data and seed: reuse the measured row
    spec = build_spec(raw)
    t0 = time.perf_counter()
    result = run(spec)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    trainable = next(r for r in rows if r.get("event") == "phase")
    peak = max(r.get("peak_rss_mb", 0) for r in rows)
    # One record per step, the last one: a resumed run appends the steps it redoes to the same metrics.jsonl.
    steps_logged = sorted({r["step"]: r for r in rows if "loss" in r and "time" in r}.values(), key=lambda r: r["step"])
    gaps = [b["time"] - a["time"] for a, b in zip(steps_logged, steps_logged[1:])]
    row = {
        "method": name, "run": raw["output"]["name"], "task": spec.task.type, "data": spec.data.source,
        "baseline": REGISTRY[name].baseline if name != BASELINE else "–", "train_wall_s": round(wall, 1),
        "trainable": trainable["trainable"], "total": trainable["total"], "peak_rss_mb_rank0": round(peak),
        "s_per_step": round(median(gaps), 3) if gaps else None,
        "train_tokens": sum(r.get("tokens", 0) for r in steps_logged) * spec.scaling.num_workers,  # real (unpadded) tokens seen
        "forwards_per_batch": median([r["forwards_per_batch"] for r in steps_logged if "forwards_per_batch" in r]),
        **score(str(result.final_dir), eval_n, spec.task.type), "spec": raw,
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(row, indent=2))
    return row


TASK_METRICS = {
    "classification": ("accuracy", "macro_f1", "worst_class_accuracy", "tail_accuracy", "ece"),
    "retrieval": ("ndcg@10", "mrr@10", "recall@1", "recall@10"),
    "vision_language": ("exact_match",),
}


def score(model_ref: str, eval_n: int, task: str = "causal_lm") -> dict[str, float]:
    """Causal LM: target exact match/perplexity on arithmetic, forgetting probe on factual QA.
    Classification / retrieval: the task's metrics on the run's own (clean) test split."""
    if task != "causal_lm":
        result = evaluate_on_ray(model_ref, max_samples=eval_n * 4)  # cheap forward-only metrics: more rows
        return {k: round(result[k], 4) if isinstance(result[k], float) else result[k] for k in TASK_METRICS[task]}
    target = evaluate_on_ray(model_ref, source="bundled:arithmetic", split="test", max_samples=eval_n)
    probe = evaluate_on_ray(model_ref, source="bundled:factual_qa", split="test", max_samples=eval_n, max_new_tokens=24)
    return {"arith_em": target["exact_match"], "arith_ppl": round(target["perplexity"], 4),
            "qa_em": probe["exact_match"], "qa_ppl": round(probe["perplexity"], 4)}


# LfU's "spread over rephrased prompts": the same test problems under three wordings of the request.
REPHRASINGS = ("{q}", "Solve this word problem: {q}", "{q}\nWork it out step by step, then give the final number.")


def prompt_spread(model_ref: str, eval_n: int, out: Path) -> dict[str, float]:
    """Arithmetic exact match under each rephrasing, and its spread (max − min) and standard deviation."""
    import statistics

    from ftray.data import load_rows

    rows = load_rows("bundled:arithmetic", "test", eval_n).to_list()
    ems = []
    for i, template in enumerate(REPHRASINGS):
        path = out / "rephrased" / f"arithmetic_{i}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({**r, "question": template.format(q=r["question"])}) + "\n" for r in rows))
        ems.append(evaluate_on_ray(model_ref, source=str(path), split="test", max_samples=eval_n)["exact_match"])
    return {"arith_em_rephrased": ems, "arith_em_spread": max(ems) - min(ems), "arith_em_std": statistics.pstdev(ems)}


def metric_function(name: str) -> Callable[[str, int, Path], dict[str, Any]]:
    """A method's extra bench measurement: "prompt_spread" or a "package.module:function" path; the function
    takes (final checkpoint dir, eval_n, bench out dir) and returns the row's extra columns."""
    if name == "prompt_spread":
        return prompt_spread
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def add_metric(row: dict[str, Any], metric: str, eval_n: int, out: Path) -> dict[str, Any]:
    """`row` with `metric` measured on its final checkpoint (once; stored in its cached row file)."""
    done = row.setdefault("extra_metrics", {})
    if metric not in done:
        values = metric_function(metric)(str(out / "runs" / row.get("run", row["method"]) / "final"), eval_n, out)
        row.update(values)
        done[metric] = sorted(values)
        (out / "rows" / f"{row.get('run', row['method'])}.json").write_text(json.dumps(row, indent=2))
    return row


def markdown(report: dict[str, Any]) -> str:
    """The table: each method with its deltas against its baseline (plain SFT or plain LoRA)."""
    by_name = {r.get("run", r["method"]): r for r in report["rows"]}
    title = (f"{report['model']}, {report['steps']} steps × {report['examples_per_step']} examples" if report.get("untuned")
             else f"vision-language rows on {report.get('vlm_model')}, steps as in each row")
    lines = [
        f"# ftray bench methods — {title}, seed 0",
        "",
        (f"Untuned model: arithmetic EM {report['untuned']['arith_em']:.2f}, factual-QA EM {report['untuned']['qa_em']:.2f} "
         f"(the forgetting probe's reference)." if report.get("untuned") else "No text method in this run."),
        "",
    ]
    if report.get("untuned"):
        lines += ["| method | baseline | arith EM | Δ vs baseline | arith ppl | factual-QA EM (forgetting probe) | Δ vs baseline | QA ppl | trainable | peak RSS MB (rank 0) | train wall s |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in (r for r in report["rows"] if r.get("task", "causal_lm") == "causal_lm"):
        base = by_name.get(r.get("baseline_run") or REGISTRY[r["method"]].baseline) if r["method"] != BASELINE else None
        d_em = f"{r['arith_em'] - base['arith_em']:+.2f}" if base else "–"
        d_qa = f"{r['qa_em'] - base['qa_em']:+.2f}" if base else "–"
        lines.append(
            f"| {r.get('run', r['method'])} | {r.get('baseline_run') or r['baseline'] if base else '–'} | {r['arith_em']:.2f} | {d_em} | {r['arith_ppl']:.3f} | {r['qa_em']:.2f} | {d_qa} | {r['qa_ppl']:.3f} "
            f"| {r['trainable']:,} ({r['trainable'] / r['total']:.1%}) | {r['peak_rss_mb_rank0']} | {r['train_wall_s']} |"
        )
    spread = [r for r in report["rows"] if "arith_em_spread" in r]
    if spread:
        lines += ["", "Arithmetic EM under three rephrasings of the request (LfU's robustness metric):", "",
                  "| method | EM per rephrasing | spread (max − min) | std |", "| --- | --- | ---: | ---: |"]
        lines += [f"| {r['method']} | {', '.join(f'{e:.2f}' for e in r['arith_em_rephrased'])} | {r['arith_em_spread']:.2f} "
                  f"| {r['arith_em_std']:.3f} |" for r in spread]
    lines += extra_lines(report, by_name)
    lines += cost_lines(report, by_name)
    for task, keys in TASK_METRICS.items():
        rows = [r for r in report["rows"] if r.get("task") == task]
        if not rows:
            continue
        model = f" on {report.get('vlm_model')}" if task == "vision_language" else ""
        lines += ["", f"## {task}{model}: each method against the same run without it (Δ in brackets)", "",
                  f"| method | data | baseline run | steps | {' | '.join(keys)} | s/step (× baseline) | forwards / micro-batch |",
                  "| --- | --- | --- | ---: | " + "---: | " * (len(keys) + 2)]
        for r in rows:
            base = by_name.get(r.get("baseline_run") or "")
            cells = [f"{r[k]:.3f}" + (f" ({r[k] - base[k]:+.3f})" if base and r[k] is not None and base[k] is not None else "")
                     if r[k] is not None else "–" for k in keys]
            ratio = f" ({r['s_per_step'] / base['s_per_step']:.2f}×)" if base and r.get("s_per_step") and base.get("s_per_step") else ""
            steps = (r.get("spec") or {}).get("train", {}).get("max_steps", "–")
            lines.append(f"| {r.get('run', r['method'])} | {r['data']} | {r.get('baseline_run') or '–'} | {steps} | {' | '.join(cells)} "
                         f"| {r.get('s_per_step')}{ratio} | {r.get('forwards_per_batch')} |")
    return "\n".join(lines) + "\n"


def extra_lines(report: dict[str, Any], by_name: dict[str, Any]) -> list[str]:
    """One table per extra measurement (a method's `bench_metrics`): the method's value, then its baseline's."""
    lines: list[str] = []
    baselines = {r.get("baseline_run") for r in report["rows"]}
    for r in report["rows"]:
        if r.get("run") in baselines:  # a baseline's numbers appear in its method's table
            continue
        base = by_name.get(r.get("baseline_run") or "") or by_name.get(REGISTRY[r["method"]].baseline)
        for metric, keys in (r.get("extra_metrics") or {}).items():
            if metric == "prompt_spread" or not isinstance(r.get("extra_metrics"), dict) or r["method"] == BASELINE:
                continue
            scalar = [k for k in keys if isinstance(r.get(k), (int, float))]
            lines += ["", f"{r.get('run', r['method'])}: {metric} (method / baseline {r.get('baseline_run') or r['baseline']})", "",
                      "| " + " | ".join(scalar) + " |", "|" + " ---: |" * len(scalar),
                      "| " + " | ".join(f"{r[k]:.3f} / {base[k]:.3f}" if base and isinstance(base.get(k), (int, float)) else f"{r[k]:.3f}"
                                        for k in scalar) + " |"]
    return lines


def cost_lines(report: dict[str, Any], by_name: dict[str, Any]) -> list[str]:
    """Seconds per step and forward passes per micro-batch of the causal-LM rows that recorded them."""
    rows = [r for r in report["rows"] if r.get("task", "causal_lm") == "causal_lm" and r.get("s_per_step")]
    if not rows:
        return []
    lines = ["", "Cost of training (causal LM rows that recorded it; train tokens = real, unpadded input tokens over all workers;",
             "arith EM per 100k train tokens is the accuracy-per-compute figure for data selection and pruning):", "",
             "| method | baseline run | s/step | × baseline | forwards / micro-batch | train tokens | × baseline | arith EM / 100k tokens |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        base = by_name.get(r.get("baseline_run") or "")
        ratio = f"{r['s_per_step'] / base['s_per_step']:.2f}×" if base and base.get("s_per_step") else "–"
        tokens = r.get("train_tokens")
        t_ratio = f"{tokens / base['train_tokens']:.2f}×" if tokens and base and base.get("train_tokens") else "–"
        per = f"{r['arith_em'] / tokens * 1e5:.3f}" if tokens else "–"
        lines.append(f"| {r.get('run', r['method'])} | {r.get('baseline_run') or '–'} | {r['s_per_step']} | {ratio} "
                     f"| {r.get('forwards_per_batch')} | {tokens or '–'} | {t_ratio} | {per} |")
    return lines


def plot(report: dict[str, Any], path: Path) -> None:
    """Bar chart of target and probe exact match per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r.get("task", "causal_lm") == "causal_lm"]
    if not rows:
        return
    report = {**report, "rows": rows}
    names = [r["method"] for r in rows]
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
         eval_n: int = 50, workers: int = 2, vlm_model: str = TINY_VLM) -> dict[str, Any]:
    """Benchmark `methods` (plain SFT is added first), write JSON + markdown + PNG; returns the report."""
    ensure_ray()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the text baselines and the untuned text model only when a text method is benchmarked (VLM rows bring their own)
    text = any(not is_vision(m) for m in methods)
    baselines = [BASELINE] * text + sorted({REGISTRY[m].baseline for m in methods if not is_vision(m)} - {BASELINE})
    names = baselines + [m for m in methods if m not in baselines]
    untuned_cache = out / "rows" / "_untuned.json"
    key = {"model": model, "eval_n": eval_n}
    if not text:
        untuned = {}
    elif untuned_cache.exists() and (cached := json.loads(untuned_cache.read_text())).get("key") == key:
        untuned = cached["score"]
    else:
        untuned = score(model, eval_n)
        untuned_cache.parent.mkdir(parents=True, exist_ok=True)
        untuned_cache.write_text(json.dumps({"key": key, "score": untuned}))
    report = {"model": model, "vlm_model": vlm_model, "steps": steps, "examples_per_step": 4 * workers, "eval_n": eval_n,
              "untuned": untuned, "rows": []}
    for name in names:
        raw = bench_spec(name, model, steps, out, eval_n, workers, vlm_model)
        base_run = None
        if name not in baselines:  # the same spec without the method; the default baseline row when they agree
            base_raw, label = baseline_spec(name, raw), REGISTRY[name].baseline
            same = without_output(base_raw) == without_output(bench_spec(label, model, steps, out, eval_n, workers, vlm_model))
            base_run = label if same else base_raw["output"]["name"]
            if not same and base_run not in [r.get("run") for r in report["rows"]]:
                report["rows"].append(run_one(base_run.split("@")[0], model, steps, out, eval_n, workers, base_raw))
        row = {**run_one(name, model, steps, out, eval_n, workers, raw), "baseline_run": base_run}
        for metric in REGISTRY[name].bench_metrics:  # for the method and the baseline it is compared with
            add_metric(row, metric, eval_n, out)
            add_metric(next(r for r in report["rows"] if r.get("run", r["method"]) == base_run), metric, eval_n, out)
        report["rows"].append(row)
        (out / "methods.json").write_text(json.dumps(report, indent=2))  # keep partial results
    (out / "methods.md").write_text(markdown(report))
    plot(report, out / "methods.png")
    print(markdown(report))
    return report
