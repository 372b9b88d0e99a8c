"""`engine: vllm`: a model and its LoRA adapters served by vLLM through Ray Serve LLM, behind ftray's ingress.

`vllm_deployment(model, index)` maps ftray's `ModelConfig` onto `ray.serve.llm.LLMConfig` (model source,
dtype, replicas, CPUs/GPUs as the engine's placement group, max ongoing/queued requests, batch size as
vLLM's `max_num_seqs`, LoRA via `LoraConfig` + `enable_lora`) and builds the deployment with
`ray.serve.llm.build_llm_deployment`, so vLLM runs exactly as Ray Serve LLM runs it.

Routing: ftray's ingress calls this deployment's handle; it does not extend Ray Serve LLM's ingress.
The deployment class, `VLLMServer`, *is* Ray's `LLMServer` (a subclass) plus the two methods every ftray
engine answers, `respond(request, adapter)` and `stream(request, adapter)`: they turn ftray's validated
request into vLLM's protocol object and call `LLMServer.chat` / `completions` in the same replica. Why:
one ingress then lists and routes vLLM models, HF models and ensembles alike (`/v1/models`, auth, error
shape, validation are ftray's, once), the hop count equals Ray Serve LLM's own app (ingress -> LLMServer),
and streamed chunks pass through as vLLM's own SSE text, batched as `LLMServer` batches them, never
re-parsed. Extending Ray's `OpenAiIngress` instead would need a second routing path for HF models and
ensembles, whose deployments do not speak `LLMServer`'s protocol.

Adapters are fixed by the config, so every replica loads all of them at start (no multiplexed
downloads: `LoraConfig.dynamic_lora_loading_path` only takes cloud URIs). Adapter kinds vLLM refuses
(DoRA, LoRA bias, PiSSA-style inits; vLLM's own `PEFTHelper` says which) are refused at build time,
unless the entry says `merge: true`: the adapter is then merged into a full copy of the base (cached
under `ftray.models.cache_dir()/merged/`) and served by its own vLLM replica, reached through the base's.

Import this module only when a config uses `engine: vllm`: it imports vLLM (seconds).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest as VLLMChatRequest,
    CompletionRequest as VLLMCompletionRequest,
    ErrorResponse,
)
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from ray.serve.llm import LLMConfig, LLMServer, LoraConfig, build_llm_deployment

from serving.config import ModelConfig, ServeConfigError
from serving.openai_api import ChatCompletionRequest, CompletionRequest, OpenAIError

# ftray's defaults for vLLM's engine arguments; a model's `engine_kwargs` override them.
DEFAULT_ENGINE_KWARGS: dict[str, Any] = {
    # vLLM CPU otherwise sizes its KV cache from total RAM (a share of the machine for each replica).
    "kv_cache_memory_bytes": 1 << 30,
}
_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks
_SSE_DONE = "data: [DONE]"


class VLLMServer(LLMServer):
    """Ray Serve LLM's `LLMServer` answering ftray's engine calls; see the module docstring."""

    async def __init__(self, llm_config: LLMConfig, *, adapters: dict[str, str] | None = None,
                       merged: dict[str, DeploymentHandle] | None = None, default_max_tokens: int = 256,
                       **kwargs):
        self.adapters = adapters or {}  # served name (model:adapter) -> adapter dir, loaded at start
        self.merged = merged or {}  # adapter -> handle of the replica serving it merged into the base
        self.default_max_tokens = default_max_tokens
        await super().__init__(llm_config, **kwargs)

    async def start(self):
        """Start vLLM, then load every adapter, so no request waits for one."""
        await super().start()
        for i, (name, path) in enumerate(self.adapters.items(), start=1):
            await self.engine.resolve_lora(DiskMultiplexConfig(
                model_id=name, local_path=path, max_total_tokens=None, lora_assigned_int_id=i))

    async def respond(self, request: CompletionRequest | ChatCompletionRequest, adapter: str | None):
        """A whole completion or chat completion as a dict, or an OpenAIError."""
        if err := _image_error(request):
            return err
        if adapter in self.merged:
            return await self.merged[adapter].respond.remote(request, None)
        results = await self._call(request, adapter)
        result = await anext(results)
        if isinstance(result, ErrorResponse):
            return _error(result)
        return result.model_dump(mode="json", exclude_none=True)

    async def stream(self, request: CompletionRequest | ChatCompletionRequest,
                     adapter: str | None) -> AsyncIterator[str | OpenAIError]:
        """vLLM's SSE events as pre-framed text (several per item, as LLMServer batches them), or one OpenAIError first."""
        if err := _image_error(request):
            yield err
            return
        if adapter in self.merged:
            async for item in self.merged[adapter].options(stream=True).stream.remote(request, None):
                yield item
            return
        async for batch in await self._call(request, adapter):
            events = batch if isinstance(batch, list) else [batch]
            if events and isinstance(events[0], ErrorResponse):
                yield _error(events[0])
                return
            # ftray's ingress ends every stream with its own [DONE].
            text = "".join(e for e in events if not e.startswith(_SSE_DONE))
            if text:
                yield text

    async def _call(self, request, adapter: str | None) -> AsyncIterator:
        served = self._llm_config.model_id if adapter is None else f"{self._llm_config.model_id}:{adapter}"
        if isinstance(request, ChatCompletionRequest):
            return await self.chat(to_vllm_chat(request, served, self.default_max_tokens))
        return await self.completions(to_vllm_completion(request, served))


