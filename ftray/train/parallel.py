"""Replicating or sharding the model across Ray Train workers: DDP or FSDP2."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import ray.train.torch


def wrap_model(model: torch.nn.Module, strategy: str, device: torch.device) -> torch.nn.Module:
    """Move `model` to `device` and wrap it for data parallelism (no-op wrapper on one worker)."""
    if strategy == "fsdp":
        return _fully_shard(model.to(device))
    # Ray's prepare_model wraps in DDP only when there are several workers.
    return ray.train.torch.prepare_model(model, move_to_device=device, parallel_strategy="ddp")


def _fully_shard(model: torch.nn.Module) -> torch.nn.Module:
    # Ray's prepare_model refuses FSDP without a GPU, but torch's FSDP2 runs on CPU with gloo, so we
    # shard ourselves: one FSDP unit per decoder layer, then the root (embeddings, head, norms).
    from torch.distributed.fsdp import fully_shard

    no_split = set(getattr(_hf_model(model), "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in no_split:
            fully_shard(module)
    fully_shard(model)
    return model


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP/PEFT wrappers."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module without the DDP wrapper (FSDP2 and PEFT keep their own class)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if sync:
        yield
    elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield
