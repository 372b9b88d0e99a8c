"""Checkpoints: a Hugging Face directory (PEFT adapter or safetensors model) plus the training state.

A checkpoint directory loads with plain transformers/PEFT (`from_pretrained`) and also holds
`train_state.pt` (trainable weights as trained, optimizer, scheduler, step, method states) so a
restarted worker group resumes exactly. It is written to a temporary sibling and renamed into place,
so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ftray.config import RunSpec, dump_spec

TRAIN_STATE = "train_state.pt"
SPEC_FILE = "ftray_spec.yaml"


def gather_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full, unsharded model and optimizer state on CPU (a collective: call on every rank)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=opts)


def export_hf(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], out: Path) -> None:
    """Save `model` with `state_dict` as a PEFT adapter dir or a `save_pretrained` safetensors dir."""
    kwargs = getattr(model, "ftray_save_kwargs", None)  # e.g. PiSSA's conversion to a plain LoRA
    if kwargs:
        # PEFT's conversion reads the initial adapter out of the passed state_dict and fails on ours, so
        # it saves from the live (unsharded: see Lora.check) parameters instead.
        model.save_pretrained(out, safe_serialization=True, **kwargs)
    else:
        model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)


def write_checkpoint(
    out: Path,
    model: torch.nn.Module,
    state: tuple[dict, dict],
    train_state: dict[str, Any],
    tokenizer: Any,
    spec: RunSpec,
) -> Path:
    """Atomically write a checkpoint directory at `out` from gathered `state` (rank 0 only)."""
    model_sd, optim_sd = state
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    export_hf(model, model_sd, tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / SPEC_FILE).write_text(dump_spec(spec))
    weights = {k: v for k, v in model_sd.items() if k in trainable}
    torch.save({**train_state, "model": weights, "optimizer": optim_sd}, tmp / TRAIN_STATE)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def read_train_state(ckpt_dir: Path) -> dict[str, Any]:
    """Load `train_state.pt` from a checkpoint directory."""
    return torch.load(Path(ckpt_dir) / TRAIN_STATE, map_location="cpu", weights_only=False)


def restore_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load trainable weights and optimizer state into a (possibly wrapped/sharded) model on every rank."""
    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=opts)
