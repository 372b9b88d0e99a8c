"""The whole `ftray tune` command: sweep → results table, plot, best config → optional soup.

    from ftray.tune.run import tune_recipe
    tune_recipe("quickstart", "tune_spaces/lora.yaml", num_samples=4, soup="greedy")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ray

from ftray.config import RunSpec, build_spec
from ftray.methods import build_methods
from ftray.train.loop import make_plan
from ftray.tune.heldout import display
from ftray.tune.report import TrialRow, best_config, fmt, plot, table, trial_rows, write_csv, write_markdown
from ftray.tune.space import overrides_of
from ftray.tune.sweep import SweepPlan, plan_sweep, run_sweep


def tune_recipe(recipe: str | None, space_file: str, overrides: list[str] = (), num_samples: int | None = None,
                soup: str | None = None, soup_score: str = "loss", resume: bool = False) -> dict[str, Any]:
    """Run (or resume) a sweep, write its reports and, with `soup`, a soup of the trials' best checkpoints."""
    if soup not in (None, "uniform", "greedy"):
        raise ValueError(f"--soup {soup!r}: use 'uniform' or 'greedy'")
    plan = plan_sweep(recipe, space_file, list(overrides), num_samples)
    grid, max_steps, n_train = run_sweep(plan, resume)
    base = plan.spec.model_dump(mode="json")
    methods = build_methods(plan.spec.methods)

    def planned(config: dict[str, Any]) -> int:
        spec = build_spec(base, overrides_of(config))
        return make_plan(spec, n_train, spec.scaling.num_workers, methods).max_steps

    rows = trial_rows(grid, plan.space.metric, plan.space.mode, planned)
    out = report_dir(plan)
    soup_result = soup_after_sweep(soup, rows, plan.spec, out / f"soup_{soup}", soup_score) if soup else None
    write_reports(plan, rows, out, soup_result)
    return {"experiment": plan.experiment_dir, "reports": str(out), "trials": len(rows),
            "best": {"trial": rows[0].trial, plan.space.metric: rows[0].best, "checkpoint": rows[0].checkpoint} if rows else None,
            "soup": soup_summary(soup_result) if soup_result else None}


def report_dir(plan: SweepPlan) -> Path:
    """Where the reports go: the experiment dir when local, else ./<sweep name> (they are small files)."""
    out = Path(plan.experiment_dir) if "://" not in plan.experiment_dir else Path(plan.name)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_reports(plan: SweepPlan, rows: list[TrialRow], out: Path, soup: dict[str, Any] | None) -> None:
    """results.csv, results.md, metric.png, best_config.yaml (and soup.json) in `out`."""
    metric, s = plan.space.metric, plan.space.scheduler
    write_csv(rows, out / "results.csv")
    asha = f" (grace {s.grace_period} steps, reduction ×{s.reduction_factor})" if s.type == "asha" else ""
    heading = (f"# Sweep {plan.name}\n\nspace `{plan.space_file}`, {len(rows)} trials, {metric} ({plan.space.mode}), "
               f"scheduler {s.type}{asha}, evaluated every {plan.spec.train.eval_every} steps.")
    extra = ""
    if soup:
        (out / "soup.json").write_text(json.dumps(soup, indent=2))
        extra = "\n" + soup_markdown(soup)
    write_markdown(rows, out / "results.md", metric, heading, extra)
    plot(rows, out / "metric.png", metric)
    config = best_config(rows, plan.spec.model_dump(mode="json"))
    if config:
        (out / "best_config.yaml").write_text(config)


def soup_after_sweep(kind: str, rows: list[TrialRow], spec: RunSpec, out: Path, score: str) -> dict[str, Any] | None:
    """Soup the trials' best checkpoints in a Ray task (on the cluster, beside the checkpoints)."""
    checkpoints = [r.checkpoint for r in rows if r.checkpoint]
    if not checkpoints:
        print("[ftray] no trial left a checkpoint: no soup")
        return None
    # One task runs on one node: size it by the largest live node, not the cluster's total.
    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)
    cpus = max(1, min(4, int(largest)))
    task = ray.remote(num_cpus=cpus)(make_soup)
    return ray.get(task.remote(kind, checkpoints, str(out), spec.model_dump(mode="json"), score, cpus))


def make_soup(kind: str, checkpoints: list[str], out: str, spec_dict: dict, score: str, threads: int) -> dict[str, Any]:
    """Ray task body: load the held-out split of the spec's eval data, soup, compare with the singles."""
    import torch

    from ftray.tune.heldout import held_out_for
    from ftray.tune.soups import soup_vs_singles

    torch.set_num_threads(threads)
    spec = RunSpec.model_validate(spec_dict)
    d = spec.data
    held_out = held_out_for(checkpoints[0], d.eval_source or d.source, d.eval_split, d.eval_max_samples, score, d.max_len)
    return soup_vs_singles(kind, checkpoints, out, held_out)


def soup_markdown(s: dict[str, Any]) -> str:
    """The soup section of results.md: soup vs best single vs mean single on both held-out halves."""
    name = "held-out loss (lower is better)" if s["metric"] == "loss" else "exact match"
    row = lambda label, v: [label, display(s["metric"], v["select"]), display(s["metric"], v["report"])]  # noqa: E731
    lines = [row(f"{s['kind']} soup ({len(s['accepted'])} of {s['ingredients']} ingredients)", s["soup"]),
             row(f"best single ({Path(s['best_single']['checkpoint']).parent.name})", s["best_single"]),
             row("mean single", s["mean_single"])]
    body = table(["model", f"select: {s['select_on']}", f"report: {s['report_on']}"], lines)
    return (f"## Soup vs single trials\n\nScore: {name}. The soup's ingredients are chosen on the select half; "
            f"the report half is used by nothing else.\n\n{body}\n\nSoup: `{s['path']}`\n")


def soup_summary(s: dict[str, Any]) -> dict[str, Any]:
    """The soup comparison in a few numbers, for the command's JSON output."""
    return {"path": s["path"], "accepted": len(s["accepted"]), "of": s["ingredients"], "metric": s["metric"],
            **{k: {h: fmt(display(s["metric"], v[h])) for h in ("select", "report")} for k, v in
               (("soup", s["soup"]), ("best_single", s["best_single"]), ("mean_single", s["mean_single"]))}}
