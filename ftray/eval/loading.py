"""Load what ftray trained (or any model name) for evaluation and serving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from transformers import AutoTokenizer

from ftray.data.templates import use_chat_template
from ftray.models import load_model, load_tokenizer


def base_model_of(ckpt: Path) -> tuple[str, str | None]:
    """The base model name (and gguf file) recorded in a checkpoint's run spec or adapter config."""
    spec_file = ckpt / "ftray_spec.yaml"
    if spec_file.exists():
        model = yaml.safe_load(spec_file.read_text())["model"]
        return model["name"], model.get("gguf_file")
    adapter = yaml.safe_load((ckpt / "adapter_config.json").read_text())  # JSON is YAML
    return adapter["base_model_name_or_path"], None


def task_of(path: str | Path) -> tuple[str, dict[str, Any]]:
    """The task type of a checkpoint and the `from_pretrained` kwargs it needs (e.g. num_labels)."""
    spec_file = Path(path) / "ftray_spec.yaml"
    task = (yaml.safe_load(spec_file.read_text()).get("task") or {}) if spec_file.exists() else {}
    kind = task.get("type", "causal_lm")
    return kind, ({"num_labels": task["num_labels"]} if kind == "classification" and task.get("num_labels") else {})


def chat_template_of(path: str | Path) -> str:
    """The `data.chat_template` a checkpoint was trained with ('auto' for anything else)."""
    spec_file = Path(path) / "ftray_spec.yaml"
    data = (yaml.safe_load(spec_file.read_text()).get("data") or {}) if spec_file.exists() else {}
    return data.get("chat_template", "auto")


def load_checkpoint_tokenizer(path: str | Path) -> Any:
    """The tokenizer `load_checkpoint` would return, without loading any weights.

    Its chat template is the one the checkpoint was trained with (`use_chat_template`), so generation,
    serving and held-out scoring render prompts exactly as training did.
    """
    p = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(p) if (p / "adapter_config.json").exists() else load_tokenizer(str(path))
    return use_chat_template(tokenizer, chat_template_of(p))


def load_checkpoint(path: str | Path, merge: bool = True) -> tuple[Any, Any]:
    """(model, tokenizer) from a checkpoint dir (PEFT adapter or full), or from a model name/alias."""
    p = Path(path)
    task, kwargs = task_of(p)
    if (p / "adapter_config.json").exists():
        from peft import PeftModel

        name, gguf = base_model_of(p)
        model = PeftModel.from_pretrained(load_model(name, gguf_file=gguf, task=task, **kwargs), p)
        return (model.merge_and_unload() if merge else model), load_checkpoint_tokenizer(p)
    return load_model(str(path), task=task, **kwargs), load_checkpoint_tokenizer(path)
