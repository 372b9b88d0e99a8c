"""Decoding for the HF engine: per-request sampling over a left-padded batch with one KV cache.

A `Sequence` is one request (`Job`) being decoded: each step it picks its token from its own logits
row with its own temperature/top_p and its own seeded `torch.Generator`, so a seeded request samples
the same tokens whatever it is batched with (up to float rounding of the batched matmul; exact in
fp32 in the tests). Rows with different adapters share a forward pass through PEFT's mixed-adapter
forward (`adapter_names=`).

Two schedulers drive sequences:
- `ContinuousBatcher` (engine hf): one decode thread per replica; sequences join the running batch
  at any step and leave it as soon as they finish (iteration-level batching).
- `decode_batch` (fusion ensembles): a fixed batch decoded to its end, over any logits source with
  `step(tokens)`; a plain synchronous generator, free of Serve, stepped in a worker thread.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
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
    # Image tensors of a vision-language prompt (pixel_values, ...; serving.images.chat_inputs), fed at
    # prefill only: the image tokens' keys and values are in the KV cache after it.
    vision: dict | None = None


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


class Sequence:
    """One job's decoding state: its sampler, its detokenizer, its token count and its next input token."""

    def __init__(self, job: Job, tokenizer, eos_ids: set[int]):
        self.job, self.tokenizer, self.eos_ids = job, tokenizer, eos_ids
        self.generator = _generator(job.seed) if job.temperature > 0 else None
        self.tracker = TextTracker(tokenizer, job.stop)
        self.count = 0
        self.token: int | None = None  # the last chosen token, fed at the next step
        self.finished = False
        self.cancelled = False  # the consumer went away: a ContinuousBatcher drops the row
        self.emit: Callable[[Event | Exception], None] | None = None  # where a ContinuousBatcher sends events

    def advance(self, logits: torch.Tensor) -> Event:
        """Choose the next token from this row's `logits` [vocab]; the Event says what it added."""
        job = self.job
        self.token = choose_token(logits, job, self.generator)
        self.count += 1
        event = Event("", completion_tokens=self.count)
        if job.logprobs is not None:
            event.token = _logprobs(self.tokenizer, logits, self.token, job.logprobs)
        if self.token in self.eos_ids:
            event.text, event.finish_reason = self.tracker.flush(), "stop"
        else:
            event.text, stopped = self.tracker.add(self.token)
            if stopped:
                event.finish_reason = "stop"
            elif self.count >= job.max_tokens:
                event.text += self.tracker.flush()
                event.finish_reason = "length"
        self.finished = event.finish_reason is not None
        return event


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
    seqs = [Sequence(job, tokenizer, eos_ids) for job in jobs]
    tokens: list[int] | None = None
    while not all(s.finished for s in seqs):
        logits = decoder.step(tokens)
        events = [None if s.finished else s.advance(logits[row]) for row, s in enumerate(seqs)]
        tokens = [pad_id if e is None else s.token for s, e in zip(seqs, events)]
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


