"""Full fine-tuning: every parameter is trained. The baseline every other method is compared with."""

from __future__ import annotations

from ftray.methods.base import Method
from ftray.methods.registry import register


@register
class Full(Method):
    """Train all weights with the plain loss; no hook is needed."""

    name = "full"
    tasks = ("causal_lm", "classification", "retrieval", "vision_language")  # vision_language: what trains is task.vlm's groups
    paper = "Standard supervised fine-tuning (all parameters)"
    incompatible = ("lora",)
