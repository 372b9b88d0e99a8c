"""Tune spaces: a YAML file of run-spec paths → Ray Tune domains, plus search defaults.

    metric: eval_loss          # reported by the training loop
    mode: min
    num_samples: 8
    scheduler: {type: asha, grace_period: 20, reduction_factor: 2}
    space:
      train.lr: {loguniform: [1.0e-5, 1.0e-3]}
      method.r: {choice: [4, 8, 16]}     # `method.` = this space's method, wherever it sits in `methods`

Keys are dotted run-spec paths (`--set` syntax). A path the run spec lacks fails with that path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import tune

from ftray.config import RunSpec, SpecError, build_spec

DOMAINS = {
    "choice": lambda v: tune.choice(v),
    "grid": lambda v: tune.grid_search(v),
    "uniform": lambda v: tune.uniform(*v),
    "loguniform": lambda v: tune.loguniform(*v),
    "randint": lambda v: tune.randint(*v),
}


class SchedulerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["asha", "fifo"] = Field("asha", description="ASHA early stopping, or run every trial to the end.")
    grace_period: int = Field(10, ge=1, description="ASHA: steps before a trial can be stopped.")
    reduction_factor: int = Field(2, ge=2, description="ASHA: keep 1/reduction_factor of trials per rung.")


class TuneSpace(BaseModel):
    """A parsed tune space file."""

    model_config = ConfigDict(extra="forbid")
    metric: str = Field("eval_loss", description="Metric reported by the loop to optimise.")
    mode: Literal["min", "max"] = Field("min", description="Minimise or maximise `metric`.")
    num_samples: int = Field(8, ge=1, description="Trials (times each grid point).")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    space: dict[str, dict[str, list]] = Field(description="Run-spec path → {choice|grid|uniform|loguniform|randint: values}.")

    @field_validator("space")
    @classmethod
    def _known_domains(cls, space: dict[str, dict[str, list]]) -> dict[str, dict[str, list]]:
        for path, dom in space.items():
            if len(dom) != 1 or next(iter(dom)) not in DOMAINS:
                raise ValueError(f"{path}: expected one of {sorted(DOMAINS)} with a list of values, got {dom!r}")
        return space


def load_space(path: str | Path) -> TuneSpace:
    """Parse a tune space YAML file."""
    try:
        return TuneSpace.model_validate(yaml.safe_load(Path(path).read_text()))
    except Exception as err:  # pydantic or YAML: either way the user needs the file name
        raise SpecError(f"{path}: {err}") from None


def method_name(path: str | Path) -> str:
    """The method a space belongs to: its file stem."""
    return Path(path).stem


def resolve_path(key: str, spec: RunSpec, method: str) -> str:
    """Turn `method.<field>` into `methods.<i>.<field>` for the spec's entry of `method`."""
    if not key.startswith("method."):
        return key
    names = [m["name"] for m in spec.methods]
    if method not in names:
        raise SpecError(f"{key}: the run spec has no method {method!r} (methods: {names})")
    return f"methods.{names.index(method)}.{key.removeprefix('method.')}"


def param_space(space: TuneSpace, spec: RunSpec, method: str) -> dict[str, Any]:
    """Ray Tune domains keyed by resolved run-spec path; unknown paths fail with the path."""
    out = {}
    for key, dom in space.space.items():
        path = resolve_path(key, spec, method)
        check_path(spec, path)
        kind, values = next(iter(dom.items()))
        out[path] = DOMAINS[kind](values)
    return out


def check_path(spec: RunSpec, path: str) -> None:
    """Fail unless `path` names a field of the run spec (or of the method entry it points into)."""
    node: Any = spec.model_dump()
    for part in path.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise SpecError(f"tune space: {path!r} is not a field of the run spec")


def sample_overrides(space: dict[str, Any]) -> list[str]:
    """One random draw from a param space as `--set` overrides (grid axes take their first value)."""
    return overrides_of({path: dom["grid_search"][0] if isinstance(dom, dict) else dom.sample() for path, dom in space.items()})


def overrides_of(config: dict[str, Any]) -> list[str]:
    """A trial's config (run-spec path → value) as `--set` overrides."""
    out = []
    for path, value in config.items():
        value = value.item() if hasattr(value, "item") else value  # numpy scalars from Tune's samplers
        out.append(f"{path}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    return out


def sample_spec(space: dict[str, Any], base: RunSpec) -> RunSpec:
    """Apply one draw of `space` to `base` and validate it as a full run spec."""
    return build_spec(base.model_dump(mode="json"), sample_overrides(space))
