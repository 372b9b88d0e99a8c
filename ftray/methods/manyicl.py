"""ManyICL — "You Only Fine-tune Once: Many-Shot In-Context Fine-Tuning for Large Language Model" (He, Peng,
Jiang, Go; 2506.11103; v2 "ManyICFT").

Idea: train one model on many-shot in-context sequences — many (input, answer) examples of one task back to
back — with the loss on EVERY answer in the context rather than only the last one, so one long forward
pass supervises K predictions made with 0, 1, …, K−1 shots; at test time the model is prompted with many
shots of the task.

    methods: [{name: manyicl, task_field: category}]    # any rows; data.max_len = the sequence length

Decisions ([inf] in the spec unless said otherwise):
- A sequence is a chat conversation: each example's user turn(s) and assistant reply as alternating
  turns (the chat form of the spec's "Input: … Output: …" blocks), so the run's chat template renders it
  and every assistant turn is labelled by ftray's tokenizer (which supervises all assistant turns,
  end-of-turn markup included); everything else is masked. An example's system message is kept only when it
  opens the sequence.
- Packing: per task (the `task_field` column; all rows are one task without it) the examples are shuffled
  and appended until the next one would pass data.max_len tokens of the rendered sequence; an example
  longer than data.max_len on its own is dropped (counted in the report). Sequences of all tasks are
  shuffled into one stream ("fine-tune once"). Lengths come from the run's tokenizer and chat template
  and every sequence is re-measured whole, so none is truncated.
- The paper reshuffles every epoch so neighbours change; prepare_data runs once per run, so `shuffles`
  differently shuffled packings are emitted up front instead (1 = each example once).
- `targets: last` is the spec's "mask last target" ablation: `corrupt_batch` keeps the labels of each
  row's last assistant turn only (the last contiguous run of labelled tokens).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from ftray.data.formats import format_of_columns, to_messages
from ftray.data.templates import render_chat
from ftray.data.tokenize import IGNORE_INDEX
from ftray.methods.base import Context, Method, MethodConfig, stable_seed
from ftray.methods.registry import register

if TYPE_CHECKING:
    import ray.data

    from ftray.config import RunSpec


class ManyICLConfig(MethodConfig):
    targets: Literal["all", "last"] = Field("all", description="Put the loss on every answer in the sequence (the "
                                            "paper's objective) or only on the last one (the 'mask last target' ablation).")
    task_field: str = Field("source", description="Column naming each row's task; a sequence holds one task only. "
                            "Rows without it are all one task.")
    shuffles: int = Field(1, ge=1, description="Independently shuffled packings of the data to emit (the paper "
                          "reshuffles every epoch so that an example's neighbours change).")


def example_messages(row: dict, fmt: str, first: bool) -> list[dict]:
    """The chat turns of one example; its system message only when it opens a sequence."""
    messages = to_messages(row, fmt)[0]
    return messages if first else [m for m in messages if m["role"] != "system"]


def n_tokens(messages: list[dict], tokenizer: Any, chat_template: str) -> int:
    """Tokens of `messages` rendered with the run's chat template (as training tokenizes them)."""
    return len(tokenizer(render_chat(messages, tokenizer, chat_template), add_special_tokens=False)["input_ids"])


def pack_lengths(lengths: list[int], overhead: int, max_len: int) -> tuple[list[list[int]], list[int]]:
    """Greedy packing: ([indices of each sequence], [dropped indices]); a sequence's estimated length is
    overhead + the sum of its examples' lengths (each example's own rendering minus the overhead)."""
    seqs: list[list[int]] = []
    dropped: list[int] = []
    cur: list[int] = []
    used = overhead
    for i, n in enumerate(lengths):
        if overhead + n > max_len:
            dropped.append(i)
            continue
        if cur and used + n > max_len:
            seqs.append(cur)
            cur, used = [], overhead
        cur.append(i)
        used += n
    if cur:
        seqs.append(cur)
    return seqs, dropped


