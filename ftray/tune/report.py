"""What a sweep leaves in its experiment dir: results.csv, results.md, metric.png, best_config.yaml.

One row per trial: its sampled config, how many steps it ran (fewer than planned: ASHA stopped it),
its last and best metric, and its best checkpoint (Train keeps the best by the metric, see
`build_trainer(keep_best=...)`); plus when it started and ended, which shows the trials' concurrency.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ftray.config import build_spec, dump_spec
from ftray.tune.space import overrides_of


@dataclass
class TrialRow:
    """One trial of a finished (or interrupted) sweep."""

    trial: str
    config: dict[str, Any]
    status: str  # completed | stopped early | error: ...
    steps: int  # last step that reported the metric
    planned_steps: int
    final: float | None  # metric at the last evaluation
    best: float | None
    best_step: int | None
    checkpoint: str | None  # the best checkpoint (by the metric)
    start: float | None  # wall-clock seconds (time.time()) of the trial's start and last result
    end: float | None
    history: list[tuple[int, float]]  # (step, metric) of every evaluation


def trial_rows(grid: Any, metric: str, mode: str, planned_steps: Any) -> list[TrialRow]:
    """A TrialRow per Tune result, best first; `planned_steps(config)` gives a trial's step count."""
    rows = [trial_row(result, metric, mode, planned_steps(result.config)) for result in grid]
    sign = 1 if mode == "min" else -1
    return sorted(rows, key=lambda r: (r.best is None, sign * r.best if r.best is not None else 0))


def trial_row(result: Any, metric: str, mode: str, planned: int) -> TrialRow:
    """One trial's evaluations, best one and its checkpoint, status and wall-clock span."""
    df = result.metrics_dataframe
    evals = df[df[metric].notna()] if df is not None and metric in df else None
    history = [] if evals is None else [(int(s), float(v)) for s, v in zip(evals["step"], evals[metric])]
    pick = min if mode == "min" else max
    best = pick(history, key=lambda h: h[1]) if history else (None, None)
    ckpt = None
    if evals is not None and "checkpoint_path" in evals:  # Train kept the best-scored checkpoint
        ranked = evals[evals["checkpoint_path"].notna()].sort_values(metric, ascending=mode == "min")
        ckpt = str(ranked["checkpoint_path"].iloc[0]) if len(ranked) else None
    steps = history[-1][0] if history else 0
    status = "completed" if steps >= planned else "stopped early"
    if result.error:
        status = f"error: {str(result.error).splitlines()[0]}"
    last = df.iloc[-1] if df is not None and len(df) else None  # Tune's time_total_s counts from the trial's start
    return TrialRow(
        trial=Path(result.path).name.removeprefix("trial_"), config=dict(result.config), status=status, steps=steps,
        planned_steps=planned, final=history[-1][1] if history else None, best=best[1], best_step=best[0],
        checkpoint=ckpt, start=float(last["timestamp"] - last["time_total_s"]) if last is not None else None,
        end=float(last["timestamp"]) if last is not None else None, history=history,
    )


def write_csv(rows: list[TrialRow], path: Path) -> None:
    """results.csv: one line per trial, config keys as columns."""
    keys = sorted({k for r in rows for k in r.config})
    fields = ["trial", *keys, "status", "steps", "planned_steps", "final", "best", "best_step", "checkpoint", "start", "end"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            d = {k: v for k, v in asdict(r).items() if k in fields}
            w.writerow({**d, **{k: r.config.get(k) for k in keys}})


def fmt(v: Any) -> str:
    """A table cell: short floats, '-' for missing."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(header: list[str], lines: list[list[Any]]) -> str:
    """A markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(fmt(c) for c in line) + " |" for line in lines])


def timeline(rows: list[TrialRow]) -> str:
    """Each trial's start and end in seconds since the first trial started."""
    t0 = min((r.start for r in rows if r.start is not None), default=0.0)
    started = sorted((r for r in rows if r.start is not None), key=lambda r: r.start)
    lines = [[r.trial, r.start - t0, r.end - t0, r.end - r.start, r.status] for r in started]
    return table(["trial", "start s", "end s", "duration s", "status"], lines)


def write_markdown(rows: list[TrialRow], path: Path, metric: str, heading: str, extra: str = "") -> None:
    """results.md: the trials table (best first), the timeline, then `extra` (e.g. the soup comparison)."""
    keys = sorted({k for r in rows for k in r.config})
    lines = [[r.trial, *(r.config.get(k) for k in keys), r.status, f"{r.steps}/{r.planned_steps}", r.final, r.best, r.best_step,
              r.checkpoint] for r in rows]
    body = table(["trial", *keys, "status", "steps", f"final {metric}", f"best {metric}", "best step", "best checkpoint"], lines)
    path.write_text(f"{heading}\n\n## Trials (best first)\n\n{body}\n\n## Timeline\n\n{timeline(rows)}\n{extra}")


def plot(rows: list[TrialRow], path: Path, metric: str) -> bool:
    """metric.png: the metric of every trial over training steps; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[ftray] matplotlib is not installed: no metric.png (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r.history:
            steps, values = zip(*r.history)
            label = f"{r.trial} " + " ".join(f"{k.split('.')[-1]}={fmt(v)}" for k, v in r.config.items())
            ax.plot(steps, values, marker="o", markersize=3, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def best_config(rows: list[TrialRow], base: dict[str, Any]) -> str | None:
    """The resolved run spec of the best trial, as YAML (the base spec plus its sampled values)."""
    best = next((r for r in rows if r.best is not None), None)
    return dump_spec(build_spec(base, overrides_of(best.config))) if best else None
