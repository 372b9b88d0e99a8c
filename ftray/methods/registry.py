"""The method registry: name → Method class, filled by the `@register` decorator in each method file."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ftray.methods.base import Method

REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under `cls.name`."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"method {cls.__name__}: name {cls.name!r} is empty or already registered")
    REGISTRY[cls.name] = cls
    return cls


def validate_method_entries(entries: list[Any]) -> list[dict[str, Any]]:
    """Check `methods:` entries against the registry and each Config; return them with defaults filled."""
    out, errors = [], []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or "name" not in entry:
            errors.append(f"methods.{i}: expected {{name: <method>, ...fields}}, got {entry!r}")
            continue
        fields = dict(entry)
        name = fields.pop("name")
        if name not in REGISTRY:
            errors.append(f"methods.{i}.name: unknown method {name!r}; known: {', '.join(sorted(REGISTRY))}")
            continue
        try:
            cfg = REGISTRY[name].Config.model_validate(fields)
        except ValidationError as err:
            for e in err.errors():
                loc = ".".join(str(p) for p in e["loc"])
                errors.append(f"methods.{i}.{loc}: {e['msg']} (method {name!r})")
            continue
        out.append({"name": name, **cfg.model_dump(mode="json")})
    names = [e["name"] for e in out]
    for i, name in enumerate(names):
        if names.count(name) > 1 and names.index(name) == i:
            errors.append(f"methods: {name!r} is listed more than once")
        for other in REGISTRY[name].incompatible:
            if other in names:
                errors.append(f"methods.{i}: {name!r} cannot be combined with {other!r}")
    if not errors and sum(m.phases() is not None for m in build_methods(out)) > 1:
        errors.append("methods: at most one method may define training phases")
    if not errors and sum("criterion" in REGISTRY[n].hooks() for n in names) > 1:
        errors.append("methods: at most one method may replace the loss (define `criterion`)")
    if errors:
        raise ValueError("\n".join(errors))
    return out


def build_methods(entries: list[dict[str, Any]]) -> list[Method]:
    """Instantiate validated `methods:` entries, in order."""
    methods = []
    for entry in entries:
        fields = {k: v for k, v in entry.items() if k != "name"}
        cls = REGISTRY[entry["name"]]
        methods.append(cls(cls.Config.model_validate(fields)))
    return methods
