"""Driver side of a training run: data → `TorchTrainer` → fit → final export.

`run(spec)` works the same on a laptop (it starts a local Ray) and inside `ray job submit` (it
attaches to the cluster through RAY_ADDRESS): Ray decides where the workers go.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from ftray.config import RunSpec
from ftray.data import DataError, load_rows
from ftray.data.formats import format_of_columns, to_messages, validate_rows
from ftray.data.prepare import copy_report, prepare_training_data
from ftray.eval import evaluate_on_ray
from ftray.methods import Context, build_methods
from ftray.models import load_tokenizer
from ftray.tasks import get_task
from ftray.train.checkpoint import TRAIN_STATE
from ftray.train.loop import train_loop_per_worker


@dataclass
class TrainResult:
    """What a finished run leaves behind."""

    run_dir: Path | str  # a str when output.dir is a filesystem URI
    final_dir: Path | None  # HF-compatible export with `finalize` hooks applied
    checkpoint_dir: str | None  # Ray's latest checkpoint (storage path)
    metrics: dict[str, Any]


def ensure_ray() -> None:
    """Attach to the cluster in RAY_ADDRESS (ray job submit) or start a local Ray."""
    if not ray.is_initialized():
        ray.init()


def run_name(spec: RunSpec, recipe: str | None = None) -> str:
    """The run's directory name: `output.name`, else recipe stem + timestamp."""
    return spec.output.name or f"{Path(recipe).stem if recipe else 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"


def tokenized_rows(spec: RunSpec, source: str, split: str, max_samples: int | None, tokenizer: Any, methods: list | None) -> tuple[list[dict], Path | None]:
    """Load, let the data methods rewrite (training data only, on Ray Data, cached) and tokenize rows as the
    run's task wants them; (rows, the prepared-data cache entry or None)."""
    ds = training_source_rows(spec, split, max_samples) if methods is not None and spec.data.sources else load_rows(source, split, max_samples)
    entry = None
    if methods:
        ds, entry = prepare_training_data(spec, methods, ds, tokenizer)
        source = f"{source} after prepare_data"
    return get_task(spec).tokenize(ds, tokenizer, f"{source}[{split}]"), entry


def training_source_rows(spec: RunSpec, split: str, max_samples: int | None) -> datasets.Dataset:
    """The rows of every `data.sources` entry, concatenated, with a `source` column naming each row's origin;
    sources of different formats (e.g. cot and prompt_completion) all become chat `messages` rows first."""
    loaded = [load_rows(source, split, max_samples) for source in spec.data.sources]
    formats = [format_of_columns(ds.column_names) for ds in loaded]
    parts = []
    for source, ds, fmt in zip(spec.data.sources, loaded, formats):
        if len(set(formats)) > 1 and fmt is not None:
            validate_rows(ds, fmt, source)
            ds = ds.map(lambda r, f=fmt: {"messages": to_messages(r, f)[0]}, remove_columns=ds.column_names)
        parts.append(ds.add_column("source", [source] * len(ds)) if "source" not in ds.column_names else ds)
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as e:
        raise DataError(f"data.sources: the sources' columns differ ({e}); give them one format") from None


def prepare_rows(spec: RunSpec, methods: list) -> tuple[list[dict], list[dict], Path | None]:
    """Tokenized training and evaluation rows, and the prepared-data cache entry; bad rows fail here,
    before the training run starts (data methods may run Ray Data first).

    A classification run without `task.num_labels` gets 1 + the largest label of either split, set
    on `spec` (so the workers and the saved spec agree).
    """
    for field in ("source", "eval_source"):  # workers run in another working directory: pass local paths absolute
        value = getattr(spec.data, field)
        if value and not value.startswith("bundled:") and Path(value).expanduser().exists():
            setattr(spec.data, field, str(Path(value).expanduser().resolve()))
    tokenizer = load_tokenizer(spec.model.name, spec.model.gguf_file)
    eval_source = spec.data.eval_source or spec.data.source
    if spec.task.type == "classification" and spec.task.num_labels is None:
        splits = [load_rows(spec.data.source, spec.data.split, spec.data.max_samples),
                  load_rows(eval_source, spec.data.eval_split, spec.data.eval_max_samples)]
        labels = [y for ds in splits if "label" in ds.column_names for y in ds["label"] if isinstance(y, int)]
        spec.task.num_labels = max(2, 1 + max(labels, default=1))  # bad or missing labels are reported by tokenize
    train, entry = tokenized_rows(spec, spec.data.source, spec.data.split, spec.data.max_samples, tokenizer, methods)
    eval_rows, _ = tokenized_rows(spec, eval_source, spec.data.eval_split, spec.data.eval_max_samples, tokenizer, None)
    return train, eval_rows, entry


