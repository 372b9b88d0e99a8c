"""The serve config: which models to serve, how, and behind which HTTP settings.

A YAML file such as ``serving/configs/smollm2.yaml`` is validated into `ServeConfig` before Ray
starts (`load_serve_config`); every error names the field (``models.0.num_replicas``) and says what
to do. `serving.app.build_app` turns a validated config into a Ray Serve application.

    python -c "from serving.config import load_serve_config as l; print(l('serving/configs/smollm2.yaml'))"
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from serving.images import ImageLimits

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
        description="`hf`: ftray's transformers engine (batched, streaming, multi-LoRA, ensemble "
        "members). `vllm`: vLLM through Ray Serve LLM (`pip install` per the Makefile's setup; "
        "serving/vllm_engine.py).",
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
        "PEFT adapter dir (e.g. an ftray run's final/), or -> {path: DIR, merge: true} (see merge_adapters).",
    )
    merge_adapters: list[str] = Field(
        default_factory=list,
        description="engine vllm: adapters merged into a full copy of the base at load and served by their "
        "own replica, for kinds vLLM cannot serve as LoRA (DoRA). Set by `merge: true` on an adapter entry.",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="engine vllm: extra vLLM engine arguments (e.g. {enforce_eager: true}), over ftray's "
        "defaults (serving.vllm_engine.DEFAULT_ENGINE_KWARGS).",
    )
    images: ImageLimits = Field(
        default_factory=ImageLimits,
        description="engine hf, vision-language models: limits on image_url inputs (bytes, pixels, images per "
        "request) and the local directories clients may name (serving/images.py).",
    )

    @model_validator(mode="before")
    @classmethod
    def _adapter_entries(cls, raw: Any) -> Any:
        # `adapters: {a: {path: DIR, merge: true}}` is stored as `adapters: {a: DIR}` plus
        # `merge_adapters: [a]`, so code reading `adapters` always sees name -> path.
        if not isinstance(raw, dict) or not isinstance(raw.get("adapters"), dict):
            return raw
        adapters, merged = {}, list(raw.get("merge_adapters") or [])
        for name, entry in raw["adapters"].items():
            if isinstance(entry, dict):
                unknown = set(entry) - {"path", "merge"}
                if unknown or "path" not in entry:
                    raise ValueError(f"adapter {name!r}: an entry is a path or {{path: DIR, merge: bool}}, "
                                     f"got keys {sorted(entry)}")
                if entry.get("merge") and name not in merged:
                    merged.append(name)
                entry = entry["path"]
            adapters[name] = entry
        return {**raw, "adapters": adapters, "merge_adapters": merged}

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
        if missing := set(self.merge_adapters) - set(self.adapters):
            raise ValueError(f"merge_adapters {sorted(missing)} are not listed under adapters")
        if self.merge_adapters and self.engine != "vllm":
            raise ValueError("merge: true is for engine vllm; engine hf serves an adapter merged as its own "
                             "model entry (path: the adapter dir)")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}), or batches can never fill"
            )
        return self


class ExpertConfig(BaseModel):
    """One tuned small model of a fusion ensemble (fine-tuned from the ensemble's `small_base`)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="The tuned small model: an ftray run's final/, a checkpoint or adapter dir.")
    alpha: float = Field(1.0, description="Static fusion weight (proxy tuning uses 1.0); dynamic fusion ignores it.")


class EnsembleConfig(BaseModel):
    """A logit-fusion ensemble: a large model steered by (expert - small base) logit deltas at every step."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["fusion"] = Field("fusion", description="Ensemble kind: `fusion` (this) or `llmboost` (BoostEnsembleConfig).")
    name: str = Field(description="Name clients pass as `model`. No ':'.")
    large: str = Field(description="The large model (alias, HF dir or checkpoint); it decodes, the experts steer.")
    small_base: str = Field(description="The untuned small model the experts were fine-tuned from.")
    experts: list[ExpertConfig] = Field(min_length=1, description="Tuned small models (same tokenizer as all members).")
    fusion: Literal["static", "dynamic"] = Field(
        "dynamic",
        description="`static`: logits = large + sum(alpha_i * (expert_i - base)) (proxy tuning). `dynamic`: "
        "alpha chosen per step and row by Dynamic Logit Fusion's KL matching (one expert active per step).",
    )
    alpha_max: float = Field(2.0, gt=0, description="Dynamic fusion searches alpha in [0, alpha_max] (paper: 2.0).")
    alpha_step: float = Field(0.1, gt=0, description="Grid step of the dynamic search (paper: 0.1, 21 values).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights dtype of every member.")
    num_replicas: int = Field(1, ge=1, description="Ensemble replicas; each owns its member actors.")
    large_num_cpus: float = Field(1.0, gt=0, description="CPUs of the actor holding the large model.")
    small_num_cpus: float = Field(1.0, gt=0, description="CPUs of the actor holding the small base and its experts.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs of each member actor.")
    max_ongoing_requests: int = Field(16, ge=1, description="Requests one ensemble replica works on at once.")
    max_batch_size: int = Field(8, ge=1, description="Most sequences decoded together in one batch.")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="How long a batch waits to fill before decoding.")
    default_max_tokens: int = Field(256, ge=1, description="Tokens generated when a chat request sets no max_tokens.")

    @field_validator("name")
    @classmethod
    def _name_has_no_colon(cls, name: str) -> str:
        if not name or ":" in name:
            raise ValueError(f"ensemble name {name!r} must be non-empty without ':'")
        return name

    def member_paths(self) -> dict[str, str]:
        """Field path -> model path of every member (for checks and errors)."""
        return {"large": self.large, "small_base": self.small_base,
                **{f"experts.{i}.path": e.path for i, e in enumerate(self.experts)}}


class BoostEnsembleConfig(BaseModel):
    """An LLMBoost chain served as one model: one actor per member, decoded through a Ray Compiled Graph (serving/boost.py)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["llmboost"] = Field(description="Ensemble kind: `llmboost` (this) or `fusion` (EnsembleConfig).")
    name: str = Field(description="Name clients pass as `model`. No ':'.")
    path: str = Field(description="The chain directory: `ftray boost`'s <name>-chain/ or an llmboost run's final/.")
    pipeline: bool = Field(
        True,
        description="true: member m runs its layers while member m-1 runs the same segment and waits only at each "
        "CMA layer for m-1's state (per-segment graph nodes); false: member m starts when m-1 finished its whole "
        "forward. Same tokens either way.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype of every member (`auto`: fp32 with bf16 autocast where supported).")
    num_replicas: int = Field(1, ge=1, description="Chain replicas; each owns one actor per member.")
    member_num_cpus: float = Field(1.0, gt=0, description="CPUs reserved for each member actor (Ray resource).")
    member_num_threads: int | None = Field(
        None, ge=1, description="Torch threads of each member actor; null: member_num_cpus rounded down (at least 1).")
    max_ongoing_requests: int = Field(16, ge=1, description="Requests one chain replica works on at once.")
    max_batch_size: int = Field(8, ge=1, description="Most sequences decoded together in one batch.")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="How long a batch waits to fill before decoding.")
    default_max_tokens: int = Field(256, ge=1, description="Tokens generated when a chat request sets no max_tokens.")

    @field_validator("name")
    @classmethod
    def _name_has_no_colon(cls, name: str) -> str:
        if not name or ":" in name:
            raise ValueError(f"ensemble name {name!r} must be non-empty without ':'")
        return name

    @model_validator(mode="after")
    def _batch_fits(self) -> BoostEnsembleConfig:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or batches can never fill")
        return self

    def threads(self) -> int:
        """Torch threads per member actor."""
        return self.member_num_threads or max(1, int(self.member_num_cpus))

    def member_paths(self) -> dict[str, str]:
        """Field path -> model path (for checks and errors)."""
        return {"path": self.path}


