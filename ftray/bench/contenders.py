"""The contenders of `ftray bench train-throughput`: ftray on Ray Train, a plain PyTorch+PEFT loop, transformers.Trainer.

Each trains the same LoRA on the same tokenized rows (bundled arithmetic, tokenized by ftray.data as
the trainer does) with the same global batch size, autocast dtype and learning rate, and returns a
`Timing`: when each optimizer step ended, the real (non-pad) tokens of each step over all workers,
and the peak RSS of each training process. The non-Ray contenders are meant to run in a fresh
subprocess (see `ftray.bench.throughput`) so their RSS and torch thread settings are their own.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from ftray.config import RunSpec, build_spec
from ftray.data import collate
from ftray.methods import build_methods
from ftray.models import DEFAULT_MODEL, default_autocast_dtype, load_model, load_tokenizer
from ftray.tasks import get_task
from ftray.train import trainer
from ftray.train.loop import make_plan, micro_batches, train_loop_per_worker


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0))


@dataclass
class Settings:
    """What every contender shares."""

    model: str = DEFAULT_MODEL
    batch_size: int = 8  # rows per optimizer step in total; ftray's N workers take batch_size / N each
    steps: int = 20  # timed optimizer steps
    warmup: int = 2  # untimed steps before them
    max_len: int = 512  # per example and per packed row; arithmetic examples are ≤ ~220 tokens
    max_samples: int | None = None  # tokenize only the first N training rows (tests)
    lr: float = 1e-3
    threads: int = field(default_factory=cores)  # torch threads per process × processes = all cores
    lora: dict[str, Any] = field(default_factory=lambda: {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"})


@dataclass
class Timing:
    """One contender's raw measurements."""

    ends: list[float]  # clock reading at the end of each optimizer step (only differences count)
    tokens: list[int]  # real tokens of each optimizer step, all workers together
    rss_mb: list[float]  # peak RSS of each training process
    params: dict[str, int] = field(default_factory=dict)  # matmul parameter counts (plain only)


