"""The `ftray` command line: train, boost, tune, soup, merge, eval, methods, data, bench, analyze."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune language models with published methods on Ray.")
data_app = typer.Typer(no_args_is_help=True, help="Bundled datasets.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks with ratios against baselines measured in the same run.")
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")
analyze_app = typer.Typer(no_args_is_help=True, help="What fine-tuning changed in a model: attributions, FFN concepts.")
app.add_typer(analyze_app, name="analyze")

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
               **{k: v for k, v in result.metrics.items() if k in keys or (k.endswith("_after") and isinstance(v, float))}}
    if "://" not in str(spec.output.dir):  # remote storage: the summary is printed, checkpoints are there
        (result.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def boost(
    recipe: str = typer.Argument("llmboost", help="Recipe YAML path, or a packaged recipe name, listing method llmboost."),
    members: Optional[int] = typer.Option(None, "--members", min=1, help="Members in the chain (default: the recipe's llmboost.members)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Train an LLMBoost chain: one Ray Train run per member; rerun to resume at the first unfinished stage."""
    from ftray.config import SpecError, load_spec

    try:
        spec = load_spec(recipe, set_)
    except SpecError as err:
        _fail(str(err))
    from ftray.boost import run_chain
    from ftray.data import DataError
    from ftray.models import ModelLoadError

    try:
        manifest = run_chain(spec, members, recipe)
    except (DataError, ModelLoadError, ValueError) as err:
        _fail(f"error: {err}")
    typer.echo(json.dumps({k: manifest[k] for k in ("chain", "finished_stages", "layers", "stages")}, indent=2, default=str))


