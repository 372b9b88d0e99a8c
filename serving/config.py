"""The serve config: which models to serve, how, and behind which HTTP settings.

A YAML file such as ``serving/configs/smollm2.yaml`` is validated into `ServeConfig` before Ray
starts (`load_serve_config`); every error names the field (``models.0.num_replicas``) and says what
to do. `serving.app.build_app` turns a validated config into a Ray Serve application.

    python -c "from serving.config import load_serve_config as l; print(l('serving/configs/smollm2.yaml'))"
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

API_KEY_ENV = "FTRAY_API_KEY"


class ServeConfigError(ValueError):
    """The serve config is invalid; the message names the field and the fix."""


class ModelConfig(BaseModel):
    """One served model: a Serve deployment with its own replicas, plus LoRA adapters mounted on it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        description="Name clients pass as `model`; adapters are served as `name:adapter`. No ':'."
    )
    path: str = Field(
        description="Model alias (smollm2-135m), Hugging Face directory or hub id, or an ftray "
        "checkpoint dir (an adapter dir loads its base with the adapter merged in)."
    )
    engine: Literal["hf", "vllm"] = Field(
        "hf",
        description="`hf`: ftray's transformers engine (batched, streaming, multi-LoRA). `vllm`: "
        "Ray Serve LLM with vLLM (not available yet: refused at build time).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights dtype. `auto`: fp32 weights with bf16 autocast where the device "
        "supports it natively (ftray.models.default_autocast_dtype); `float32`: exact fp32.",
    )
    num_replicas: int = Field(1, ge=1, description="Replicas of this model's deployment.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per replica (Ray resource).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica (Ray resource).")
    max_ongoing_requests: int = Field(
        16, ge=1, description="Requests one replica works on at once; must be >= max_batch_size."
    )
    max_queued_requests: int = Field(
        -1, ge=-1, description="Requests waiting per deployment before Serve answers 503; -1: no limit."
    )
    max_batch_size: int = Field(8, ge=1, description="Most sequences decoded together in one batch.")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, description="How long a batch waits to fill up before it starts decoding."
    )
    default_max_tokens: int = Field(
        256, ge=1, description="Tokens generated when a chat request sets no max_tokens."
    )
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapters mounted on this base, served as `name:adapter`: adapter name -> "
        "PEFT adapter dir (e.g. an ftray run's final/).",
    )

    @field_validator("name")
    @classmethod
    def _name_has_no_colon(cls, name: str) -> str:
        if not name or ":" in name:
            raise ValueError(f"model name {name!r} must be non-empty without ':' (used for base:adapter)")
        return name

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, adapters: dict[str, str]) -> dict[str, str]:
        for name in adapters:
            if not name or ":" in name or name == "__base__":
                raise ValueError(f"adapter name {name!r} must be non-empty, without ':' and not '__base__'")
        return adapters

    @model_validator(mode="after")
    def _batch_fits(self) -> ModelConfig:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}), or batches can never fill"
            )
        return self


class ServeConfig(BaseModel):
    """A serve config: models behind one OpenAI-compatible ingress."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelConfig] = Field(min_length=1, description="Models to serve (at least one).")
    api_key: str | None = Field(
        None,
        description=f"Bearer token clients must send; null: ${API_KEY_ENV} if set, else no auth.",
    )
    host: str = Field("127.0.0.1", description="HTTP host Serve's proxy binds (0.0.0.0 for all).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of Serve's proxy.")
    route_prefix: str = Field("/", description="URL prefix of the app, e.g. / or /ftray.")
    ingress_num_cpus: float = Field(
        0.0, ge=0, description="CPUs reserved for the ingress replica (0 so it always schedules)."
    )

    @field_validator("route_prefix")
    @classmethod
    def _prefix_starts_with_slash(cls, prefix: str) -> str:
        if not prefix.startswith("/"):
            raise ValueError(f"route_prefix {prefix!r} must start with '/'")
        return prefix

    @model_validator(mode="after")
    def _unique_names(self) -> ServeConfig:
        seen: set[str] = set()
        for model in self.models:
            if model.name in seen:
                raise ValueError(f"model name {model.name!r} is listed twice; names must be unique")
            seen.add(model.name)
        return self

    def resolved_api_key(self) -> str | None:
        """The configured key, else $FTRAY_API_KEY, else None (no auth)."""
        return self.api_key or os.environ.get(API_KEY_ENV) or None

    def served_names(self) -> list[str]:
        """Every name /v1/models lists: each model, then each `model:adapter`."""
        return [n for m in self.models for n in [m.name, *(f"{m.name}:{a}" for a in m.adapters)]]


def parse_serve_config(raw: dict) -> ServeConfig:
    """Validate a config dict; pydantic errors become one ServeConfigError naming each field."""
    if not isinstance(raw, dict):
        raise ServeConfigError(f"a serve config is a mapping with a `models` list, got {type(raw).__name__}")
    try:
        return ServeConfig.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"]) or "(top level)"
            lines.append(f"{field}: {e['msg']}")
        raise ServeConfigError("invalid serve config:\n  " + "\n  ".join(lines)) from None


def load_serve_config(path: str | Path) -> ServeConfig:
    """Read and validate a serve config YAML file, then check that local paths exist."""
    p = Path(path)
    if not p.is_file():
        raise ServeConfigError(f"serve config {str(p)!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ServeConfigError(f"serve config {str(p)!r} is not valid YAML: {err}") from None
    config = parse_serve_config(raw)
    check_paths(config)
    return config


def check_paths(config: ServeConfig) -> None:
    """Refuse missing local model dirs and adapter dirs without adapter_config.json, naming the field."""
    for i, model in enumerate(config.models):
        path = Path(model.path).expanduser()
        if model.path.startswith(("/", ".", "~")) and not path.exists():
            raise ServeConfigError(f"models.{i}.path: {model.path!r} does not exist")
        for name, adapter in model.adapters.items():
            if not (Path(adapter).expanduser() / "adapter_config.json").is_file():
                raise ServeConfigError(
                    f"models.{i}.adapters.{name}: {adapter!r} is not a PEFT adapter dir "
                    "(no adapter_config.json); point at an ftray run's final/ or a save_pretrained adapter"
                )