def run_spec(s: Settings, workers: int = 1, packing: bool = False, out_dir: str = "runs", name: str | None = None) -> RunSpec:
    """The ftray spec every contender's data, LoRA and batches come from."""
    if s.batch_size % workers:
        raise ValueError(f"--batch-size {s.batch_size} does not split evenly over {workers} workers")
    return build_spec({
        "model": {"name": s.model},
        "data": {"source": "bundled:arithmetic", "max_len": s.max_len, "packing": packing,
                 "max_samples": s.max_samples, "eval_max_samples": 1},
        "methods": [s.lora],
        # One step more than timed: ftray's last step also evaluates, and that is not a training step.
        "train": {"max_steps": s.warmup + s.steps + 1, "lr": s.lr, "batch_size": s.batch_size // workers},
        "scaling": {"num_workers": workers, "cpus_per_worker": max(1, s.threads // workers)},
        "output": {"dir": out_dir, "name": name},
    })


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- ftray on Ray Train


def measured_loop(config: dict[str, Any]) -> None:
    """ftray's `train_loop_per_worker`, then this worker's peak RSS written beside metrics.jsonl."""
    import ray.train

    train_loop_per_worker(config)
    run_dir = Path(config["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"peak_rss_rank{ray.train.get_context().get_world_rank()}.json").write_text(json.dumps(peak_rss_mb()))


def run_ftray(s: Settings, name: str, workers: int, packing: bool, storage: str) -> Timing:
    """ftray's real driver path (prepare_rows → build_trainer → fit) on `workers` Ray Train workers."""
    spec = run_spec(s, workers, packing, storage, name)
    methods = build_methods(spec.methods)
    train, eval_rows, _ = trainer.prepare_rows(spec, methods)
    trainer.ensure_ray()
    run_dir = Path(trainer.storage_path(spec)) / name
    shutil.rmtree(run_dir, ignore_errors=True)  # Ray Train would resume a run dir left by an earlier bench
    with mock.patch.object(trainer, "train_loop_per_worker", measured_loop):
        trainer.build_trainer(spec, name, train, eval_rows).fit()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ends = [r["time"] for r in sorted((r for r in lines if "loss" in r), key=lambda r: r["step"])]
    plan = make_plan(spec, len(train), workers, methods)
    rss = [json.loads(p.read_text()) for p in sorted(run_dir.glob("peak_rss_rank*.json"))]
    return Timing(ends, step_tokens(train, spec, plan, workers), rss)


def step_tokens(rows: list[dict], spec: RunSpec, plan, world: int) -> list[int]:
    """Real tokens of each optimizer step over all ranks, from the very row selection the loop makes.

    The loop logs only rank 0's count (and counts pads for packed rows), so recount: rows that hold
    nothing but their own index go through `micro_batches`, which reads its selection back without
    copying its shuffle/shard logic here.
    """
    tagged = [{"input_ids": [i], "labels": [i], "span_ids": [0], "position_ids": [0]} for i in range(len(rows))]
    counts = []
    for step in range(plan.max_steps):
        collate = partial(get_task(spec).collate, pad_id=-1)
        picked = [micro_batches(tagged, spec, step, plan, rank, world, collate) for rank in range(world)]
        counts.append(sum(len(rows[i]["input_ids"]) for mbs in picked for b in mbs for i in b["input_ids"].flatten().tolist()))
    return counts


# ---------------------------------------------------------------- baselines (one process, no Ray)


def _setup(s: Settings) -> tuple[RunSpec, list[dict], int, torch.nn.Module, torch.dtype | None]:
    """Threads, the tokenized rows ftray would train on, pad id, the LoRA model and the autocast dtype."""
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(s.threads)
    spec = run_spec(s)
    methods = build_methods(spec.methods)
    rows, _, _ = trainer.prepare_rows(spec, methods)
    c = methods[0].config  # the same LoRA fields (and defaults, e.g. dropout) ftray's lora method uses
    torch.manual_seed(0)
    model = get_peft_model(load_model(s.model), LoraConfig(
        r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout, target_modules=c.target_modules, task_type="CAUSAL_LM"))
    return spec, rows, load_tokenizer(s.model).pad_token_id, model.train(), default_autocast_dtype("cpu")


def matmul_params(model: torch.nn.Module) -> dict[str, int]:
    """Weights of every nn.Linear (incl. lm_head, excl. embedding lookups): frozen base vs trainable LoRA."""
    linear = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    frozen = {id(w): w.numel() for w in linear if not w.requires_grad}  # by id: tied weights count once
    return {"frozen": sum(frozen.values()), "trainable": sum(w.numel() for w in linear if w.requires_grad)}


def run_plain(s: Settings) -> Timing:
    """The loop a user would write: PEFT model, AdamW, autocast, ftray's collate and batch order."""
    spec, rows, pad_id, model, amp = _setup(s)
    plan = make_plan(spec, len(rows), 1, build_methods(spec.methods))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.lr)
    ends, tokens = [], []
    for step in range(s.warmup + s.steps):
        batch = micro_batches(rows, spec, step, plan, 0, 1, partial(get_task(spec).collate, pad_id=pad_id))[0]
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
            loss = model(**inputs, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, spec.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
        tokens.append(int(batch["attention_mask"].sum()))
    return Timing(ends, tokens, [peak_rss_mb()], matmul_params(model))


def run_hf_trainer(s: Settings) -> Timing:
    """`transformers.Trainer` with equivalent arguments and ftray's collate as its data collator."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    spec, rows, pad_id, model, amp = _setup(s)
    ends, tokens = [], []

    def collator(batch_rows: list[dict]) -> dict[str, torch.Tensor]:
        # Batches are collated in step order (accelerate may prefetch one ahead): tokens[i] is step i's.
        batch = collate(batch_rows, pad_id)
        tokens.append(int(batch["attention_mask"].sum()))
        return {k: v for k, v in batch.items() if k != "span_ids"}

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="ftray-bench-hf-") as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=s.warmup + s.steps, per_device_train_batch_size=s.batch_size,
            learning_rate=s.lr, lr_scheduler_type="cosine", optim="adamw_torch",  # ftray's torch.optim.AdamW
            max_grad_norm=spec.train.max_grad_norm, bf16=amp == torch.bfloat16, use_cpu=True,
            eval_strategy="no", save_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True,
            dataloader_num_workers=0, dataloader_pin_memory=False, remove_unused_columns=False, seed=0,
        )
        Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[StepEnds()]).train()
    return Timing(ends, tokens[: len(ends)], [peak_rss_mb()])


BASELINES = {"plain": run_plain, "hf-trainer": run_hf_trainer}
