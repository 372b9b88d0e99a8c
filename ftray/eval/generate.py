"""Batched greedy generation and the metrics built on it (exact match) and on the loss (perplexity)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ftray.data import collate, extract_answer, format_prompt, normalize_answer, reference_answer, render_prompt
from ftray.data.templates import cut_at_stop, stop_strings
from ftray.models import default_autocast_dtype
from ftray.train.loss import forward_and_loss


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: list[list[dict]], max_new_tokens: int = 96, batch_size: int = 32,
             prefix: str = "") -> list[str]:
    """Greedy completions of chat `prompts` (lists of messages), left-padded in batches; `prefix` goes
    before each rendered prompt (e.g. a UL2 mode token, "[S2S]")."""
    model.eval()
    amp = default_autocast_dtype(model.device.type)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    stops = stop_strings(tokenizer)  # a named template's end-of-turn text that is not the eos token (ChatML on a base model)
    outputs = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [prefix + render_prompt(p, tokenizer) for p in prompts[i : i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.autocast(model.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                     **({"stop_strings": stops, "tokenizer": tokenizer} if stops else {}))
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            outputs += [cut_at_stop(t, stops) for t in texts]
    finally:
        tokenizer.padding_side = side
    return outputs


def exact_match(model: Any, tokenizer: Any, rows: list[dict], fmt: str, max_new_tokens: int = 96, batch_size: int = 32,
                prefix: str = "") -> dict[str, Any]:
    """Accuracy of the extracted final answer against each row's reference, with a few examples."""
    outputs = generate(model, tokenizer, [format_prompt(r, fmt) for r in rows], max_new_tokens, batch_size, prefix)
    hits = [normalize_answer(extract_answer(o) or o) == normalize_answer(reference_answer(r, fmt)) for o, r in zip(outputs, rows)]
    examples = [{"output": o, "reference": reference_answer(r, fmt), "correct": h} for o, r, h in list(zip(outputs, rows, hits))[:3]]
    return {"exact_match": sum(hits) / max(1, len(hits)), "n": len(hits), "examples": examples}


@torch.no_grad()
def perplexity(model: Any, rows: list[dict], pad_id: int, batch_size: int = 16) -> float:
    """exp(token-mean next-token loss) over tokenized rows' label tokens."""
    model.eval()
    amp = default_autocast_dtype(model.device.type)
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(rows[i : i + batch_size], pad_id).items()}
        _, loss_sum, n = forward_and_loss(model, batch, amp)
        total, count = total + loss_sum.item(), count + int(n)
    return math.exp(total / max(1, count))
