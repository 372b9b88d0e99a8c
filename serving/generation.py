"""Batched decoding for the HF engine: one left-padded batch, one KV cache, per-request sampling.

`decode_batch` runs a manual decoding loop over requests (`Job`s) that may differ in every sampling
field and in their LoRA adapter: each step is one forward pass for the whole batch, then each row
picks its token with its own temperature/top_p and its own seeded `torch.Generator`. A row's draws
depend only on its own logits and seed, so a seeded request samples the same tokens whatever it is
batched with (up to float rounding of the batched matmul; exact in fp32 in the tests). Rows with
different adapters share the batch through PEFT's mixed-adapter forward (`adapter_names=`).

It is a plain synchronous generator, free of Serve, so the engine can step it in a worker thread
(keeping the replica's event loop free) and it can be tested without Ray.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


@dataclass
class Job:
    """One sequence to generate (a request with n=3 is three jobs)."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    adapter: str | None = None
    logprobs: int | None = None


@dataclass
class Event:
    """What one job produced in one step: new text, and the token when logprobs were asked for."""

    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    token: tuple[str, float, dict[str, float]] | None = None  # (token text, logprob, top-k)


class TextTracker:
    """Incremental detokenization that never emits text a stop string might still claim."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already sent

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token; return (text safe to send now, whether a stop string ended the output)."""
        self.ids.append(token_id)
        text = self._text()
        hits = [i for i in (text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if i >= 0]
        if hits:
            return self._emit(text, min(hits)), True
        safe = len(text.rstrip("\ufffd"))  # a multi-byte character still being spelled out
        # Hold back a tail that could still grow into a stop string.
        safe -= max((k for s in self.stop for k in range(1, min(len(s), safe + 1))
                     if text[safe - k:safe] == s[:k]), default=0)
        return self._emit(text, safe), False

    def flush(self) -> str:
        """Everything not yet sent (the output ended without a stop string)."""
        return self._emit(self._text(), None)

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _emit(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        delta = text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta


def choose_token(logits: torch.Tensor, job: Job, generator: torch.Generator | None) -> int:
    """Greedy when temperature is 0, else temperature + nucleus sampling with `generator`."""
    if job.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / job.temperature, dim=-1)
    if job.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= job.top_p
        sorted_probs[drop] = 0.0
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


class BatchDecoder:
    """A left-padded batch with one KV cache; `step` feeds tokens and returns next-token logits."""

    def __init__(self, model, prompts: list[list[int]], pad_id: int,
                 adapters: list[str | None] | None = None, autocast: torch.dtype | None = None):
        self.model, self.autocast = model, autocast
        self.device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        self.ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        self.mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            self.ids[row, width - len(prompt):] = torch.tensor(prompt)
            self.mask[row, width - len(prompt):] = 1
        # Positions count real tokens only, so a left-padded row sees the positions it would alone.
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.ids, self.mask, self.positions = (t.to(self.device) for t in (self.ids, self.mask, self.positions))
        self.cache = None
        self.extra = {}
        if adapters is not None:
            self.extra["adapter_names"] = [a or BASE_ADAPTER for a in adapters]

    def step(self, tokens: list[int] | None = None) -> torch.Tensor:
        """Prefill (tokens=None) or feed one token per row; returns fp32 logits [batch, vocab]."""
        if tokens is None:
            ids, positions = self.ids, self.positions
        else:
            ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
            positions = self.positions[:, -1:] + 1
            self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=-1)
            self.positions = positions
        autocast = (torch.autocast(self.device.type, dtype=self.autocast) if self.autocast
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions,
                             past_key_values=self.cache, use_cache=True, logits_to_keep=1, **self.extra)
        self.cache = out.past_key_values
        return out.logits[:, -1, :].float().cpu()


def decode_batch(model, tokenizer, jobs: list[Job], eos_ids: set[int], pad_id: int,
                 autocast: torch.dtype | None = None, multi_adapter: bool = False, decoder=None
                 ) -> Iterator[list[Event | None]]:
    """Decode `jobs` together; yields one list per step with an Event per job (None once finished).

    `decoder` is any logits source with `step(tokens) -> [batch, vocab]` (e.g. a logit-fusion
    ensemble); by default a `BatchDecoder` over `model`.
    """
    if decoder is None:
        decoder = BatchDecoder(model, [j.prompt_ids for j in jobs], pad_id,
                               [j.adapter for j in jobs] if multi_adapter else None, autocast)
    generators = [_generator(j.seed) if j.temperature > 0 else None for j in jobs]
    trackers = [TextTracker(tokenizer, j.stop) for j in jobs]
    done = [False] * len(jobs)
    counts = [0] * len(jobs)
    tokens: list[int] | None = None
    while not all(done):
        logits = decoder.step(tokens)
        tokens, events = [], []
        for row, job in enumerate(jobs):
            if done[row]:
                tokens.append(pad_id)
                events.append(None)
                continue
            token = choose_token(logits[row], job, generators[row])
            tokens.append(token)
            counts[row] += 1
            event = Event("", completion_tokens=counts[row])
            if job.logprobs is not None:
                event.token = _logprobs(tokenizer, logits[row], token, job.logprobs)
            if token in eos_ids:
                event.text, event.finish_reason = trackers[row].flush(), "stop"
            else:
                event.text, stopped = trackers[row].add(token)
                if stopped:
                    event.finish_reason = "stop"
                elif counts[row] >= job.max_tokens:
                    event.text += trackers[row].flush()
                    event.finish_reason = "length"
            done[row] = event.finish_reason is not None
            events.append(event)
        yield events


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()  # fresh entropy per request
    else:
        gen.manual_seed(seed)
    return gen


def _logprobs(tokenizer, logits: torch.Tensor, token: int, k: int) -> tuple[str, float, dict[str, float]]:
    """The chosen token's text and log-probability under the model, and the top-k alternatives."""
    logp = torch.log_softmax(logits, dim=-1)
    top = {}
    if k > 0:
        values, ids = logp.topk(k)
        top = {tokenizer.decode([int(i)]): float(v) for v, i in zip(values, ids)}
    return tokenizer.decode([token]), float(logp[token]), top
