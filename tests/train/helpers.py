"""Running real Ray Train jobs on the tiny model from tests."""

import json
from pathlib import Path

from ftray.config import build_spec
from ftray.train.trainer import run


def tiny_spec(model_dir: Path, out: Path, name: str, **sections):
    """A spec for the tiny model on bundled arithmetic; `sections` override whole spec sections' fields."""
    raw = {
        "model": {"name": str(model_dir)},
        "data": {"source": "bundled:arithmetic", "max_len": 192, "max_samples": 256, "eval_max_samples": 32},
        "methods": [{"name": "lora", "r": 4, "target_modules": "all-linear"}],
        "train": {"max_steps": 8, "lr": 2e-3, "batch_size": 4, "log_every": 4, "warmup_ratio": 0.0},
        "scaling": {"num_workers": 1},
        "output": {"dir": str(out), "name": name},
    }
    for section, fields in sections.items():
        raw[section] = {**raw.get(section, {}), **fields} if isinstance(fields, dict) else fields
    return build_spec(raw)


def train_tiny(model_dir: Path, out: Path, name: str, **sections):
    """Train a tiny spec to the end on the running Ray; returns the TrainResult."""
    return run(tiny_spec(model_dir, out, name, **sections))


def logged(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """step → metric from rank 0's metrics.jsonl (the last value wins after a resume)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def events(run_dir: Path) -> list[dict]:
    """The {"event": ...} records of metrics.jsonl (e.g. resumes)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "event" in r]