@app.command("tune")
def tune_cmd(
    recipe: str = typer.Argument("quickstart", help="Recipe YAML path, or a packaged recipe name."),
    space: str = typer.Option(..., "--space", help="Tune space YAML, e.g. tune_spaces/lora.yaml."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", min=1, help="Trials (default: the space's num_samples)."),
    soup: Optional[str] = typer.Option(None, "--soup", help="After the sweep, soup the trials' best checkpoints: uniform | greedy."),
    soup_score: str = typer.Option("loss", "--soup-score", help="Held-out score for the soup: loss (fast) | exact_match."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted sweep of the same name (Tuner.restore)."),
) -> None:
    """Sweep a recipe with Ray Tune (ASHA), then write results.csv/md, metric.png and best_config.yaml."""
    from ftray.config import SpecError
    from ftray.data import DataError
    from ftray.models import ModelLoadError
    from ftray.tune.run import tune_recipe

    if soup not in (None, "uniform", "greedy") or soup_score not in ("loss", "exact_match"):
        _fail("--soup takes uniform | greedy; --soup-score takes loss | exact_match")
    try:
        summary = tune_recipe(recipe, space, set_, num_samples, soup, soup_score, resume)
    except SpecError as err:
        _fail(str(err))
    except (DataError, ModelLoadError, ValueError) as err:
        _fail(f"error: {err}")
    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command()
def soup(
    checkpoints: list[str] = typer.Argument(..., help="Checkpoint dirs fine-tuned from one base (adapters are merged into it)."),
    out: str = typer.Option(..., "--out", help="Output checkpoint dir (written atomically)."),
    greedy: bool = typer.Option(False, "--greedy", help="Greedy soup on held-out data instead of the uniform average."),
    source: str = typer.Option("bundled:arithmetic", help="Greedy: held-out data source."),
    split: str = typer.Option("test", help="Greedy: held-out split (keep it apart from the split you report on)."),
    max_samples: Optional[int] = typer.Option(200, help="Greedy: held-out rows."),
    score: str = typer.Option("loss", help="Greedy: loss (−held-out loss, fast) | exact_match (generation)."),
    max_len: int = typer.Option(512, help="Greedy: tokens per held-out example."),
) -> None:
    """Model soup (uniform, or greedy on held-out data) of checkpoints that share a base model."""
    from ftray.merge import MergeError
    from ftray.models import ModelLoadError
    from ftray.tune.heldout import held_out_for
    from ftray.tune.soups import greedy_soup, uniform_soup

    try:
        if greedy:
            held_out = held_out_for(checkpoints[0], source, split, max_samples, score, max_len)
            result = greedy_soup(checkpoints, held_out, out)
        else:
            result = uniform_soup(checkpoints, out)
    except (MergeError, ModelLoadError, ValueError, OSError) as err:
        _fail(f"error: {err}")
    typer.echo(json.dumps({"out": str(result.path), "kind": result.kind, "ingredients": result.ingredients,
                           "scores": result.scores, "soup_score": result.score}, indent=2))


@app.command()
def merge(
    method: str = typer.Argument(..., help="task-arithmetic | lines | sparse-diff | depth-upscale (any registered merge method)."),
    base: Optional[str] = typer.Argument(None, help="The base model the checkpoints were fine-tuned from (dir or alias); "
                                         "for depth-upscale, the one model to make deeper."),
    checkpoints: Optional[list[str]] = typer.Argument(None, help="Fine-tuned checkpoint dirs (adapters are merged into the base); "
                                                      "sparse-diff also takes sparse_diff.safetensors files."),
    out: str = typer.Option(..., "--out", help="Output checkpoint dir (written atomically)."),
    scale: Optional[float] = typer.Option(None, help="task-arithmetic: λ on the summed task vectors (default 1)."),
    alpha: Optional[float] = typer.Option(None, help="lines: scale of the first block and non-block weights (default 1/T, or 0.1 for one checkpoint)."),
    beta: Optional[float] = typer.Option(None, help="lines: added scale at the last block (default 1−α for one checkpoint, else 0.5)."),
    threshold: Optional[float] = typer.Option(None, help="sparse-diff: for a full checkpoint without an exported φ, drop |θ−θ⁰| ≤ this (default 1e-7)."),
    depth_upscale: bool = typer.Option(False, "--depth-upscale", help="Same as the method depth-upscale: `ftray merge --depth-upscale MODEL --out DIR`."),
    block: Optional[str] = typer.Option(None, help="depth-upscale: the layers s,e to duplicate (0-based, e exclusive; default: chosen by cosine)."),
    n_layers: Optional[int] = typer.Option(None, help="depth-upscale: layers to duplicate when choosing by cosine (default half)."),
    zero_copies: bool = typer.Option(False, "--zero-copies", help="depth-upscale: zero the copies' o_proj/down_proj (output equals the original's)."),
    calibration_rows: Optional[int] = typer.Option(None, help="depth-upscale: calibration rows for the cosine criterion (default 32)."),
) -> None:
    """Merge task vectors (checkpoint − base): task arithmetic, LiNeS layer scaling, LT-SFT sparse-diff composition;
    or make one model deeper (depth-upscale: `ftray merge depth-upscale MODEL --out DIR [--block s,e | --n-layers N]`)."""
    from ftray.merge import MergeError, merge_checkpoints

    refs = [r for r in [method, base, *(checkpoints or [])] if r]
    method = "depth-upscale" if depth_upscale else refs.pop(0)
    try:
        upscale = {"block": [int(x) for x in block.split(",")] if block else None, "n_layers": n_layers,
                   "zero_copies": zero_copies or None, "calibration_rows": calibration_rows}
    except ValueError:
        _fail(f"--block {block}: expected two layer indices s,e such as 11,19")
    params = {k: v for k, v in {"scale": scale, "alpha": alpha, "beta": beta, "threshold": threshold, **upscale}.items() if v is not None}
    try:
        if method.replace("-", "_") == "depth_upscale":  # one model in, no base: the model is the only ingredient
            path, base = merge_checkpoints(method, refs, out, **params), None
        elif not refs:
            _fail(f"{method}: give the base model and then the checkpoints: ftray merge {method} BASE CHECKPOINT... --out DIR")
        else:
            base, *refs = refs
            path = merge_checkpoints(method, refs, out, base=base, **params)
    except (MergeError, ValueError, OSError) as err:
        _fail(f"error: {err}")
    typer.echo(json.dumps({"out": str(path), "method": method, "base": base, "checkpoints": refs, **params}, indent=2))


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="Checkpoint dir (adapter or full), model path or alias."),
    source: Optional[str] = typer.Option(None, help="Eval data source (default: a checkpoint's own eval data, else bundled:arithmetic; bundled:factual_edits with --edits)."),
    split: Optional[str] = typer.Option(None, help="Split (default test; train with --edits: the edits the model was trained on)."),
    max_samples: Optional[int] = typer.Option(200),
    max_new_tokens: Optional[int] = typer.Option(None, help="Generation budget (default 96; 32 with --edits)."),
    edits: bool = typer.Option(False, "--edits", help="Model-editing metrics instead: reliability, generality, locality."),
    base: Optional[str] = typer.Option(None, help="--edits: the unedited model locality compares with (default: the checkpoint's base)."),
    prompt_prefix: str = typer.Option("", help="Text put before every rendered prompt, e.g. a UL2 mode token: '[S2S]'."),
    shifts: Optional[str] = typer.Option(None, help="vision_language checkpoints: robustness under image shifts (SURE-VQA), e.g. 'blur,noise' or 'all' (blur, noise, contrast, rotation, occlusion): IID vs each shift, ratios, no-image baseline."),
    severities: str = typer.Option("2", help="--shifts: shift severities, 1 (mild) to 3 (strong), comma-separated."),
    out: Optional[str] = typer.Option(None, help="--shifts: where shifts.json and shifts.md go (default: beside the checkpoint, <dir>/../eval_shifts)."),
) -> None:
    """Exact match and perplexity on a split (classification / retrieval checkpoints: their task's metrics), editing metrics with --edits, or image-shift robustness with --shifts."""
    from ftray.eval import evaluate_on_ray
    from ftray.eval.edits import evaluate_edits_on_ray
    from ftray.train.trainer import ensure_ray

    from ftray.models import _looks_like_path

    if _looks_like_path(model) and not Path(model).expanduser().exists():  # before Ray starts: a clear error, not a task trace
        _fail(f"error: {model} does not exist (pass a checkpoint directory, a model path, an alias or a hub id)")
    if shifts is not None:
        return _eval_shifts(model, shifts, severities, out, source, split or "test", max_samples, max_new_tokens or 32)
    ensure_ray()
    if edits:
        try:
            result = evaluate_edits_on_ray(model, base_ref=base, source=source or "bundled:factual_edits", split=split or "train",
                                           max_samples=max_samples, max_new_tokens=max_new_tokens or 32)
        except ValueError as err:
            _fail(f"error: {err}")
    else:
        result = evaluate_on_ray(model, source=source, split=split or "test", max_samples=max_samples,
                                 max_new_tokens=max_new_tokens or 96, prompt_prefix=prompt_prefix)
    typer.echo(json.dumps(result, indent=2))


def _eval_shifts(model: str, shifts: str, severities: str, out: Optional[str], source: Optional[str], split: str,
                 max_samples: Optional[int], max_new_tokens: int) -> None:
    """`ftray eval --shifts`: the SURE-VQA robustness report, as JSON on stdout plus shifts.json / shifts.md."""
    from pathlib import Path

    from ftray.eval.shifts import check_vision_language, evaluate_shifts_on_ray, parse_shifts, shifts_table, write_report
    from ftray.train.trainer import ensure_ray

    try:  # bad arguments and text-only checkpoints fail before Ray starts
        names = parse_shifts(shifts)
        levels = [int(s) for s in severities.split(",") if s.strip()]
        check_vision_language(model)
    except ValueError as err:
        _fail(f"error: {err}")
    ensure_ray()
    try:
        report = evaluate_shifts_on_ray(model, shifts=names, severities=levels, source=source, split=split,
                                        max_samples=max_samples, max_new_tokens=max_new_tokens)
    except ValueError as err:
        _fail(f"error: {err}")
    target = Path(out) if out else (Path(model).resolve().parent / "eval_shifts" if Path(model).is_dir() else Path("eval_shifts"))
    json_path, md_path = write_report(report, target)
    typer.echo(shifts_table(report), err=True)
    typer.echo(json.dumps({**report, "report": {"json": str(json_path), "markdown": str(md_path)}}, indent=2))


@app.command()
def serve(
    config: str = typer.Argument(..., help="Serve config YAML (see serving/configs/)."),
    host: Optional[str] = typer.Option(None, help="Override the config's host."),
    port: Optional[int] = typer.Option(None, help="Override the config's port."),
    blocking: bool = typer.Option(True, "--blocking/--no-blocking", help="Serve until Ctrl-C; --no-blocking deploys and returns (for a cluster in RAY_ADDRESS)."),
) -> None:
    """Serve models and LoRA adapters over an OpenAI-compatible API on Ray Serve."""
    from serving.config import ServeConfigError, load_serve_config, parse_serve_config

    try:
        cfg = load_serve_config(config)  # fails here, before any Ray work, on a bad config
        overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
        cfg = parse_serve_config({**cfg.model_dump(), **overrides}) if overrides else cfg
    except ServeConfigError as err:
        _fail(str(err))
    from serving.app import run

    typer.echo(f"serving {', '.join(cfg.served_names())} at http://{cfg.host}:{cfg.port}{cfg.route_prefix}")
    try:
        run(cfg, blocking=blocking)
    except ServeConfigError as err:
        _fail(str(err))


@app.command()
def methods(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List every method with its paper, task types, hooks and defaults."""
    from ftray.methods import REGISTRY

    rows = []
    for name, cls in sorted(REGISTRY.items()):
        fields = {f: {"default": info.default, "description": info.description} for f, info in cls.Config.model_fields.items()}
        rows.append({"name": name, "paper": cls.paper, "tasks": list(cls.tasks), "hooks": cls.hooks(), "config": fields})
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    for row in rows:
        typer.secho(row["name"], bold=True)
        typer.echo(f"  paper: {row['paper']}\n  tasks: {', '.join(row['tasks'])}\n  hooks: {', '.join(row['hooks']) or '-'}")
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
    methods: str = typer.Option("all", help="Comma-separated registry names, or 'all'; each method's baseline (plain SFT or LoRA) is always included."),
    steps: int = typer.Option(40, help="Optimizer steps per method (same for all)."),
    out: str = typer.Option("bench_results", help="Directory for JSON, markdown and PNG."),
    model: str = typer.Option("smollm2-135m"),
    eval_n: int = typer.Option(50, help="Eval rows per task."),
    workers: int = typer.Option(2, help="Ray Train workers per run."),
    vlm_model: str = typer.Option("tiny-llava", help="Model of the vision-language methods' rows (default: a random tiny LLaVA; "
                                  "HuggingFaceTB/SmolVLM-256M-Instruct where the hub is reachable)."),
) -> None:
    """Each method against plain SFT on the same data, steps and seed: accuracy, forgetting, params, memory, time."""
    from ftray.bench.methods import main
    from ftray.methods import REGISTRY

    names = sorted(REGISTRY) if methods == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    main(names, steps=steps, out_dir=out, model=model, eval_n=eval_n, workers=workers, vlm_model=vlm_model)


@bench_app.command("data-throughput")
def bench_data_throughput(
    rows: int = typer.Option(2000, help="Rows scored by each contender."),
    tokens: int = typer.Option(128, help="Tokens per row."),
    batch_size: int = typer.Option(16, help="Rows per forward pass (both contenders)."),
    out: str = typer.Option("bench_results", help="Directory for JSON and markdown."),
    model: str = typer.Option("smollm2-135m"),
    actors: Optional[int] = typer.Option(None, help="Inference actors (default: ftray's choice from the free CPUs)."),
    threads: Optional[int] = typer.Option(None, help="Threads per actor (default: ftray's choice)."),
    scaling_rows: int = typer.Option(256, help="Rows scored by 1 and then 2 one-thread actors (the scaling pass)."),
    check_rows: int = typer.Option(64, help="Rows rescored in the plain loop with the actors' threads for the bit-for-bit check."),
) -> None:
    """Perplexity scoring through ftray's Ray Data path vs a plain batched loop: rows/s, start-up, identical scores."""
    from ftray.bench.data_throughput import main

    main(rows=rows, tokens=tokens, batch_size=batch_size, out_dir=out, model=model, actors=actors, threads=threads,
         scaling_rows=scaling_rows, check_rows=check_rows)


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


@bench_app.command("fusion-overhead")
def bench_fusion_overhead(
    tokens: int = typer.Option(64, help="Greedy tokens timed per path."),
    batch: int = typer.Option(1, help="Sequences decoded together."),
    out: str = typer.Option("bench_results", help="Directory for JSON and markdown."),
    model: str = typer.Option("smollm2-135m", help="Large model and small base (the bundled model is both here)."),
    expert: str = typer.Option(None, help="Tuned small model (e.g. an ftray run's final/); default: a random LoRA on --model."),
    threads: int = typer.Option(1, help="Torch threads (and Ray CPUs) per member actor."),
) -> None:
    """Logit-fusion ensemble latency per token against each member alone, their max and their sum."""
    from ftray.bench.fusion import main

    main(tokens=tokens, batch=batch, out_dir=out, model=model, expert=expert, threads=threads)


@bench_app.command("boost")
def bench_boost(
    tokens: int = typer.Option(32, help="Greedy tokens timed per session."),
    repeats: int = typer.Option(3, help="Sessions per path and batch size."),
    batches: str = typer.Option("1,8", help="Comma-separated batch sizes."),
    out: str = typer.Option("bench_results", help="Directory for JSON and markdown."),
    model: str = typer.Option("smollm2-135m", help="Base of the untrained 2-member chain built when --chain is not given."),
    chain: str = typer.Option(None, help="A chain directory (ftray boost's <name>-chain/); default: an untrained chain on --model."),
    threads: int = typer.Option(1, help="CPUs (Ray) and torch threads per member actor."),
    every: int = typer.Option(4, help="Without --chain: CMA after every N-th layer (4: the method's default; the recipe uses 10)."),
) -> None:
    """LLMBoost chain serving: pipelined vs sequential vs a single member, per-token latency and tokens/s."""
    from ftray.bench.boost import main

    main(tokens=tokens, repeats=repeats, batches=tuple(int(b) for b in batches.split(",") if b.strip()), out_dir=out,
         model=model, chain=chain, threads=threads, every=every)


@bench_app.command("serve-throughput")
def bench_serve_throughput(
    out: str = typer.Option("bench_results", help="Directory for JSON and markdown."),
    model: str = typer.Option("smollm2-135m"),
    max_tokens: int = typer.Option(64, help="Greedy tokens per request."),
    clients: str = typer.Option("1,4,16", help="Comma-separated concurrency levels."),
    rounds: int = typer.Option(2, help="Requests per client per level (twice that at 1 client)."),
    contenders: str = typer.Option("all", help="Comma-separated subset of generate-seq, generate-batch, "
                                   "vllm-offline, ftray-vllm, ray-serve-llm, ftray-hf; or 'all'."),
) -> None:
    """ftray serving (engine hf, engine vllm) vs ray.serve.llm's OpenAI app, vLLM offline and model.generate."""
    from ftray.bench.serve import main

    levels = [int(c) for c in clients.split(",") if c.strip()]
    names = None if contenders == "all" else [c.strip() for c in contenders.split(",") if c.strip()]
    main(out_dir=out, model=model, max_tokens=max_tokens, levels=levels, rounds=rounds, contenders=names)


@analyze_app.command("shift")
def analyze_shift(
    base: str = typer.Argument(..., help="The base model: alias, model directory or checkpoint."),
    tuned: str = typer.Argument(..., help="Its tuned version: alias, model directory or checkpoint (adapters are merged)."),
    out: str = typer.Option("shift_report", "--out", help="Directory for report.md, heatmap.png and results.json."),
    n: int = typer.Option(20, "--n", min=2, help="Prompts (from the bundled set or --prompts)."),
    max_response_tokens: int = typer.Option(32, "--max-response-tokens", min=1, help="Response tokens per prompt (one backward pass each)."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="jsonl of {id, group, prompt, instruction: [substrings]}."),
    chat_template: str = typer.Option("auto", "--chat-template", help="auto | chatml | llama3 | alpaca | plain, as data.chat_template."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch threads (default: torch's)."),
) -> None:
    """Behaviour shift after instruction tuning: IFA attribution to instruction words (Welch test), FFN concepts."""
    from ftray.analyze.shift import shift
    from ftray.models import ModelLoadError

    try:
        summary = shift(base, tuned, out, n=n, max_response_tokens=max_response_tokens, prompts=prompts,
                        chat_template=chat_template, threads=threads)
    except (ModelLoadError, ValueError, OSError) as err:
        _fail(f"error: {err}")
    typer.echo(json.dumps(summary, indent=2))


if __name__ == "__main__":
    app()
