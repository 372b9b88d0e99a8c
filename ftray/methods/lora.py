"""LoRA and its PEFT siblings (DoRA, PiSSA, OLoRA) through one config.

LoRA: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2106.09685) — freeze W and
learn a low-rank update ΔW = (α/r)·B·A with B initialised to zero. The siblings only change the
initialisation (PiSSA: principal singular vectors, 2404.02948; OLoRA: QR, 2406.01775) or the update's
parametrisation (DoRA: magnitude/direction, 2402.09353). PEFT implements all four; this file maps
ftray's config onto `peft.LoraConfig`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from peft import LoraConfig, get_peft_model
from pydantic import Field

from ftray.methods.base import Context, Method, MethodConfig
from ftray.methods.registry import register

if TYPE_CHECKING:
    from ftray.config import RunSpec


class LoraMethodConfig(MethodConfig):
    variant: Literal["lora", "dora", "pissa", "olora"] = Field("lora", description="LoRA, DoRA, PiSSA or OLoRA.")
    r: int = Field(8, ge=1, description="Rank of the update (paper: 1–64; 8 is its common setting).")
    alpha: float = Field(16, gt=0, description="Scale numerator: ΔW is multiplied by alpha/r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        ["q_proj", "v_proj"], description="Modules to adapt (paper: the query and value projections)."
    )
    modules_to_save: list[str] | None = Field(None, description="Extra modules trained in full and saved with the adapter.")


@register
class Lora(Method):
    """Wrap the model in a PEFT LoRA adapter; only the adapter weights train."""

    name = "lora"
    tasks = ("causal_lm", "classification", "retrieval")
    bench = {"train": {"lr": 1e-3}}  # adapters take a ~10-20x larger learning rate than full fine-tuning
    paper = "Hu et al. 2021, LoRA (2106.09685); DoRA 2402.09353; PiSSA 2404.02948; OLoRA 2406.01775"
    Config = LoraMethodConfig
    incompatible = ("full", "hft")

    def check(self, spec: RunSpec) -> None:
        """PiSSA/OLoRA's conversion on save needs unsharded parameters: not under FSDP yet."""
        if self.config.variant in ("pissa", "olora") and spec.scaling.strategy == "fsdp":
            raise ValueError(f"variant {self.config.variant!r} cannot be saved under scaling.strategy=fsdp yet; use ddp")

    def prepare_model(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        """Wrap `model` with a LoRA adapter built from the config."""
        c = self.config
        init = {"lora": True, "dora": True, "pissa": "pissa", "olora": "olora"}[c.variant]
        peft_config = LoraConfig(
            r=c.r,
            lora_alpha=c.alpha,
            lora_dropout=c.dropout,
            target_modules=c.target_modules,
            modules_to_save=c.modules_to_save,
            use_dora=c.variant == "dora",
            init_lora_weights=init,
            task_type=PEFT_TASK[ctx.spec.task.type],  # SEQ_CLS also trains and saves the new `score` head
        )
        model = get_peft_model(model, peft_config)
        if c.variant in ("pissa", "olora"):
            keep_initial_adapter(model)
        return model


PEFT_TASK = {"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS", "retrieval": "FEATURE_EXTRACTION"}


def keep_initial_adapter(model: torch.nn.Module) -> None:
    """Make saves of a residual-base adapter (PiSSA, OLoRA, CorDA) load on the original base model.

    These inits rewrite the base weights (W ← W − BA), so an adapter saved as-is only works on that
    residual base. Keep the initial adapter so checkpoints are converted to a plain LoRA (rank 2r)
    that loads on the original base (PEFT's documented conversion path, via `export_hf`).
    """
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    init_dir = Path(tempfile.mkdtemp(prefix="ftray-lora-init-"))
    model.save_pretrained(init_dir)
    config.init_lora_weights = init
    model.ftray_save_kwargs = {"path_initial_model_for_weight_conversion": str(init_dir)}
