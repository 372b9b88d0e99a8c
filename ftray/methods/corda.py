"""CorDA — Context-oriented Decomposition Adaptation (Yang et al., NeurIPS 2024, 2406.05223).

Idea: decompose every linear weight with an SVD of W·C, where C is the covariance of that layer's
inputs on a few samples of task context, so the context decides which components are "principal";
KPM trains the r smallest components (covariance of knowledge questions, to preserve them), IPM the
r largest (covariance of the training instructions and responses). W = W_res + (α/r)·B·A exactly, so
the model is unchanged at initialisation.

PEFT implements the decomposition (`preprocess_corda`, `init_lora_weights="corda"`); this file
feeds it tokenized calibration rows from ftray's data layer and saves adapters that load on the
original base (the same conversion as PiSSA, `lora.keep_initial_adapter`).

Decisions on points the spec leaves open or that differ on a small model:
- Calibration rows are run one at a time, unpadded (PEFT's hook squeezes the batch dimension).
  IPM feeds whole rows (prompt + reply) of the training data; KPM feeds only the prompt tokens of
  the knowledge set (the authors' KPM covariance is built from NQ/TriviaQA questions alone). The
  chat template is part of what the model sees, so it is kept.
- r is capped per module at min(d_out, d_in), with alpha capped alongside it (alpha = r keeps s = 1),
  so the paper's r = 128 also runs on tiny test models; on SmolLM2-135M (hidden 576) nothing is capped.
- Multi-worker DDP: every rank computes the covariance from the same rows; DDP's start-up broadcast
  of all module states from rank 0 then makes the residual weights bit-identical on every rank.
  FSDP is refused (the conversion on save needs unsharded parameters, as for PiSSA).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda
from pydantic import Field

from ftray.data import detect_format, load_rows, tokenize_dataset
from ftray.methods.base import Context, Method, MethodConfig
from ftray.methods.lora import keep_initial_adapter
from ftray.methods.registry import register

if TYPE_CHECKING:
    from ftray.config import RunSpec

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class CordaMethodConfig(MethodConfig):
    mode: Literal["ipm", "kpm"] = Field(
        "ipm", description="'ipm': train the r largest components of W·C (C from the training data); "
        "'kpm': train the r smallest (C from a knowledge set) to preserve that knowledge.")
    r: int = Field(128, ge=1, description="Adapter rank (paper: 128); capped at min(d_out, d_in) per module.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; None = r, the paper's setting (scale s = 1).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input (CorDA trains without it).")
    target_modules: list[str] = Field(TARGETS, description="Linears to decompose (paper: every linear but lm_head).")
    calibration_source: str | None = Field(
        None, description="Rows whose activations give C; None = the training data (ipm) or bundled:factual_qa (kpm).")
    calibration_split: str = Field("train", description="Split of the calibration source.")
    calibration_samples: int = Field(256, ge=1, description="Calibration rows, run one at a time (paper: 256).")
    calibration_max_len: int = Field(2048, ge=8, description="Tokens kept per calibration row (paper: 2048).")


@register
class Corda(Method):
    """Initialise a LoRA adapter from the context-oriented SVD of each weight; train only the adapter."""

    name = "corda"
    paper = "Yang et al. 2024, CorDA: Context-Oriented Decomposition Adaptation of LLMs (2406.05223)"
    Config = CordaMethodConfig
    baseline = "lora"
    bench = {"train": {"lr": 1e-3}}  # same adapter learning rate as the LoRA baseline's bench run
    incompatible = ("full", "hft", "lora", "loramoe")

    def check(self, spec: RunSpec) -> None:
        """The conversion on save needs unsharded parameters: not under FSDP."""
        if spec.scaling.strategy == "fsdp":
            raise ValueError("CorDA adapters cannot be saved under scaling.strategy=fsdp yet; use ddp")

    def prepare_model(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        """Sample the calibration covariance, decompose the targets and wrap them in the CorDA adapter."""
        peft_config = self.lora_config(model)
        rows = self.calibration_ids(ctx)
        was_training = model.training
        model.to(ctx.device)

        def run_model() -> None:
            for ids in rows:
                model(input_ids=torch.tensor([ids], device=ctx.device), use_cache=False)

        preprocess_corda(model, peft_config, run_model=run_model)
        model = get_peft_model(model, peft_config)
        model.train(was_training)  # preprocess_corda leaves the model in eval mode
        keep_initial_adapter(model)
        return model

    def lora_config(self, model: torch.nn.Module) -> LoraConfig:
        """The PEFT config: rank r (capped per module), alpha = r unless set, CorDA init in the chosen mode."""
        c = self.config
        alpha = c.alpha or c.r
        ranks = {name: min(m.in_features, m.out_features) for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in c.target_modules}
        capped = {name: k for name, k in ranks.items() if k < c.r}
        return LoraConfig(
            r=c.r, lora_alpha=alpha, lora_dropout=c.dropout, target_modules=c.target_modules,
            rank_pattern={re.escape(n): k for n, k in capped.items()},  # PEFT matches keys as regexes
            alpha_pattern={re.escape(n): alpha * k / c.r for n, k in capped.items()},
            init_lora_weights="corda", corda_config=CordaConfig(corda_method=c.mode), task_type="CAUSAL_LM",
        )

    def calibration_ids(self, ctx: Context) -> list[list[int]]:
        """Token ids of the calibration rows: whole rows (ipm) or their prompts only (kpm)."""
        c, data = self.config, ctx.spec.data
        source = c.calibration_source or (data.source if c.mode == "ipm" else "bundled:factual_qa")
        ds = load_rows(source, c.calibration_split, c.calibration_samples)
        fmt = data.format if source == data.source and data.format != "auto" else detect_format(ds, source)
        rows = tokenize_dataset(ds, ctx.tokenizer, fmt, c.calibration_max_len, source_name=f"{source}[{c.calibration_split}]")
        if c.mode == "ipm":
            return list(rows["input_ids"])
        return [ids[: next(i for i, y in enumerate(labels) if y != -100)] for ids, labels in zip(rows["input_ids"], rows["labels"])]