def to_vllm_chat(request: ChatCompletionRequest, served: str, default_max_tokens: int) -> VLLMChatRequest:
    """vLLM's chat request for ftray's (fields ftray validated; `served` is the vLLM model or LoRA name)."""
    return VLLMChatRequest(
        messages=[{"role": m.role, "content": m.text()} for m in request.messages],
        max_tokens=request.max_tokens or default_max_tokens, **_sampling(request, served))


def to_vllm_completion(request: CompletionRequest, served: str) -> VLLMCompletionRequest:
    """vLLM's completion request for ftray's."""
    return VLLMCompletionRequest(prompt=request.prompt, max_tokens=request.max_tokens,
                                 logprobs=request.logprobs, **_sampling(request, served))


def _sampling(request, served: str) -> dict[str, Any]:
    options = request.stream_options.model_dump() if request.stream_options else None
    return {"model": served, "temperature": request.temperature, "top_p": request.top_p, "stop": request.stop,
            "seed": request.seed, "n": request.n, "stream": request.stream, "stream_options": options}


def _image_error(request) -> OpenAIError | None:
    """A 400 for image parts: ftray does not pass images to vLLM yet (to_vllm_chat sends text), so say so
    rather than answer without the image."""
    from serving.images import refuse_images

    try:
        if isinstance(request, ChatCompletionRequest):
            refuse_images(request, "engine vllm takes text only in ftray")
    except OpenAIError as err:
        return err
    return None


def _error(response: ErrorResponse) -> OpenAIError:
    err = response.error
    return OpenAIError(int(err.code), err.message, _ERROR_TYPES.get(int(err.code), err.type), param=err.param)


_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 401: "authentication_error"}


def vllm_deployment(model: ModelConfig, index: int) -> Application:
    """The `VLLMServer` deployment for `model` (and one per `merge: true` adapter), checked at build time."""
    base = model_source(model.path)
    loras = {}
    for name, path in model.adapters.items():
        if name not in model.merge_adapters:
            refuse_unservable(model, index, name, path)
            loras[name] = str(Path(path).expanduser().resolve())
    merged = {name: _server(model.model_copy(update={"num_replicas": 1}), f"{model.name}:{name}",
                            merged_model_dir(base, model.adapters[name]), {})
              for name in model.merge_adapters}
    return _server(model, model.name, base, loras, merged)


def _server(model: ModelConfig, served: str, source: str, loras: dict[str, str],
            merged: dict[str, Application] | None = None) -> Application:
    config = llm_config(model, served, source, loras)
    return build_llm_deployment(
        config, deployment_cls=VLLMServer, name_prefix="vllm-",
        bind_kwargs={"adapters": {f"{served}:{a}": p for a, p in loras.items()}, "merged": merged or {},
                     "default_max_tokens": model.default_max_tokens})


