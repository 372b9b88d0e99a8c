"""The one `train_loop_per_worker`: every method, every strategy, 1 to N Ray Train workers.

Reads as a table of contents: set up (model, methods, data shard, resume), then for each phase wrap
the model and build the optimizer, then step: on_step → micro-batches (corrupt → forward → loss →
backward) → after_backward → clip → optimizer step → log / eval / checkpoint.
"""

from __future__ import annotations

import json
import math
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ftray.config import RunSpec
from ftray.methods import Context, Method, Phase, build_methods, stable_seed
from ftray.models import default_autocast_dtype, load_tokenizer
from ftray.tasks import get_task
from ftray.train.checkpoint import gather_state, read_train_state, restore_state, write_checkpoint
from ftray.train.optim import build_optimizer, build_scheduler
from ftray.train.parallel import grad_sync, unwrap, wrap_model


@dataclass
class Plan:
    """How many optimizer steps the run takes and how they split into epochs and phases."""

    steps_per_epoch: int
    max_steps: int
    phases: list[Phase]
    phase_ends: list[int]  # cumulative optimizer-step boundary of each phase


def make_plan(spec: RunSpec, n_rows: int, world_size: int, methods: list[Method]) -> Plan:
    """Steps per epoch (every rank gets the same number of micro-batches), total steps, phase bounds."""
    per_step = spec.train.batch_size * spec.train.grad_accum * world_size
    steps_per_epoch = n_rows // per_step
    if steps_per_epoch == 0:
        raise ValueError(
            f"data: {n_rows} training rows are fewer than one optimizer step needs "
            f"(train.batch_size × train.grad_accum × scaling.num_workers = {per_step})"
        )
    max_steps = spec.train.max_steps or steps_per_epoch * spec.train.epochs
    phases = next((p for m in methods if (p := m.phases())), [Phase("train")])
    total = sum(p.fraction for p in phases)
    ends = [round(max_steps * sum(p.fraction for p in phases[: i + 1]) / total) for i in range(len(phases))]
    return Plan(steps_per_epoch, max_steps, phases, ends)


def micro_batches(rows: list[dict], spec: RunSpec, step: int, plan: Plan, rank: int, world: int, collate) -> list[dict]:
    """The micro-batches of optimizer step `step` for this rank: a seeded per-epoch shuffle, sharded by rank."""
    epoch, within = divmod(step, plan.steps_per_epoch)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(spec.train.seed + epoch)).tolist()
    mine = order[rank::world]
    bs, accum = spec.train.batch_size, spec.train.grad_accum
    start = within * bs * accum
    return [collate([rows[i] for i in mine[start + k * bs : start + (k + 1) * bs]]) for k in range(accum)]


def draw_batch(rows: list[dict], ctx: Context, world: int, collate) -> dict[str, torch.Tensor]:
    """A micro-batch drawn with the step's seeded generator from this rank's rows (a method's second batch)."""
    mine = rows[ctx.rank :: world]
    pick = torch.randint(len(mine), (ctx.spec.train.batch_size,), generator=ctx.generator).tolist()
    return {k: v.to(ctx.device) for k, v in collate([mine[i] for i in pick]).items()}


def seed_step(ctx: Context, seed: int) -> None:
    """Reseed every random stream from (seed, rank, step) so a resumed run draws what the original drew."""
    ctx.generator.manual_seed(stable_seed(seed, ctx.rank, ctx.step))
    torch.manual_seed(stable_seed(seed, ctx.rank, ctx.step, "dropout"))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: config holds the spec dict, object refs to the tokenized rows and the run dir."""
    spec = RunSpec.model_validate(config["spec"])
    tc = ray.train.get_context()
    rank, world = tc.get_world_rank(), tc.get_world_size()
    torch.set_num_threads(spec.train.num_threads or max(1, int(spec.scaling.cpus_per_worker)))
    device = ray.train.torch.get_device()
    amp = resolve_precision(spec.train.precision, device)

    tokenizer = load_tokenizer(spec.model.name, spec.model.gguf_file)
    train_rows, eval_rows = ray.get(config["train_rows"]), ray.get(config["eval_rows"])
    methods = build_methods(spec.methods)
    plan = make_plan(spec, len(train_rows), world, methods)
    ctx = Context(spec=spec, tokenizer=tokenizer, rank=rank, world_size=world, device=device, max_steps=plan.max_steps)
    task = get_task(spec)
    collate = lambda rows: task.collate(rows, tokenizer.pad_token_id)  # noqa: E731
    ctx.draw_batch = lambda: draw_batch(train_rows, ctx, world, collate)
    log = RunLog(Path(config["run_dir"]), spec, rank, world, plan.max_steps)

    resume = ray.train.get_checkpoint()
    state = read_train_state(Path(resume.to_directory())) if resume else None
    if state:
        ctx.step = state["step"]
        for m, s in zip(methods, state["methods"]):
            m.load_state_dict(s)
        log.event("resumed", ctx.step, f"resumed from checkpoint at step {ctx.step}")

    torch.manual_seed(spec.train.seed)  # identical initial weights (and adapter inits) on every rank
    model = task.load_model()
    for k, phase in enumerate(plan.phases):
        ctx.phase = phase.name
        model = unwrap(model)
        for m in methods:
            model = m.prepare_model(model, ctx)
        if ctx.step >= plan.phase_ends[k]:  # resumed past this phase: its structure is replayed, its steps are done
            if state and state["phase"] == k:  # checkpointed at this phase's last step: the next phase starts from it
                model.load_state_dict(state["model"], strict=False)
            continue
        phase_start = plan.phase_ends[k - 1] if k else 0
        model = wrap_model(model, spec.scaling.strategy, device)
        model.train()  # from_pretrained returns eval mode: dropout (e.g. LoRA's) would be off until the first eval
        groups = next((g for m in methods if (g := m.param_groups(unwrap(model), ctx))), None)
        if groups is None and hasattr(task, "param_groups"):  # e.g. vision_language's projector lr
            groups = task.param_groups(unwrap(model))
        params = groups or [p for p in model.parameters() if p.requires_grad]
        optimizer = next((o for m in methods if (o := m.optimizer(params, ctx))), None) or build_optimizer(params, spec.train)
        scheduler = build_scheduler(optimizer, spec.train, plan.phase_ends[k] - phase_start)
        if state and state["phase"] == k:
            restore_state(model, optimizer, state)
            scheduler.load_state_dict(state["scheduler"])
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.event("phase", ctx.step, f"phase {phase.name}: {trainable:,} trainable parameters", trainable=trainable,
                  total=sum(p.numel() for p in model.parameters()))
        log.start(ctx.step)
        while ctx.step < plan.phase_ends[k]:
            ctx.epoch = ctx.step // plan.steps_per_epoch
            seed_step(ctx, spec.train.seed)
            for m in methods:
                m.on_step(unwrap(model), optimizer, ctx)
            batches = micro_batches(train_rows, spec, ctx.step, plan, rank, world, collate)
            metrics = train_step(model, batches, methods, optimizer, scheduler, ctx, amp, task)
            ctx.step += 1
            metrics["epoch"] = ctx.epoch
            metrics["step"] = ctx.step  # the time axis of sweeps (ASHA's time_attr) and plots
            if spec.train.eval_every and ctx.step % spec.train.eval_every == 0 and ctx.step < plan.max_steps:
                metrics["eval_loss"] = eval_loss(model, eval_rows, spec, task, collate, rank, world, amp, device)
            last = ctx.step == plan.max_steps
            if last and eval_rows:
                metrics["eval_loss"] = eval_loss(model, eval_rows, spec, task, collate, rank, world, amp, device)
            log.step(ctx.step, metrics)
            every = spec.train.checkpoint_every
            if last or (every and ctx.step % every == 0):
                # a VLM's processor saves its tokenizer, image processor and chat template together
                save(model, optimizer, scheduler, methods, getattr(task, "processor", tokenizer), spec, ctx, k, metrics, log)
            elif ctx.step % spec.train.log_every == 0 or "eval_loss" in metrics:
                ray.train.report(metrics)  # every eval result reaches Ray (Tune's schedulers act on it)
    log.close()


def train_step(model, batches, methods, optimizer, scheduler, ctx: Context, amp, task=None) -> dict[str, float]:
    """One optimizer step over `batches` (gradient accumulation); returns the step's metrics."""
    task = task or get_task(ctx.spec)
    extra_metrics: dict[str, float] = {}
    total_loss, n_tokens = 0.0, 0
    forwards = []  # every forward of the model in this step, the methods' extra passes included
    counter = unwrap(model).register_forward_pre_hook(lambda *_: forwards.append(1))
    replacing = next((m for m in methods if "criterion" in type(m).hooks()), None)
    criterion = (lambda logits, targets: replacing.criterion(logits, targets, ctx)) if replacing else None
    for i, batch in enumerate(batches):
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        for m in methods:
            batch = m.corrupt_batch(batch, ctx)
        with grad_sync(model, sync=i == len(batches) - 1):
            out, loss_sum, count = task.forward_and_loss(model, batch, amp, criterion)
            loss = loss_sum / count.clamp(min=1)
            for m in methods:
                extra, m_metrics = m.loss(model, batch, out, ctx)
                if extra is not None:
                    loss = loss + extra
                extra_metrics.update(m_metrics)
            (loss / len(batches)).backward()
        total_loss += loss_sum.item()
        n_tokens += int(count)
        real = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
        extra_metrics["tokens"] = extra_metrics.get("tokens", 0) + int(real)
    counter.remove()
    extra_metrics["forwards_per_batch"] = len(forwards) / len(batches)
    for m in methods:
        m.after_backward(unwrap(model), ctx)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if ctx.spec.train.max_grad_norm:
        norm = torch.nn.utils.clip_grad_norm_(params, ctx.spec.train.max_grad_norm)
        extra_metrics["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    totals = torch.tensor([total_loss, n_tokens], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(totals)  # log the global token-mean loss, identical on every rank
    return {"loss": float(totals[0] / totals[1].clamp(min=1)), "lr": scheduler.get_last_lr()[0], **extra_metrics}


@torch.no_grad()
def eval_loss(model, rows: list[dict], spec: RunSpec, task, collate, rank: int, world: int, amp, device) -> float:
    """Mean loss (per label token, or per example) over this rank's share of `rows`, averaged over all ranks."""
    model.eval()
    # Equal shards: under FSDP every forward is a collective, so ranks must run the same batch count.
    mine = rows[: len(rows) - len(rows) % world][rank::world]
    totals = torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(mine), spec.train.batch_size):
        batch = {k: v.to(device) for k, v in collate(mine[i : i + spec.train.batch_size]).items()}
        _, loss_sum, count = task.forward_and_loss(unwrap(model), batch, amp)  # DDP's forward would sync buffers
        totals += torch.tensor([loss_sum.item(), count.item()], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(totals)
    model.train()
    return float(totals[0] / totals[1].clamp(min=1))


def save(model, optimizer, scheduler, methods, tokenizer, spec, ctx: Context, phase: int, metrics: dict, log: RunLog) -> None:
    """Gather the state on every rank, write the checkpoint on rank 0 and report it to Ray Train."""
    state = gather_state(model, optimizer)
    train_state = {
        "step": ctx.step,
        "phase": phase,
        "scheduler": scheduler.state_dict(),
        "methods": [m.state_dict() for m in methods],
    }
    name = f"checkpoint_{ctx.step:06d}"
    if ctx.rank != 0:
        ray.train.report(metrics, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory(prefix="ftray-ckpt-") as tmp:
        path = write_checkpoint(Path(tmp) / name, unwrap(model), state, train_state, tokenizer, spec)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(path), checkpoint_dir_name=name)
    log.line(f"checkpoint {name} saved")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 where supported when 'auto', None for fp32."""
    if precision == "auto":
        return default_autocast_dtype(device.type)
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class RunLog:
    """Rank 0's progress line, `metrics.jsonl` and optional wandb run."""

    def __init__(self, run_dir: Path, spec: RunSpec, rank: int, world: int, max_steps: int) -> None:
        self.rank, self.world, self.max_steps, self.wandb = rank, world, max_steps, None
        self.log_every = spec.train.log_every
        if rank != 0:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "metrics.jsonl", "a")
        if spec.tracking.wandb:
            import os

            import wandb

            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            self.wandb = wandb.init(project=spec.tracking.project, dir=str(run_dir), mode=mode, config=spec.model_dump(mode="json"))

    def start(self, step: int) -> None:
        """Mark the start of timed stepping at optimizer step `step`."""
        self.t0, self.first_step, self.tokens = time.perf_counter(), step, 0

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        """Record one step's metrics; print a line every `log_every` steps."""
        self.tokens += metrics.get("tokens", 0)
        now = time.perf_counter()
        # Every rank sees equal-sized shards, so the global rate is this rank's times the world size.
        metrics["tokens_per_s"] = self.tokens * self.world / max(1e-9, now - self.t0)
        metrics["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        if self.rank != 0:
            return
        self.file.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.file.flush()
        if self.wandb:
            self.wandb.log(metrics, step=step)
        if step % self.log_every == 0 or step == self.max_steps:
            per_step = (now - self.t0) / max(1, step - self.first_step)
            eta = per_step * (self.max_steps - step)
            extra = f" | eval_loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else ""
            self.line(
                f"step {step}/{self.max_steps} | loss {metrics['loss']:.4f}{extra} | lr {metrics['lr']:.2e}"
                f" | {metrics['tokens_per_s']:.0f} tok/s | eta {math.ceil(eta)}s"
            )

    def event(self, name: str, step: int, text: str, **fields: Any) -> None:
        """Print `text` and record {"event": name, "step": step, **fields} in metrics.jsonl."""
        self.line(text)
        if self.rank == 0:
            self.file.write(json.dumps({"event": name, "step": step, "time": time.time(), **fields}) + "\n")
            self.file.flush()

    def line(self, text: str) -> None:
        """Print a log line from rank 0."""
        if self.rank == 0:
            print(f"[ftray] {text}", flush=True)

    def close(self) -> None:
        """Flush and close the log and the wandb run."""
        if self.rank == 0:
            self.file.close()
            if self.wandb:
                self.wandb.finish()
