"""mixture — multi-task data mixtures: the "cocktail" of Brief et al. (Mixing It Up: The Cocktail Effect of
Multi-Task Fine-Tuning on LLM Performance, 2410.01109), plus explicit and temperature-scaled weights.

To do well on a target task, fine-tune on a mix of related tasks (and general or math add-ons) rather than the
target alone. The tasks are the run's `data.sources` (each row tagged by the trainer's `source` column) or the
values of any tag column. Three ways to size the mixture, all drawn with the run's seed (train.seed):
- cocktail (the paper, spec (b)2): ∪_{k∈S} sample(D_k, round(w_k·|D_k|)), then a global shuffle. With the
  default w_k = 1 the mixture is the concatenation of the full datasets (natural proportions). A `target` with
  `related_ratio` r scales the other tasks together to r rows per target row ("the target task mixed with
  related tasks at a ratio"; the spec's add-on default "about the total domain size" is r = 1).
- weights: probabilities p_k ∝ w_k for a mixture of `num_rows` rows.
- temperature: p_k ∝ min(n_k, K)^(1/T) (T5's examples-proportional mixing with a size cap K, and its
  temperature scaling: T = 1 natural proportions, T → ∞ uniform).

Decisions where the spec is silent or marked inferred (tested in tests/methods/test_mixture.py):
- Counts: `draw: quota` rounds N·p_k by largest remainder, so every task gets its share within one row (the
  spec's sanity check); `draw: multinomial` picks each output row's task independently (T5's example-level
  sampling), so a task's count is Binomial(N, p_k): within ±2σ of N·p_k. The cocktail's counts are exact.
- The spec writes ⌈w·n⌉ in its algorithm and round(w·n) in its sanity check; this rounds half up.
- Within a task, c ≤ n rows are drawn without replacement; c > n repeats every row ⌊c/n⌋ times and draws
  the rest without replacement, so no row is seen k+1 times before every row has been seen k times.
- Sources of different formats are converted to chat messages by the trainer before it concatenates them
  (`training_source_rows`), because the concatenation happens before any prepare_data: with a cot and a
  prompt_completion source, the mixture (and its plain-SFT baseline) trains on `messages` rows.
- The paper's incremental study (a grid over task subsets × add-ons) is one run per `tasks` value: a Ray Tune
  sweep prepares the rows once for all trials, so it cannot vary a data method's fields.
- Task names in `tasks`, `rates`, `weights` and `target` may be a source as written in data.sources, its
  short name ('arithmetic' for 'bundled:arithmetic', the file stem for a path) or a tag value.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from ftray.data.errors import DataError
from ftray.data.selection import preview, take_rows
from ftray.methods.base import Context, Method, MethodConfig, stable_seed
from ftray.methods.registry import register

if TYPE_CHECKING:
    import ray.data

    from ftray.config import RunSpec


class MixtureConfig(MethodConfig):
    mode: Literal["cocktail", "weights", "temperature"] = Field(
        "cocktail", description="How task sizes are set: 'cocktail' = a fraction `rates` of each task's rows (the paper), "
        "'weights' = explicit mixing weights, 'temperature' = p ∝ n^(1/T)."
    )
    by: str = Field("source", description="Column naming each row's task: 'source' is set by data.sources; "
                    "a tag column of one source (e.g. factual_qa's 'category') works too.")
    tasks: list[str] | None = Field(None, description="S, the tasks in the mixture (a data.sources entry, its short name "
                                    "or a tag value); null = every task. Tasks left out get no rows.")
    rates: dict[str, float] = Field(default_factory=dict, description="cocktail: w_k, the fraction of task k's rows used "
                                    "(1 = all, 0.5 = half, 2 = every row twice); tasks not named use 1.")
    target: str | None = Field(None, description="cocktail: the target task; with related_ratio the other tasks are "
                               "scaled together around it.")
    related_ratio: float | None = Field(None, ge=0, description="cocktail: rows of the other tasks per target row, "
                                        "split among them in proportion to their sizes; null = their own sizes.")
    weights: dict[str, float] = Field(default_factory=dict, description="weights mode: a mixing weight per task (normalised "
                                      "to probabilities); every task in the mixture needs one.")
    temperature: float = Field(2.0, gt=0, description="temperature mode: T in p_k ∝ n_k^(1/T); 1 = natural proportions, "
                               "larger flattens toward uniform (2: the mildest of the T5 paper's 2, 4, 8).")
    size_cap: int | None = Field(None, ge=1, description="temperature mode: T5's K; a task larger than K counts as K rows in p_k.")
    num_rows: int | None = Field(None, ge=1, description="weights/temperature: rows in the mixture; null = the tasks' total.")
    draw: Literal["quota", "multinomial"] = Field(
        "quota", description="weights/temperature: 'quota' gives each task round(N·p_k) rows (largest remainder); "
        "'multinomial' draws every row's task independently (counts ~ Multinomial(N, p))."
    )
    shuffle: bool = Field(True, description="Shuffle the mixture with train.seed so every batch mixes tasks (the paper's "
                          "global shuffle); false keeps the tasks in blocks.")


def short_name(task: str) -> str:
    """'arithmetic' for 'bundled:arithmetic', the file stem for a path, the last part of a hub id."""
    return Path(task.removeprefix("bundled:")).stem


def resolve(key: str, names: list[str], field: str) -> str:
    """The task in `names` that `key` names (exactly, else by its short name); a DataError lists them otherwise."""
    if key in names:
        return key
    found = [n for n in names if short_name(n) == key]
    if len(found) != 1:
        why = "names several tasks" if found else "names no task"
        raise DataError(f"mixture.{field}: {key!r} {why}; the tasks are {', '.join(names)}")
    return found[0]


def round_half_up(x: float) -> int:
    """round(x) with halves going up (Python's round sends 2.5 to 2)."""
    return int(math.floor(x + 0.5))


def quota(total: int, shares: np.ndarray) -> np.ndarray:
    """`total` split by `shares` (any non-negative weights) into integers within one of total·p, summing to total."""
    p = shares / shares.sum()
    raw = total * p
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")  # largest remainders first; ties by task order
    counts[order[: total - counts.sum()]] += 1
    return counts


def task_counts(sizes: dict[str, int], cfg: MixtureConfig, rng: np.random.Generator) -> tuple[dict[str, int], dict[str, float] | None]:
    """Rows per task in the mixture (0 for tasks left out), and the mixing probabilities when the mode has them."""
    names = list(sizes)
    chosen = [resolve(t, names, "tasks") for t in cfg.tasks] if cfg.tasks is not None else names
    chosen = [n for n in names if n in chosen]  # in data order
    if not chosen:
        raise DataError("mixture.tasks: no task left in the mixture")
    counts = dict.fromkeys(names, 0)
    n = np.array([sizes[k] for k in chosen], dtype=np.float64)
    if cfg.mode == "cocktail":
        rates = {resolve(k, names, "rates"): w for k, w in cfg.rates.items()}
        counts |= {k: round_half_up(rates.get(k, 1.0) * sizes[k]) for k in chosen}
        if cfg.target is not None and cfg.related_ratio is not None:
            target = resolve(cfg.target, names, "target")
            if target not in chosen:
                raise DataError(f"mixture.target: {cfg.target!r} is not among the mixture's tasks {chosen}")
            others = [k for k in chosen if k != target]
            if others:
                base = np.array([counts[k] or sizes[k] for k in others], dtype=np.float64)
                split = quota(round_half_up(cfg.related_ratio * counts[target]), base) if base.sum() else np.zeros(len(others), int)
                counts |= dict(zip(others, split.tolist()))
        return counts, None
    if cfg.mode == "weights":
        weights = {resolve(k, names, "weights"): w for k, w in cfg.weights.items()}
        missing = [k for k in chosen if k not in weights]
        if missing:
            raise DataError(f"mixture.weights: no weight for {', '.join(missing)}; give every task in the mixture one")
        shares = np.array([weights[k] for k in chosen], dtype=np.float64)
    else:
        cap = np.minimum(n, cfg.size_cap) if cfg.size_cap else n
        shares = cap ** (1.0 / cfg.temperature)
    if shares.sum() <= 0:
        raise DataError("mixture: every task's weight is 0")
    p = shares / shares.sum()
    total = cfg.num_rows or int(n.sum())
    drawn = quota(total, p) if cfg.draw == "quota" else rng.multinomial(total, p)
    counts |= dict(zip(chosen, drawn.tolist()))
    return counts, dict(zip(chosen, p.round(6).tolist()))


def draw_rows(positions: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` of `positions`: whole passes over them, then the rest drawn without replacement."""
    if count and not len(positions):
        raise DataError("mixture: a task with no rows cannot give any")
    passes, rest = divmod(count, len(positions)) if len(positions) else (0, 0)
    return np.concatenate([np.tile(positions, passes), rng.choice(positions, rest, replace=False)]).astype(np.int64)


@register
class Mixture(Method):
    """Mix several tasks' rows by rate (the cocktail), explicit weight or temperature, shuffled with the run's seed."""

    name = "mixture"
    paper = "Brief et al., Mixing It Up: The Cocktail Effect of Multi-Task Fine-Tuning on LLM Performance (2410.01109)"
    Config = MixtureConfig
    # the bench mixes the bundled CoT arithmetic with the factual QA (prompt/completion: both become chat rows),
    # T = 2 (arithmetic 2000 → 2/3 of the rows, factual QA 500 → 1/3); the baseline is plain SFT on the concatenation
    bench = {"data": {"sources": ["bundled:arithmetic", "bundled:factual_qa"]},
             "methods": [{"name": "mixture", "mode": "temperature", "temperature": 2.0}]}

    def check(self, spec: RunSpec) -> None:
        cfg = self.config
        if (cfg.target is None) != (cfg.related_ratio is None):
            raise ValueError("target and related_ratio go together: the other tasks are scaled around the target")
        if (cfg.target is not None or cfg.rates) and cfg.mode != "cocktail":
            raise ValueError(f"rates, target and related_ratio are cocktail fields; mode is {cfg.mode!r}")
        if cfg.mode == "weights" and not cfg.weights:
            raise ValueError("mode 'weights' needs weights: {task: weight, ...}")
        if any(w < 0 for w in [*cfg.rates.values(), *cfg.weights.values()]):
            raise ValueError("rates and weights must be non-negative")
        if cfg.by == "source" and spec.data.sources:  # names are known before loading: report typos now
            keys = [*(cfg.tasks or []), *cfg.rates, *cfg.weights, *([cfg.target] if cfg.target else [])]
            try:
                for key in keys:
                    resolve(key, list(spec.data.sources), "tasks/rates/weights/target")
            except DataError as e:
                raise ValueError(str(e)) from None

    def prepare_data(self, ds: ray.data.Dataset, ctx: Context) -> ray.data.Dataset:
        cfg = self.config
        ds = ds.materialize()  # the positions below index this order
        if cfg.by in ds.columns():
            tags = [str(r[cfg.by]) for r in ds.select_columns([cfg.by]).take_all()]
        elif cfg.by == "source":  # one source: the mixture is a re-sampling of it
            tags = [ctx.spec.data.source] * ds.count()
        else:
            raise DataError(f"mixture.by: the training rows have no column {cfg.by!r}; columns: {', '.join(ds.columns())}")
        groups: dict[str, list[int]] = {}
        for i, tag in enumerate(tags):
            groups.setdefault(tag, []).append(i)
        rng = np.random.default_rng(stable_seed("mixture", ctx.spec.train.seed))
        counts, probs = task_counts({k: len(v) for k, v in groups.items()}, cfg, rng)
        picks = np.concatenate([draw_rows(np.array(groups[k], dtype=np.int64), counts[k], rng) for k in groups])
        if cfg.shuffle:
            picks = rng.permutation(picks)
        out = take_rows(ds, picks)
        total = int(sum(counts.values()))
        ctx.report.update({
            "mode": cfg.mode, "by": cfg.by, "task_rows_in": {k: len(v) for k, v in groups.items()},
            "task_rows_out": counts,
            "share_out": {k: round(c / max(total, 1), 4) for k, c in counts.items()},
            **({"probabilities": probs} if probs else {}),
            "examples": [f"[{short_name(str(r.get(cfg.by, ctx.spec.data.source)))}] {preview(r)}" for r in out.take(5)],
        })
        return out