def _ensemble_kind(raw: Any) -> str:
    # `kind` defaults to fusion, so configs written before LLMBoost existed still validate.
    return (raw.get("kind") if isinstance(raw, dict) else getattr(raw, "kind", None)) or "fusion"


AnyEnsemble = Annotated[Union[Annotated[EnsembleConfig, Tag("fusion")], Annotated[BoostEnsembleConfig, Tag("llmboost")]],
                        Discriminator(_ensemble_kind)]
_ENSEMBLE_KINDS = ("fusion", "llmboost")


class ServeConfig(BaseModel):
    """A serve config: models behind one OpenAI-compatible ingress."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelConfig] = Field(default_factory=list, description="Models to serve.")
    ensembles: list[AnyEnsemble] = Field(
        default_factory=list, description="Ensembles to serve: logit fusion (kind: fusion, the default) or LLMBoost chains (kind: llmboost).")
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
        if not self.models and not self.ensembles:
            raise ValueError("list at least one entry under `models` or `ensembles`")
        seen: set[str] = set()
        for model in [*self.models, *self.ensembles]:
            if model.name in seen:
                raise ValueError(f"model name {model.name!r} is listed twice; names must be unique")
            seen.add(model.name)
        return self

    def resolved_api_key(self) -> str | None:
        """The configured key, else $FTRAY_API_KEY, else None (no auth)."""
        return self.api_key or os.environ.get(API_KEY_ENV) or None

    def served_names(self) -> list[str]:
        """Every name /v1/models lists: each model, then each `model:adapter`."""
        names = [n for m in self.models for n in [m.name, *(f"{m.name}:{a}" for a in m.adapters)]]
        return names + [e.name for e in self.ensembles]


def parse_serve_config(raw: dict) -> ServeConfig:
    """Validate a config dict; pydantic errors become one ServeConfigError naming each field."""
    if not isinstance(raw, dict):
        raise ServeConfigError(f"a serve config is a mapping with a `models` list, got {type(raw).__name__}")
    try:
        return ServeConfig.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = list(e["loc"])
            if len(loc) > 2 and loc[0] == "ensembles" and loc[2] in _ENSEMBLE_KINDS:
                del loc[2]  # the union's tag: `ensembles.0.path`, not `ensembles.0.llmboost.path`
            field = ".".join(str(p) for p in loc) or "(top level)"
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


def check_chain_dir(path: Path, field: str) -> None:
    """Refuse a dir that is not an LLMBoost chain (config.json of model_type ftray_llmboost, manifest.json)."""
    import json

    config = path / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    if model_type != "ftray_llmboost" or not (path / "manifest.json").is_file():
        raise ServeConfigError(f"{field}: {str(path)!r} is not an LLMBoost chain directory (needs config.json with "
                               "model_type 'ftray_llmboost' and manifest.json); point at `ftray boost`'s <name>-chain/ "
                               "or an llmboost run's final/")


def check_paths(config: ServeConfig) -> None:
    """Refuse missing local model dirs, adapter dirs without adapter_config.json and non-chain llmboost dirs, naming the field."""
    for i, ensemble in enumerate(config.ensembles):
        for field, path in ensemble.member_paths().items():
            if path.startswith(("/", ".", "~")) and not Path(path).expanduser().exists():
                raise ServeConfigError(f"ensembles.{i}.{field}: {path!r} does not exist")
            if ensemble.kind == "llmboost" and Path(path).expanduser().is_dir():
                check_chain_dir(Path(path).expanduser(), f"ensembles.{i}.{field}")
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