def llm_config(model: ModelConfig, served: str, source: str, loras: dict[str, str]) -> LLMConfig:
    """`ray.serve.llm.LLMConfig` for `model` served as `served` from the HF directory `source`."""
    engine_kwargs = {"dtype": vllm_dtype(model), "max_num_seqs": model.max_batch_size, **DEFAULT_ENGINE_KWARGS}
    if loras:
        engine_kwargs |= {"enable_lora": True, "max_loras": len(loras),
                          "max_lora_rank": lora_rank_bound(loras.values())}
    engine_kwargs |= model.engine_kwargs
    bundle = {"CPU": model.num_cpus} | ({"GPU": model.num_gpus} if model.num_gpus else {})
    return LLMConfig(
        model_loading_config={"model_id": served, "model_source": source},
        engine_kwargs=engine_kwargs,
        accelerator_config={"kind": "gpu" if model.num_gpus else "cpu"},
        # The engine's placement group holds the model's CPUs/GPUs; the replica actor itself takes none.
        placement_group_config={"bundles": [bundle]},
        lora_config=LoraConfig(max_num_adapters_per_replica=len(loras)) if loras else None,
        deployment_config={
            "name": re.sub(r"[^A-Za-z0-9_.-]", "-", served), "num_replicas": model.num_replicas,
            "max_ongoing_requests": model.max_ongoing_requests,
            "max_queued_requests": model.max_queued_requests, "ray_actor_options": {"num_cpus": 0},
        },
        log_engine_metrics=False,
    )


def vllm_dtype(model: ModelConfig) -> str:
    """ftray's dtype as vLLM's: `auto` is bf16 where the CPU has native bf16 (as ftray's autocast), else fp32."""
    if model.dtype != "auto":
        return model.dtype
    if model.num_gpus:
        return "auto"
    import torch

    from ftray.models import default_autocast_dtype

    return "bfloat16" if default_autocast_dtype("cpu") == torch.bfloat16 else "float32"


def model_source(path: str) -> str:
    """A local HF directory vLLM can load: aliases and GGUF resolved, an adapter checkpoint merged."""
    from ftray.models import resolve_model_path

    if (Path(path).expanduser() / "adapter_config.json").is_file():
        from ftray.eval.loading import base_model_of

        base, gguf = base_model_of(Path(path).expanduser())
        return merged_model_dir(resolve_model_path(base, gguf), path)
    return resolve_model_path(path)


def refuse_unservable(model: ModelConfig, index: int, name: str, path: str) -> None:
    """ServeConfigError naming the adapter and both ways out if vLLM cannot serve it as LoRA."""
    from vllm.lora.peft_helper import PEFTHelper

    config = json.loads((Path(path).expanduser() / "adapter_config.json").read_text())
    # vLLM's own list of what it refuses at load (DoRA, lora_bias, PiSSA-style inits, ...), read now so
    # the refusal comes at build time rather than from the first request.
    reasons = PEFTHelper.from_dict(config)._validate_features()
    if reasons:
        raise ServeConfigError(
            f"models.{index}.adapters.{name}: {path!r} cannot be served by engine vllm ({' '.join(reasons)}); "
            f"either set `merge: true` on it (adapters: {{{name}: {{path: {path}, merge: true}}}}) to serve it "
            "merged into a full copy of the base, or serve it from a model with engine: hf"
        )


def lora_rank_bound(paths) -> int:
    """The smallest `max_lora_rank` vLLM accepts that covers every adapter's rank (rank_pattern included)."""
    ranks = []
    for path in paths:
        config = json.loads((Path(path) / "adapter_config.json").read_text())
        ranks += [config["r"], *(config.get("rank_pattern") or {}).values()]
    return next(r for r in _LORA_RANKS if r >= max(ranks))


def merged_model_dir(base: str, adapter: str) -> str:
    """A full HF directory of `adapter` merged into `base`, written once and reused (keyed by both dirs' contents)."""
    from ftray.models import cache_dir

    adapter_dir = Path(adapter).expanduser().resolve()
    target = cache_dir() / "merged" / f"{adapter_dir.name}-{_dirs_key(Path(base), adapter_dir)}"
    if (target / "config.json").is_file():
        return str(target)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir).merge_and_unload()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
                                  ).save_pretrained(tmp)
    try:
        os.replace(tmp, target)  # atomic; another process that got there first wins
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _dirs_key(*dirs: Path) -> str:
    digest = hashlib.sha256()
    for d in dirs:
        for f in sorted(p for p in d.resolve().iterdir() if p.is_file()):
            st = f.stat()
            digest.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]
