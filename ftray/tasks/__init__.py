"""Task types: how rows become batches, how a batch becomes a loss, and how a trained model is scored.

The loop and the driver ask the run's task (`get_task(spec)`) for these and never branch on the
task's name; a method's hooks see the task's batch and output (`out.logits`, and for
classification and retrieval `out.features`, the pooled representation the head reads).

| task.type      | model class                        | batch                                  | loss                    |
| -------------- | ---------------------------------- | -------------------------------------- | ----------------------- |
| causal_lm      | AutoModelForCausalLM               | input_ids, labels [B, T] (-100 = none) | next-token CE on labels |
| classification | AutoModelForSequenceClassification | input_ids [B, T], labels [B]           | CE over classes         |
| retrieval      | AutoModel + pooling                | queries then passages, labels [B]      | InfoNCE, in-batch negs  |
| vision_language| AutoModelForImageTextToText        | input_ids, labels, pixel_values, ...   | next-token CE on labels |

A task may also define `param_groups(model)` (optimizer groups when no method gives any) and a
`processor` (saved in checkpoints instead of the tokenizer); vision_language does both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ftray.tasks.causal_lm import CausalLM
from ftray.tasks.classification import Classification
from ftray.tasks.retrieval import Retrieval
from ftray.tasks.vision_language import VisionLanguage

if TYPE_CHECKING:
    from ftray.config import RunSpec

TASKS = {"causal_lm": CausalLM, "classification": Classification, "retrieval": Retrieval, "vision_language": VisionLanguage}


def get_task(spec: RunSpec) -> CausalLM | Classification | Retrieval | VisionLanguage:
    """The task object of `spec.task.type`, bound to `spec`."""
    return TASKS[spec.task.type](spec)


__all__ = ["TASKS", "CausalLM", "Classification", "Retrieval", "VisionLanguage", "get_task"]