def build_trainer(
    spec: RunSpec,
    name: str,
    train: list[dict] | ray.ObjectRef,
    eval_rows: list[dict] | ray.ObjectRef,
    callbacks: list | None = None,
    keep_best: tuple[str, str] | None = None,
) -> TorchTrainer:
    """A `TorchTrainer` for `spec`: tokenized rows in the object store, scaling/failure/checkpoint configs.

    Rows may already be object refs (a sweep shares one copy across trials); `callbacks` go to the
    RunConfig (e.g. Tune's report callback); `keep_best=(metric, mode)` keeps the best checkpoints by
    that reported metric instead of the most recent ones (Ray always keeps the latest too, to resume).
    """
    storage = storage_path(spec)
    config = {
        "spec": spec.model_dump(mode="json"),
        "train_rows": train if isinstance(train, ray.ObjectRef) else ray.put(train),
        "eval_rows": eval_rows if isinstance(eval_rows, ray.ObjectRef) else ray.put(eval_rows),
        "run_dir": str(Path(storage) / name) if "://" not in storage else tempfile.mkdtemp(prefix=f"ftray-{name}-"),
    }
    s = spec.scaling
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker={"CPU": s.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=spec.output.keep_checkpoints,
                checkpoint_score_attribute=keep_best[0] if keep_best else None,
                checkpoint_score_order=keep_best[1] if keep_best else "max",
            ),
            callbacks=callbacks,
        ),
    )


def storage_path(spec: RunSpec) -> str:
    """`output.dir` as Ray wants it: an absolute local path or a filesystem URI."""
    return spec.output.dir if "://" in spec.output.dir else str(Path(spec.output.dir).resolve())


def run(spec: RunSpec, recipe: str | None = None, evaluate: bool = False) -> TrainResult:
    """Train `spec` on Ray Train and write `<run_dir>/final` with `finalize` hooks applied.

    With `evaluate`, exact match and perplexity of the base model and of the result are measured
    on the eval split (as Ray tasks) and stored in the result's metrics; for classification and
    retrieval, the result's task metrics (`<metric>_after`).
    """
    methods = build_methods(spec.methods)
    train, eval_rows, data_entry = prepare_rows(spec, methods)
    ensure_ray()
    name = run_name(spec, recipe)
    eval_args = {"source": spec.data.eval_source or spec.data.source, "split": spec.data.eval_split, "max_samples": spec.data.eval_max_samples,
                 "chat_template": spec.data.chat_template}
    causal = spec.task.type == "causal_lm"  # a classification head or pooler is untrained before: no "before"
    before = evaluate_on_ray(spec.model.name, **eval_args) if evaluate and causal else None
    result = build_trainer(spec, name, train, eval_rows).fit()
    storage = storage_path(spec)
    run_dir = Path(storage) / name if "://" not in storage else f"{storage.rstrip('/')}/{name}"  # keep the URI's //
    ckpt = result.checkpoint.path if result.checkpoint else None
    if "://" not in storage:
        copy_report(data_entry, Path(run_dir))
    final = None
    if ckpt and "://" not in storage_path(spec):
        final = Path(ray.get(export_final.remote(spec.model_dump(mode="json"), ckpt, str(run_dir / "final"))))
    metrics = dict(result.metrics or {})
    if before and final:
        after = evaluate_on_ray(str(final), **eval_args)
        metrics |= {f"{k}_{when}": r[k] for when, r in (("before", before), ("after", after)) for k in ("exact_match", "perplexity")}
    elif evaluate and final:
        after = evaluate_on_ray(str(final), **eval_args)
        metrics |= {f"{k}_after": v for k, v in after.items() if isinstance(v, float)}
    return TrainResult(run_dir, final, ckpt, metrics)


@ray.remote(num_cpus=1)
def export_final(spec_dict: dict, ckpt_dir: str, out_dir: str) -> str:
    """Apply every method's `finalize` to the last checkpoint and write `out_dir` atomically."""
    from ftray.eval.loading import load_checkpoint
    from ftray.models import load_model

    spec = RunSpec.model_validate(spec_dict)
    methods = build_methods(spec.methods)
    out = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".final.", dir=out.parent))
    if not any("finalize" in type(m).hooks() for m in methods):
        shutil.copytree(ckpt_dir, tmp, dirs_exist_ok=True)
        (tmp / TRAIN_STATE).unlink(missing_ok=True)
    else:
        model, tokenizer = load_checkpoint(ckpt_dir)
        base = load_model(spec.model.name, gguf_file=spec.model.gguf_file)
        ctx = Context(spec=spec, tokenizer=tokenizer)
        for m in methods:
            model = m.finalize(model, base, ctx)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.copy(Path(ckpt_dir) / "ftray_spec.yaml", tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return str(out)