def pack_task(rows: list[dict], fmt: str, tokenizer: Any, chat_template: str, max_len: int) -> tuple[list[list[dict]], int]:
    """Many-shot conversations (lists of messages) of one task's rows, each at most max_len tokens; (seqs, dropped)."""
    if not rows:
        return [], 0
    alone = [n_tokens(example_messages(r, fmt, True), tokenizer, chat_template) for r in rows]
    # what one rendering adds once per conversation (a default system prompt, a begin-of-text token): the
    # sum of two examples rendered apart minus the two rendered together
    if len(rows) > 1:
        pair = n_tokens(example_messages(rows[0], fmt, True) + example_messages(rows[1], fmt, False), tokenizer, chat_template)
        overhead = max(0, alone[0] + alone[1] - pair)
    else:
        overhead = 0
    seqs, dropped = pack_lengths([n - overhead for n in alone], overhead, max_len)
    out: list[list[dict]] = []
    queue = list(seqs)
    while queue:  # the estimate can be off by a merged token at a turn boundary: re-measure, spill the tail
        idx = queue.pop(0)
        messages = [m for k, i in enumerate(idx) for m in example_messages(rows[i], fmt, k == 0)]
        if n_tokens(messages, tokenizer, chat_template) <= max_len:
            out.append(messages)
        elif len(idx) > 1:
            queue[:0] = [idx[:-1], idx[-1:]]
        else:
            dropped.append(idx[0])
    return out, len(dropped)


@register
class ManyICL(Method):
    """Pack many examples of a task into one chat sequence and learn every answer in it."""

    name = "manyicl"
    paper = "He et al. 2025, You Only Fine-tune Once: Many-Shot In-Context Fine-Tuning for Large Language Model (2506.11103)"
    Config = ManyICLConfig
    tasks = ("causal_lm",)
    # single-category sequences of the bundled factual QA; 256 tokens hold ~10 of its examples (~50 sequences),
    # so a 20-step bench (160 sequences) goes ~3 times over the data: three packings, new neighbours each time
    bench = {"data": {"source": "bundled:factual_qa", "max_len": 256},
             "methods": [{"name": "manyicl", "task_field": "category", "shuffles": 3}]}
    bench_metrics = ("ftray.eval.context:manyicl_metrics",)

    def check(self, spec: RunSpec) -> None:
        """The method packs rows itself; ftray's packer would join sequences and blur the last answer."""
        if spec.data.packing:
            raise ValueError("manyicl packs many examples into each row itself; set data.packing=false")
        if spec.data.train_on_prompt:
            raise ValueError("manyicl puts the loss on the answers only; set data.train_on_prompt=false")

    def prepare_data(self, ds: ray.data.Dataset, ctx: Context) -> ray.data.Dataset:
        """Rows → many-shot conversations, packed per task up to data.max_len and shuffled together."""
        import ray.data

        c, d = self.config, ctx.spec.data
        fmt = d.format if d.format != "auto" else format_of_columns(ds.columns())
        rows = ds.take_all()  # packing is a global decision over small text rows
        by_task: dict[str, list[dict]] = {}
        for r in rows:
            by_task.setdefault(str(r.get(c.task_field, "")), []).append(r)
        rng = random.Random(stable_seed("manyicl", ctx.spec.train.seed))
        out: list[dict] = []
        dropped = 0
        for _ in range(c.shuffles):
            for task, task_rows in sorted(by_task.items()):
                order = list(task_rows)
                rng.shuffle(order)
                seqs, n_drop = pack_task(order, fmt, ctx.tokenizer, d.chat_template, d.max_len)
                dropped += n_drop
                out += [{"messages": s, "task": task, "shots": sum(m["role"] == "assistant" for m in s)} for s in seqs]
        rng.shuffle(out)
        shots = sorted(r["shots"] for r in out)
        ctx.report.update({
            "tasks": {t: len(v) for t, v in sorted(by_task.items())}, "sequences": len(out), "dropped_too_long": dropped,
            "shots_min": shots[0] if shots else 0, "shots_median": shots[len(shots) // 2] if shots else 0,
            "shots_max": shots[-1] if shots else 0, "answers": sum(shots),
            "examples": [" | ".join(m["content"][:40] for m in r["messages"][:4]) for r in out[:3]],
        })
        return ray.data.from_items(out)

    def corrupt_batch(self, batch: dict[str, torch.Tensor], ctx: Context) -> dict[str, torch.Tensor]:
        """`targets: last`: keep only each row's last run of labelled tokens (its final answer)."""
        if self.config.targets == "all":
            return batch
        return {**batch, "labels": last_answer_labels(batch["labels"])}


def last_answer_labels(labels: torch.Tensor) -> torch.Tensor:
    """`labels` [B, T] with every labelled token before the start of each row's last labelled run masked."""
    on = labels != IGNORE_INDEX
    prev = torch.nn.functional.pad(on[:, :-1], (1, 0), value=False)
    starts = on & ~prev
    pos = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    last_start = torch.where(starts, pos, torch.full_like(pos, -1)).max(dim=1, keepdim=True).values
    return labels.masked_fill(pos < last_start, IGNORE_INDEX)
