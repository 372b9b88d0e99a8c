"""OpenAI API wire format: request schemas, response/chunk builders, SSE framing, the error shape.

Only what ftray serves is modelled. Requests ignore fields they do not know (clients such as
LangChain send e.g. `presence_penalty: 0`), but every known field is range-checked, so a bad value is
a 400 in OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`), never a 500.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class OpenAIError(Exception):
    """An error to send to the client as OpenAI's error JSON with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        """The JSON body: {"error": {...}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __reduce__(self):  # crosses Ray processes as a plain return value
        return (OpenAIError, (self.status, self.message, self.type, self.param, self.code))


class StreamOptions(BaseModel):
    """`stream_options`: include_usage adds a last chunk with usage and no choices."""

    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="A name listed by GET /v1/models (`base` or `base:adapter`).")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    stop: str | list[str] | None = Field(None, validate_default=True,
                                         description="Up to 4 strings that end the output (excluded).")
    seed: int | None = Field(None, description="Makes sampling reproducible; choice i uses seed + i.")
    n: int = Field(1, ge=1, le=16, description="Choices to generate per prompt.")
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: str | list[str] = Field(description="A prompt or a list of prompts.")
    max_tokens: int | None = Field(16, ge=1, description="Most tokens to generate (OpenAI's default 16).")
    logprobs: int | None = Field(None, ge=0, le=5, description="Top-k log-probabilities per token.")

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt list is empty")
        return prompt


class ChatMessage(BaseModel):
    """One chat message; content may be a string or a list of {"type": "text", "text": ...} parts."""

    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: Literal[False] | None = Field(None, description="Not supported for chat yet.")


def new_id(prefix: str) -> str:
    """An OpenAI-style object id such as cmpl-1f0c..."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """The `usage` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(id_: str, model: str, choices: list[dict], usage_: dict) -> dict:
    """A text_completion object; choices carry index, text, logprobs, finish_reason."""
    return {"id": id_, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_}


def chat_response(id_: str, model: str, choices: list[dict], usage_: dict) -> dict:
    """A chat.completion object from choices carrying index, text, finish_reason."""
    out = [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
            "logprobs": None, "finish_reason": c["finish_reason"]} for c in choices]
    return {"id": id_, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": out, "usage": usage_}


def completion_chunk(id_: str, model: str, index: int, text: str, finish_reason: str | None,
                     logprobs: dict | None = None) -> dict:
    """One streamed text_completion chunk."""
    return {"id": id_, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def chat_chunk(id_: str, model: str, index: int, delta: dict, finish_reason: str | None) -> dict:
    """One streamed chat.completion.chunk; the first delta of a choice carries the role."""
    return {"id": id_, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(id_: str, model: str, object_: str, usage_: dict) -> dict:
    """The last chunk when stream_options.include_usage: no choices, only usage."""
    return {"id": id_, "object": object_, "created": int(time.time()), "model": model,
            "choices": [], "usage": usage_}


def sse(data: dict | str) -> str:
    """Frame one server-sent event (`data: ...` and a blank line)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


SSE_DONE = sse("[DONE]")
