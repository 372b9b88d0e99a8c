"""The `ftray` command line: train, eval, methods, data, bench."""

from __future__ import annotations

import json
import time
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune language models with published methods on Ray.")
data_app = typer.Typer(no_args_is_help=True, help="Bundled datasets.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks with ratios against baselines measured in the same run.")
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")

SET_HELP = "Override a field: --set train.lr=1e-4 --set methods.0.r=16 (repeatable)."


def _fail(message: str) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def train(
    recipe: str = typer.Argument("quickstart", help="Recipe YAML path, or a packaged recipe name."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    eval_: bool = typer.Option(True, "--eval/--no-eval", help="Exact match on the eval split before and after training."),
) -> None:
    """Train a recipe on Ray Train (local Ray, or the cluster in RAY_ADDRESS)."""
    from ftray.config import SpecError, load_spec

    try:
        spec = load_spec(recipe, set_)  # fails here, before any Ray work, on a bad recipe
    except SpecError as err:
        _fail(str(err))
    from ftray.data import DataError
    from ftray.models import ModelLoadError
    from ftray.train.trainer import run

    t0 = time.perf_counter()
    try:
        result = run(spec, recipe, evaluate=eval_)
    except (DataError, ModelLoadError, ValueError) as err:
        _fail(f"error: {err}")
    keys = ("exact_match_before", "exact_match_after", "perplexity_before", "perplexity_after", "loss", "eval_loss")
    summary = {"run_dir": str(result.run_dir), "final": str(result.final_dir), "wall_s": round(time.perf_counter() - t0, 1),
               **{k: result.metrics[k] for k in keys if k in result.metrics}}
    (result.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    typer.echo(json.dumps(summary, indent=2))


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="Checkpoint dir (adapter or full), model path or alias."),
    source: str = typer.Option("bundled:arithmetic", help="Eval data source."),
    split: str = typer.Option("test"),
    max_samples: Optional[int] = typer.Option(200),
    max_new_tokens: int = typer.Option(96),
) -> None:
    """Exact match (greedy generation) and perplexity on a dataset split."""
    from ftray.eval import evaluate_on_ray
    from ftray.train.trainer import ensure_ray

    ensure_ray()
    result = evaluate_on_ray(model, source=source, split=split, max_samples=max_samples, max_new_tokens=max_new_tokens)
    typer.echo(json.dumps(result, indent=2))


@app.command()
def methods(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List every method with its paper, hooks and defaults."""
    from ftray.methods import REGISTRY

    rows = []
    for name, cls in sorted(REGISTRY.items()):
        fields = {f: {"default": info.default, "description": info.description} for f, info in cls.Config.model_fields.items()}
        rows.append({"name": name, "paper": cls.paper, "hooks": cls.hooks(), "config": fields})
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    for row in rows:
        typer.secho(row["name"], bold=True)
        typer.echo(f"  paper: {row['paper']}\n  hooks: {', '.join(row['hooks']) or '-'}")
        for f, info in row["config"].items():
            typer.echo(f"  {f} = {info['default']!r}: {info['description']}")


@data_app.command("build")
def data_build(out_dir: Optional[str] = typer.Option(None, help="Write here instead of the package's bundled/ dir.")) -> None:
    """Regenerate the bundled datasets (seeded: identical files every time)."""
    from ftray.data.bundled.generate import build_all

    for name, path in build_all(out_dir).items():
        typer.echo(f"{name}: {path}")


@bench_app.command("methods")
def bench_methods(
    methods: str = typer.Option("full,lora,hft,masked_thought", help="Comma-separated registry names; plain SFT is always included."),
    steps: int = typer.Option(40, help="Optimizer steps per method (same for all)."),
    out: str = typer.Option("bench_results", help="Directory for JSON, markdown and PNG."),
    model: str = typer.Option("smollm2-135m"),
    eval_n: int = typer.Option(50, help="Eval rows per task."),
    workers: int = typer.Option(2, help="Ray Train workers per run."),
) -> None:
    """Each method against plain SFT on the same data, steps and seed: accuracy, forgetting, params, memory, time."""
    from ftray.bench.methods import main

    main([m.strip() for m in methods.split(",") if m.strip()], steps=steps, out_dir=out, model=model, eval_n=eval_n, workers=workers)


@bench_app.command("train-throughput")
def bench_train_throughput(
    steps: int = typer.Option(20, help="Timed optimizer steps per contender."),
    out: str = typer.Option("bench_results", help="Directory for JSON and markdown."),
    model: str = typer.Option("smollm2-135m"),
    batch_size: int = typer.Option(8),
    packing: bool = typer.Option(True, "--packing/--no-packing", help="Also time ftray with packing."),
) -> None:
    """ftray's loop (1 and N workers) vs a plain PyTorch+PEFT loop vs transformers.Trainer."""
    from ftray.bench.throughput import main

    main(steps=steps, out_dir=out, model=model, batch_size=batch_size, packing=packing)


if __name__ == "__main__":
    app()
