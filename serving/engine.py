"""`engine: hf`: ftray's transformers engine as a Ray Serve deployment (one model, its LoRA adapters).

A replica loads the model once, then serves OpenAI requests handed over by the ingress:
`respond(request, adapter)` returns a response dict, `stream(request, adapter)` yields chunk dicts.
Problems the client caused come back as an `OpenAIError` value (not raised), so the ingress can turn
them into a 4xx before any byte of a stream is sent.

Batching: every sequence (a request with n=2 is two) is handed to the replica's
`serving.generation.ContinuousBatcher`, whose decode thread admits new sequences at every step
(prefilled together, then merged into the running batch) and decodes all running sequences in one
forward pass per step; a finished sequence leaves at once, so a request never waits for another
one's tail. Requests with different sampling settings, seeds or adapters share the batch: sampling
is per row and adapters mix through PEFT's `adapter_names=`. Events cross from the decode thread to
the replica's event loop through one asyncio queue per sequence.

Images: a vision-language model (any `AutoModelForImageTextToText` checkpoint) takes chat `image_url`
parts (serving/images.py): its processor expands them into image tokens and pixel tensors, which the
batcher feeds at the prompt's prefill; decode steps are text-only. Text models answer image parts with
a 400.

`TextEngine` is shared with logit-fusion ensembles (`serving.fusion`), which still decode static
batches gathered by `@serve.batch` (`_decode`): their members' caches live in other actors.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from ray import serve

from serving.config import ModelConfig
from serving.generation import ContinuousBatcher, Event, Job
from serving.images import chat_inputs, is_vision_language, load_vision_language, refuse_images
from serving.openai_api import (
    ChatCompletionRequest, CompletionRequest, OpenAIError, chat_chunk, chat_response, completion_chunk,
    completion_response, new_id, usage, usage_chunk,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_for_serving(cfg: ModelConfig):
    """(model, tokenizer, autocast dtype) for `cfg`: base or checkpoint, dtype, adapters mounted."""
    from ftray.eval.loading import load_checkpoint
    from ftray.models import default_autocast_dtype

    if is_vision_language(cfg.path):  # image-text-to-text: its processor's tokenizer decodes (images: HFEngine)
        model, processor = load_vision_language(cfg.path)
        tokenizer = processor.tokenizer
    else:
        model, tokenizer = load_checkpoint(cfg.path, merge=True)  # an adapter checkpoint is merged
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    if cfg.dtype in _DTYPES:
        model = model.to(_DTYPES[cfg.dtype])
    autocast = default_autocast_dtype(device) if cfg.dtype == "auto" else None
    if cfg.adapters:
        model = _mount_adapters(model, cfg)
    return model.to(device).eval(), tokenizer, autocast


def _mount_adapters(model, cfg: ModelConfig):
    """Wrap `model` in one PeftModel holding every adapter of `cfg` under its served name."""
    from peft import PeftModel

    for name, path in cfg.adapters.items():
        adapter_cfg = json.loads((Path(path) / "adapter_config.json").read_text())
        if adapter_cfg.get("use_dora"):
            # PEFT's mixed-adapter forward (one batch, several adapters) does not support DoRA.
            raise ValueError(
                f"model {cfg.name!r}: adapter {name!r} is DoRA, which cannot share a batch with other "
                f"adapters; serve it as its own model (path: {path}) so it is merged at load"
            )
    items = list(cfg.adapters.items())
    model = PeftModel.from_pretrained(model, items[0][1], adapter_name=items[0][0])
    for name, path in items[1:]:
        model.load_adapter(path, adapter_name=name)
    return model


def eos_ids(model, tokenizer) -> set[int]:
    """Token ids that end a sequence: the generation config's and the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if isinstance(eos, list) else [eos]
    return {i for i in [*eos, tokenizer.eos_token_id] if i is not None}