class ContinuousBatcher:
    """Iteration-level batching: one decode thread per model; sequences join and leave at every step.

    `submit(job, emit)` queues a sequence; the thread calls `emit(event)` for each of its tokens (and
    `emit(exception)` if decoding fails). Every step, sequences that arrived since the last one (up to
    `max_batch_size` in flight) are prefilled together as a left-padded batch and their KV cache is
    merged into the running batch's (both left-padded to the longer one); then all running sequences
    decode one token in one forward pass, and finished or cancelled ones leave the batch at once.
    Positions count real tokens only and padding is masked, so a row decodes as it would alone.

    Hand-written rather than transformers' `ContinuousBatchingManager` (`model.generate_batch`,
    transformers 5.19), which does run on CPU (`attn_implementation="paged|sdpa"`, greedy tokens equal
    to `generate`) but cannot serve ftray's requests: one `GenerationConfig` decides `do_sample` for
    every request, sampling draws from the global RNG (no per-request seed, so a seeded request would
    depend on its batch mates), logprobs are the chosen token's only (no top-k), and all requests are
    packed into one [1, tokens] row, which PEFT's per-row `adapter_names=` cannot split among adapters.
    """

    def __init__(self, model, tokenizer, eos_ids: set[int], pad_id: int, max_batch_size: int = 8,
                 autocast: torch.dtype | None = None, multi_adapter: bool = False, wait_s: float = 0.0):
        self.model, self.tokenizer, self.eos_ids, self.pad_id = model, tokenizer, eos_ids, pad_id
        self.max_batch_size, self.autocast, self.multi_adapter = max_batch_size, autocast, multi_adapter
        self.wait_s = wait_s
        self.device = next(model.parameters()).device
        self.inbox: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self.forwards = 0  # forward passes so far (prefills and decode steps), for tests and metrics
        self._reset()
        threading.Thread(target=self._run, name="ftray-decode", daemon=True).start()

    def submit(self, job: Job, emit: Callable[[Event | Exception], None]) -> Sequence:
        """Queue `job`; returns its Sequence (set `.cancelled = True` to drop it at the next step)."""
        seq = Sequence(job, self.tokenizer, self.eos_ids)
        seq.emit = emit
        self.inbox.put(seq)
        return seq

    def close(self) -> None:
        """Stop the decode thread once the sequences already submitted are finished."""
        self.inbox.put(None)

    def _reset(self) -> None:
        self.rows: list[Sequence] = []
        self.cache = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # [rows, cache length]
        self.lengths = torch.zeros(0, dtype=torch.long, device=self.device)  # real tokens per row

    def _run(self) -> None:
        waiting: list[Sequence | None] = []
        while True:
            if not self.rows and not waiting:
                waiting.append(self.inbox.get())  # idle: sleep until a request comes
                time.sleep(self.wait_s)  # let requests sent together be prefilled together
            while not self.inbox.empty():
                waiting.append(self.inbox.get())
            if not self.rows and waiting and waiting[0] is None:
                return  # closed, and everything submitted before is done
            waiting = [s for s in waiting if s is None or not s.cancelled]
            closed_at = waiting.index(None) if None in waiting else len(waiting)
            room = min(self.max_batch_size - len(self.rows), closed_at)
            new, waiting = waiting[:room], waiting[room:]
            try:
                for group in _prefill_groups(new):
                    self._prefill(group)
                if self.rows:
                    self._decode()
            except Exception as err:  # every sequence in flight hears of it; the loop goes on
                for seq in {id(s): s for s in [*self.rows, *new]}.values():
                    _emit(seq, err)
                self._reset()

    def _prefill(self, new: list[Sequence]) -> None:
        """Run the prompts of `new` as one left-padded batch, emit their first tokens, merge the rest in."""
        width = max(len(s.job.prompt_ids) for s in new)
        ids = torch.full((len(new), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for row, seq in enumerate(new):
            ids[row, width - len(seq.job.prompt_ids):] = torch.tensor(seq.job.prompt_ids)
            mask[row, width - len(seq.job.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, positions, None, new)
        for row, seq in enumerate(new):
            _emit(seq, seq.advance(logits[row]))
        keep = [row for row, seq in enumerate(new) if not seq.finished and not seq.cancelled]
        if not keep:
            return
        index = torch.tensor(keep, device=self.device)
        _select_rows(cache, index)
        mask = mask[index]
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:  # left-pad the shorter of the two caches, then stack the rows
            width = max(self.mask.shape[1], mask.shape[1])
            _left_pad(self.cache, width - self.mask.shape[1])
            _left_pad(cache, width - mask.shape[1])
            for mine, theirs in zip(self.cache.layers, cache.layers):
                mine.keys = torch.cat([mine.keys, theirs.keys])
                mine.values = torch.cat([mine.values, theirs.values])
            pad = lambda m: torch.nn.functional.pad(m, (width - m.shape[1], 0))  # noqa: E731
            self.mask = torch.cat([pad(self.mask), pad(mask)])
        self.rows += [new[row] for row in keep]
        self.lengths = torch.cat([self.lengths, mask.sum(-1)])
        self._trim()

    def _decode(self) -> None:
        """Feed every running row its last token; emit the next ones; drop finished and cancelled rows."""
        ids = torch.tensor([[s.token] for s in self.rows], dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=-1)
        logits, self.cache = self._forward(ids, self.mask, self.lengths[:, None], self.cache, self.rows)
        self.lengths = self.lengths + 1
        for row, seq in enumerate(self.rows):
            _emit(seq, seq.advance(logits[row]))
        keep = [row for row, seq in enumerate(self.rows) if not seq.finished and not seq.cancelled]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, device=self.device)
        _select_rows(self.cache, index)
        self.rows = [self.rows[row] for row in keep]
        self.mask, self.lengths = self.mask[index], self.lengths[index]
        self._trim()

    def _trim(self) -> None:
        """Drop cache columns that are padding in every row (left behind by rows that left)."""
        unused = int(self.mask.any(0).int().argmax()) if self.mask.numel() else 0
        if unused:
            self.mask = self.mask[:, unused:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]

    def _forward(self, ids, mask, positions, cache, seqs: list[Sequence]):
        """(fp32 next-token logits [rows, vocab] on CPU, KV cache) of one forward pass."""
        extra = {"adapter_names": [s.job.adapter or BASE_ADAPTER for s in seqs]} if self.multi_adapter else {}
        if cache is None and seqs[0].job.vision:  # a prefill of one image prompt (_prefill_groups)
            extra.update({k: v.to(self.device) for k, v in seqs[0].job.vision.items()})
        autocast = (torch.autocast(self.device.type, dtype=self.autocast) if self.autocast
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True, logits_to_keep=1, **extra)
        self.forwards += 1
        return out.logits[:, -1, :].float().cpu(), _check_cache(out.past_key_values)


def _prefill_groups(new: list[Sequence]) -> list[list[Sequence]]:
    """Text-only prompts together, each image prompt alone: models batch image tensors differently
    (LLaVA concatenates images, Idefics3 pads per row), so one image prompt per prefill is the shape
    every `AutoModelForImageTextToText` takes; the rows then join the running batch like any other."""
    text = [s for s in new if not s.job.vision]
    return ([text] if text else []) + [[s] for s in new if s.job.vision]


def _check_cache(cache):
    """`cache`, if it is a DynamicCache of full-attention layers (the only kind rows can be merged in)."""
    from transformers.cache_utils import DynamicLayer

    if not all(type(layer) is DynamicLayer for layer in cache.layers):
        kinds = sorted({type(layer).__name__ for layer in cache.layers})
        raise NotImplementedError(f"continuous batching needs full-attention KV cache layers, this model uses {kinds}; "
                                  "serve it with engine: vllm")
    return cache


def _select_rows(cache, index: torch.Tensor) -> None:
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[index], layer.values[index]


def _left_pad(cache, width: int) -> None:
    if width:
        for layer in cache.layers:
            layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, width, 0))
            layer.values = torch.nn.functional.pad(layer.values, (0, 0, width, 0))


def _emit(seq: Sequence, item: Event | Exception) -> None:
    """Hand `item` to the sequence's consumer; a consumer that is gone cancels its sequence."""
    try:
        seq.emit(item)
    except Exception:  # e.g. the replica's event loop closed while shutting down
        seq.cancelled = True
