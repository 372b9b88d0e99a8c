"""Fine-tuned-looking checkpoints of the tiny model, made in milliseconds without training."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftray.config import build_spec, dump_spec


def state_of(ref: str | Path) -> dict[str, torch.Tensor]:
    """Full weights of a checkpoint (adapters merged into their base)."""
    from ftray.merge.run import load_weights

    return load_weights(str(ref))[0].state_dict()


def record_spec(out: Path, base: Path, methods: list) -> None:
    """Write the ftray_spec.yaml a training run leaves beside its checkpoint."""
    (out / "ftray_spec.yaml").write_text(dump_spec(build_spec({"model": {"name": str(base)}, "methods": methods})))


def full_checkpoint(base: Path, out: Path, seed: int, noise: float = 0.01) -> Path:
    """A full fine-tune of `base`: every weight moved by seeded noise."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    record_spec(out, base, ["full"])
    return out


def lora_checkpoint(base: Path, out: Path, seed: int, r: int = 4) -> Path:
    """A LoRA adapter on every linear layer of `base` with random (nonzero) A and B."""
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    record_spec(out, base, [{"name": "lora", "r": r, "alpha": 2 * r, "target_modules": "all-linear"}])
    return out
