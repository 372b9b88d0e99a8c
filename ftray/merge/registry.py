"""Merge methods: a small registered class each, with a typed `Config`, like mergekit's.

Every method here is linear in its ingredients, so a merge streams: the runner adds one checkpoint at
a time into a float64 sum and asks the method for each tensor once, from that sum and the base's
tensor. Float64 makes the paper's identities exact (a uniform soup of copies is bit-identical to the
copy, task arithmetic with λ=1 returns the checkpoint) at twice an fp32 model's memory.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict


class MergeConfig(BaseModel):
    """Base of every merge method's config: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid")


class MergeMethod:
    """A linear merge: `tensor(key, summed, base, count)` gives one merged tensor."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    needs_base: ClassVar[bool] = True
    Config: ClassVar[type[MergeConfig]] = MergeConfig

    def __init__(self, config: MergeConfig, count: int, num_layers: int) -> None:
        self.config, self.count, self.num_layers = config, count, num_layers

    def resolved(self) -> dict:
        """The parameters actually used (defaults that depend on the inputs filled in), for merge.yaml."""
        return self.config.model_dump()

    def tensor(self, key: str, summed: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        """The merged tensor for `key` from Σ_t θ_t[key] (float64) and θ_base[key] (float64, or None)."""
        raise NotImplementedError


MERGES: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator adding a merge method to `MERGES` under `cls.name`."""
    if not cls.name or cls.name in MERGES:
        raise ValueError(f"merge method {cls.__name__}: name {cls.name!r} is empty or already registered")
    MERGES[cls.name] = cls
    return cls
