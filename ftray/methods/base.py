"""The method API: a registered class with a typed `Config` and a few optional hooks.

Every hook's default does nothing, so a method implements only what its paper changes. The loop
calls each hook for every method in the run's list order and never looks at a method's name.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import ray.data

    from ftray.config import RunSpec

HOOKS = (
    "prepare_data",
    "corrupt_batch",
    "prepare_model",
    "param_groups",
    "optimizer",
    "criterion",
    "loss",
    "on_step",
    "after_backward",
    "phases",
    "finalize",
)


def stable_seed(*parts: object) -> int:
    """A seed from `parts` that is the same in every process (Python's str hash is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=7).digest(), "little")


class MethodConfig(BaseModel):
    """Base of every method's config: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class Phase:
    """One training phase of a multi-phase method; `fraction` of the run's optimizer steps."""

    name: str
    fraction: float = 1.0


@dataclass
class Context:
    """What a hook may need to know about the run and this worker."""

    spec: RunSpec
    tokenizer: Any
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    step: int = 0  # optimizer steps completed
    epoch: int = 0
    max_steps: int = 1
    phase: str = "train"
    generator: torch.Generator = field(default_factory=torch.Generator)  # per-rank, seeded, resumable
    # Another micro-batch drawn at random from this rank's training rows with `generator` (on the
    # device, not yet corrupted): for methods that need a second batch in a step (e.g. LfU's x′).
    draw_batch: Callable[[], dict[str, torch.Tensor]] | None = None
    # `prepare_data` only: what the method did to the rows (counts per bucket, a few examples), saved
    # as the method's entry in data_report.json and summarised in the log.
    report: dict[str, Any] = field(default_factory=dict)


class Method:
    """A fine-tuning method; subclasses set `name`, `paper`, `Config` and override hooks."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    incompatible: ClassVar[tuple[str, ...]] = ()  # registry names this method cannot run with
    baseline: ClassVar[str] = "full"  # what `ftray bench methods` compares it with: "full" (plain SFT) or "lora"
    tasks: ClassVar[tuple[str, ...]] = ("causal_lm",)  # the task types (spec.task.type) it supports
    bench: ClassVar[dict[str, Any]] = {}  # run-spec overrides for its `ftray bench methods` run (e.g. {"train": {"lr": 1e-3}})
    # extra `ftray bench methods` measurements, for it and its baseline: "prompt_spread" or "module:function"
    # (function(final_dir, eval_n, out_dir) -> row columns; see ftray.bench.methods.metric_function)
    bench_metrics: ClassVar[tuple[str, ...]] = ()
    # the baseline's `methods` list in `ftray bench methods` when "the same run without the method" is not the fair
    # comparison (e.g. MPCC's RL against its own SFT on the same masked rows); None = drop the method
    bench_baseline: ClassVar[list[dict[str, Any]] | None] = None

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    def check(self, spec: RunSpec) -> None:
        """Raise ValueError if this method cannot run with the rest of `spec` (called before Ray starts)."""

    def prepare_data(self, ds: ray.data.Dataset, ctx: Context) -> ray.data.Dataset:
        """Rewrite the raw training rows once, before tokenization, on Ray Data (driver side; model
        inference through `ftray.data.inference.map_model`); describe what changed in `ctx.report`."""
        return ds

    def corrupt_batch(self, batch: dict[str, torch.Tensor], ctx: Context) -> dict[str, torch.Tensor]:
        """Change a micro-batch before the forward pass (inputs; labels only when the objective is a
        denoising target, e.g. UL2's spans)."""
        return batch

    def prepare_model(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        """Wrap or freeze the model once per phase, before the optimizer is built."""
        return model

    def param_groups(self, model: torch.nn.Module, ctx: Context) -> list[dict[str, Any]] | None:
        """Optimizer parameter groups, or None to leave the default (all trainable parameters)."""
        return None

    def optimizer(self, params: list, ctx: Context) -> torch.optim.Optimizer | None:
        """An optimizer over `params` (tensors or groups), or None for the run's AdamW (e.g. GaLore)."""
        return None

    def criterion(self, logits: torch.Tensor, targets: torch.Tensor, ctx: Context) -> torch.Tensor | None:
        """Replace cross-entropy: the summed loss of `logits` [N, C] against `targets` [N] (-100 =
        ignore), or None to keep CE. At most one method per run may define it (e.g. GCE, SCE)."""
        return None

    def loss(self, model: torch.nn.Module, batch: dict, out: Any, ctx: Context) -> tuple[torch.Tensor | None, dict[str, float]]:
        """An extra loss term added to the cross-entropy, and metrics to log."""
        return None, {}

    def on_step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: Context) -> None:
        """Called before each optimizer step's first forward pass."""

    def after_backward(self, model: torch.nn.Module, ctx: Context) -> None:
        """Called after gradients are all-reduced, before clipping and `optimizer.step()`."""

    def phases(self) -> list[Phase] | None:
        """Several training phases (e.g. dense → select → sparse), or None for one."""
        return None

    def finalize(self, model: torch.nn.Module, base: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        """Post-process the trained model (full weights, on one process) before the final export."""
        return model

    def state_dict(self) -> dict[str, Any]:
        """Method state saved in checkpoints (e.g. a current selection)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    @classmethod
    def hooks(cls) -> list[str]:
        """Names of the hooks this method overrides."""
        return [h for h in HOOKS if getattr(cls, h) is not getattr(Method, h)]