class TextEngine:
    """OpenAI requests → decoding jobs → responses; subclasses say how jobs are decoded.

    A subclass sets `tokenizer`, `context` (max tokens), `eos_ids`, `default_max_tokens`, and either
    overrides `events(job)` or calls `configure_batching` and implements `steps(jobs)`: a generator of
    per-step Event lists for a static batch gathered by `@serve.batch`.
    """

    tokenizer: object
    context: int
    eos_ids: set[int]
    default_max_tokens: int

    def configure_batching(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        """Apply the config's batch size and wait to `@serve.batch`."""
        self._decode.set_max_batch_size(max_batch_size)
        self._decode.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def steps(self, jobs: list[Job]):
        """Decode `jobs` as one batch (see `serving.generation.decode_batch`)."""
        raise NotImplementedError

    def events(self, job: Job) -> AsyncIterator[Event]:
        """The Events of one sequence, to its last; by default from a static `@serve.batch` batch."""
        return self._decode(job)

    async def respond(self, request: CompletionRequest | ChatCompletionRequest, adapter: str | None):
        """A whole completion or chat completion, or an OpenAIError."""
        try:
            jobs, prompt_tokens = self._jobs(request, adapter)
        except OpenAIError as err:
            return err
        results = await asyncio.gather(*(self._collect(job) for job in jobs))
        choices = [{"index": i, **r} for i, r in enumerate(results)]
        used = usage(prompt_tokens, sum(r.pop("completion_tokens") for r in choices))
        if isinstance(request, ChatCompletionRequest):
            return chat_response(new_id("chatcmpl"), request.model, choices, used)
        return completion_response(new_id("cmpl"), request.model, choices, used)

    async def stream(self, request: CompletionRequest | ChatCompletionRequest,
                     adapter: str | None) -> AsyncIterator[dict | OpenAIError]:
        """OpenAI chunks as dicts (the ingress frames them as SSE), or one OpenAIError first."""
        try:
            jobs, prompt_tokens = self._jobs(request, adapter)
        except OpenAIError as err:
            yield err
            return
        chat = isinstance(request, ChatCompletionRequest)
        id_, model = new_id("chatcmpl" if chat else "cmpl"), request.model
        if chat:
            for index in range(len(jobs)):
                yield chat_chunk(id_, model, index, {"role": "assistant", "content": ""}, None)
        counts = [0] * len(jobs)
        async for index, event in _merge([self.events(job) for job in jobs]):
            counts[index] = event.completion_tokens
            if not event.text and event.finish_reason is None:
                continue
            if chat:
                delta = {"content": event.text} if event.text else {}
                yield chat_chunk(id_, model, index, delta, event.finish_reason)
            else:
                yield completion_chunk(id_, model, index, event.text, event.finish_reason,
                                       _stream_logprobs(event))
        if request.stream_options and request.stream_options.include_usage:
            object_ = "chat.completion.chunk" if chat else "text_completion"
            yield usage_chunk(id_, model, object_, usage(prompt_tokens, sum(counts)))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _decode(self, jobs: list[Job]):
        """Decode concurrent sequences as one batch; yields a list with one Event per job per step."""
        steps = self.steps(jobs)
        while (events := await asyncio.to_thread(next, steps, None)) is not None:
            yield [StopIteration if e is None else e for e in events]

    async def _collect(self, job: Job) -> dict:
        """Run one sequence to its end: text, finish_reason, logprobs, completion_tokens."""
        text, finish, count, tokens = "", None, 0, []
        async for event in self.events(job):
            text += event.text
            finish, count = event.finish_reason or finish, event.completion_tokens
            if event.token is not None:
                tokens.append(event.token)
        logprobs = _legacy_logprobs(tokens, len(text)) if job.logprobs is not None else None
        return {"text": text, "logprobs": logprobs, "finish_reason": finish, "completion_tokens": count}

    def _jobs(self, request, adapter: str | None) -> tuple[list[Job], int]:
        """The sequences `request` asks for and its prompt token count; OpenAIError if it cannot run."""
        vision = None  # image tensors of a chat prompt with images (vision-language models)
        if isinstance(request, ChatCompletionRequest):
            ids, vision = self._chat_inputs(request)
            prompts, param = [ids], "messages"
        else:
            texts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
            prompts = [self.tokenizer(t).input_ids for t in texts]
            param = "prompt"
        jobs = []
        for ids in prompts:
            if not ids:
                raise OpenAIError(400, "the prompt is empty", param=param)
            room = self.context - len(ids)
            max_tokens = request.max_tokens or min(self.default_max_tokens, room)
            if room < 1 or max_tokens > room:
                raise OpenAIError(
                    400, f"this model's maximum context length is {self.context} tokens; the prompt has "
                    f"{len(ids)} and max_tokens asks for {max_tokens} more: shorten the prompt or lower max_tokens",
                    param=param, code="context_length_exceeded")
            logprobs = request.logprobs if isinstance(request, CompletionRequest) else None
            for i in range(request.n):
                seed = None if request.seed is None else request.seed + i
                jobs.append(Job(ids, max_tokens, request.temperature, request.top_p, seed, request.stop,
                                adapter, logprobs, vision))
        return jobs, sum(len(p) for p in prompts)

    def _chat_inputs(self, request: ChatCompletionRequest) -> tuple[list[int], dict | None]:
        """(prompt ids, image tensors or None); a text model refuses image parts with a 400."""
        refuse_images(request, "it is a text model")
        return self._chat_prompt(request), None

    def _chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        """Token ids of the messages under the model's chat template, ending with the assistant turn."""
        if not self.tokenizer.chat_template:
            raise OpenAIError(400, f"model {request.model!r} has no chat template; use /v1/completions",
                              param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as err:  # templates raise on e.g. role order; that is the request's fault
            raise OpenAIError(400, f"the chat template rejected the messages: {err}", param="messages")
        return self.tokenizer(text, add_special_tokens=False).input_ids


@serve.deployment
class HFEngine(TextEngine):
    """One model (and its adapters) served with transformers; see the module docstring."""

    def __init__(self, model: dict):
        self.cfg = ModelConfig.model_validate(model)
        self.model, self.tokenizer, self.autocast = load_for_serving(self.cfg)
        # a vision-language model's processor renders chats with images (serving/images.py)
        self.processor = None
        if is_vision_language(self.cfg.path):
            from ftray.models import load_processor

            self.processor = load_processor(self.cfg.path)
        config = self.model.config.get_text_config()  # a VLM's context is its language model's
        self.context = getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        self.eos_ids = eos_ids(self.model, self.tokenizer)
        self.default_max_tokens = self.cfg.default_max_tokens
        self.batcher = ContinuousBatcher(
            self.model, self.tokenizer, self.eos_ids, self.tokenizer.pad_token_id, self.cfg.max_batch_size,
            self.autocast, multi_adapter=bool(self.cfg.adapters), wait_s=self.cfg.batch_wait_timeout_s)

    def _chat_inputs(self, request: ChatCompletionRequest) -> tuple[list[int], dict | None]:
        """A vision-language model's prompt ids (image tokens expanded) and image tensors; else as TextEngine."""
        if self.processor is None:
            return super()._chat_inputs(request)
        dtype = next(self.model.parameters()).dtype
        return chat_inputs(self.processor, request, self.cfg.images, dtype)

    async def events(self, job: Job) -> AsyncIterator[Event]:
        """The Events of `job` as the replica's decode thread produces them."""
        loop, inbox = asyncio.get_running_loop(), asyncio.Queue()
        seq = self.batcher.submit(job, lambda item: loop.call_soon_threadsafe(inbox.put_nowait, item))
        try:
            while True:
                item = await inbox.get()
                # A consumer that fell behind gets the tokens waiting for it as one chunk (fewer Serve
                # stream items under load); streamed logprobs stay one token per chunk.
                while job.logprobs is None and isinstance(item, Event) and not inbox.empty():
                    after = inbox.get_nowait()
                    if isinstance(after, Exception):
                        item = after
                        break
                    item = Event(item.text + after.text, after.finish_reason, after.completion_tokens)
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            seq.cancelled = True  # frees the row at the next step if the client went away mid-stream


async def _merge(streams: list[AsyncIterator[Event]]) -> AsyncIterator[tuple[int, Event]]:
    """Interleave several event streams as (stream index, event), as items arrive."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Event]) -> None:
        try:
            async for event in stream:
                await queue.put((index, event))
            await queue.put((index, None))
        except Exception as err:  # surface a decoding failure instead of ending the stream quietly
            await queue.put((index, err))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, event = await queue.get()
            if isinstance(event, Exception):
                raise event
            if event is None:
                remaining -= 1
            else:
                yield index, event
    finally:
        for task in tasks:
            task.cancel()


def _legacy_logprobs(tokens: list[tuple[str, float, dict]], text_len: int) -> dict:
    """OpenAI's completions `logprobs` object, cut where a stop string cut the text."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for text, logprob, top in tokens:
        if offset >= text_len and out["tokens"]:
            break
        out["tokens"].append(text)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def _stream_logprobs(event: Event) -> dict | None:
    """The logprobs object of one streamed chunk (its one token)."""
    if event.token is None:
        return None
    text, logprob, top = event.token
    return {"tokens": [text], "token_logprobs": [logprob], "top_logprobs": [top], "text_offset": [0]}
