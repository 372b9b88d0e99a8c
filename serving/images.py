"""Image inputs for the OpenAI chat endpoint (`engine: hf` serving a vision-language model).

A chat message's content may hold `{"type": "image_url", "image_url": {"url": ...}}` parts, as in
OpenAI's API. Accepted URLs:
- `data:image/<fmt>;base64,<data>` (what the `openai` client sends for a local file);
- a local file, as `file:///abs/path.png` or a plain path, only under a directory listed in the model's
  `images.local_dirs` (empty by default: a server does not read its own files for any client; vLLM's
  `--allowed-local-media-path` makes the same choice).
Remote `http(s)://` URLs are refused (400): the server fetches nothing from the network.

Every image is checked against `ImageLimits` (encoded bytes, pixels, images per request) before it is
decoded in full; a bad, undecodable or too large image is a 4xx in OpenAI's error shape, never a 500.
The images then go through the model's own `AutoProcessor` with its chat template, as in training
(`ftray.tasks.vision_language`): the prompt ids have each image expanded into its image tokens, and the
image tensors (pixel_values, ...) go to the model at prefill only; decode steps are text-only.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from serving.openai_api import ChatCompletionRequest, OpenAIError

if TYPE_CHECKING:  # torch is imported by the engine; serving.config imports ImageLimits from here without it
    import torch


class ImageLimits(BaseModel):
    """What image inputs a served vision-language model accepts (`models.N.images` in a serve config)."""

    model_config = ConfigDict(extra="forbid")

    max_bytes: int = Field(10 * 1024 * 1024, ge=1, description="Largest encoded image (after base64 decoding), in bytes; larger is a 413.")
    max_pixels: int = Field(4096 * 4096, ge=1, description="Largest image, width x height, checked from the header before decoding; larger is a 413.")
    max_images: int = Field(8, ge=1, description="Most image parts in one chat request; more is a 400.")
    local_dirs: list[str] = Field(
        default_factory=list,
        description="Directories whose files clients may name as images (file:// URLs or plain paths); empty: local files are refused.",
    )


def has_images(request: ChatCompletionRequest) -> bool:
    """Whether any message of `request` holds an image part."""
    return any(isinstance(m.content, list) and any(p.get("type") in ("image_url", "image", "input_image") for p in m.content)
               for m in request.messages)


def refuse_images(request: ChatCompletionRequest, why: str) -> None:
    """A 400 for a request with image parts sent to a model that cannot take them (`why` says which)."""
    if has_images(request):
        raise OpenAIError(400, f"model {request.model!r} does not take images ({why}); send text only, or "
                          "serve a vision-language model with engine: hf", param="messages", code="images_not_supported")


def is_vision_language(path: str) -> bool:
    """Whether `path` (an ftray checkpoint, a local HF dir, an alias or a hub id) is an image-text-to-text model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from ftray.eval.loading import task_of
    from ftray.models import resolve_model_path

    p = Path(path).expanduser()
    if not p.exists():
        # An alias (smollm2-135m, tiny-llava) or a hub id: the local copy the loader reads next. Asking the
        # hub for an alias's config instead sat in huggingface_hub's retries offline (~25 s a call, twice
        # per replica start) and called tiny-llava a text model.
        p = Path(resolve_model_path(path))
    if (p / "ftray_spec.yaml").is_file():
        return task_of(p)[0] == "vision_language"
    if (p / "config.json").is_file():
        return json.loads((p / "config.json").read_text()).get("model_type") in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    return False  # an adapter dir without a run spec, a GGUF, ...: loaded as a text model


def load_vision_language(path: str) -> tuple[Any, Any]:
    """(AutoModelForImageTextToText, processor) of a checkpoint (LoRA adapters merged) or an HF dir / hub id."""
    from ftray.eval.loading import load_checkpoint, task_of
    from ftray.models import load_model, load_processor

    if task_of(path)[0] == "vision_language":
        model, _ = load_checkpoint(path, merge=True)
    else:
        model = load_model(path, task="vision_language")
    return model, load_processor(path)


def load_image(image_url: Any, limits: ImageLimits, param: str) -> Image.Image:
    """The RGB image an `image_url` value names; OpenAIError (4xx) when it is not allowed, too large or undecodable."""
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise OpenAIError(400, "an image_url part needs image_url.url (a data: URL or a local file)", param=param)
    scheme = urlparse(url).scheme.lower()
    if url.startswith("data:"):
        data = _data_url_bytes(url, limits, param)
    elif scheme in ("http", "https", "ftp"):
        raise OpenAIError(400, "this server does not fetch remote images; send the image inline as a data URL "
                          "(data:image/png;base64,...)", param=param, code="remote_image_not_supported")
    elif scheme in ("", "file"):
        data = _local_bytes(unquote(urlparse(url).path) if scheme == "file" else url, limits, param)
    else:
        raise OpenAIError(400, f"unsupported image URL scheme {scheme!r}; use a data: URL or a local file", param=param)
    return _decode(data, limits, param)


def _data_url_bytes(url: str, limits: ImageLimits, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise OpenAIError(400, "an image data URL must be base64: data:image/png;base64,<data>", param=param, code="invalid_image")
    if len(payload) * 3 // 4 > limits.max_bytes + 3:  # refuse before decoding a huge string
        raise _too_large(f"the image is about {len(payload) * 3 // 4} bytes", limits, param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise OpenAIError(400, f"the image data URL is not valid base64: {err}", param=param, code="invalid_image") from None
    if len(data) > limits.max_bytes:
        raise _too_large(f"the image is {len(data)} bytes", limits, param)
    return data


def _local_bytes(path: str, limits: ImageLimits, param: str) -> bytes:
    target = Path(path).expanduser().resolve()  # symlinks and '..' resolved before the directory check
    if not any(target.is_relative_to(Path(d).expanduser().resolve()) for d in limits.local_dirs):
        raise OpenAIError(400, f"local image {path!r} is not under a directory this model allows "
                          "(serve config: models.N.images.local_dirs); send the image as a data URL instead",
                          param=param, code="local_image_not_allowed")
    if not target.is_file():
        raise OpenAIError(400, f"local image {path!r} does not exist", param=param, code="invalid_image")
    if target.stat().st_size > limits.max_bytes:
        raise _too_large(f"the image is {target.stat().st_size} bytes", limits, param)
    return target.read_bytes()


def _decode(data: bytes, limits: ImageLimits, param: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:
        raise _too_large("the image is a decompression bomb", limits, param) from None
    except Exception as err:  # PIL raises many kinds (UnidentifiedImageError, SyntaxError, ...)
        raise OpenAIError(400, f"the image cannot be decoded: {err}", param=param, code="invalid_image") from None
    if img.width * img.height > limits.max_pixels:
        raise _too_large(f"the image is {img.width}x{img.height} pixels", limits, param)
    try:
        return img.convert("RGB")  # decodes the pixels: a truncated file fails here
    except Exception as err:
        raise OpenAIError(400, f"the image cannot be decoded: {err}", param=param, code="invalid_image") from None


def _too_large(what: str, limits: ImageLimits, param: str) -> OpenAIError:
    return OpenAIError(413, f"{what}; this model accepts images up to {limits.max_bytes} bytes and "
                       f"{limits.max_pixels} pixels (serve config: models.N.images)", param=param, code="image_too_large")


def chat_inputs(processor: Any, request: ChatCompletionRequest, limits: ImageLimits,
                dtype: torch.dtype) -> tuple[list[int], dict[str, torch.Tensor] | None]:
    """(prompt ids with image tokens expanded, image tensors for the prefill or None) of a chat request."""
    import torch

    messages, images = [], []
    for i, m in enumerate(request.messages):
        parts = m.content if isinstance(m.content, list) else [{"type": "text", "text": m.content or ""}]
        content = []
        for j, part in enumerate(parts):
            kind = part.get("type")
            if kind == "text":
                content.append({"type": "text", "text": str(part.get("text") or "")})
            elif kind == "image_url":
                if len(images) >= limits.max_images:
                    raise OpenAIError(400, f"at most {limits.max_images} images per request (serve config: "
                                      "models.N.images.max_images)", param="messages", code="too_many_images")
                images.append(load_image(part.get("image_url"), limits, f"messages.{i}.content.{j}.image_url"))
                content.append({"type": "image"})
            else:
                raise OpenAIError(400, f"unsupported content part type {kind!r}; use text or image_url",
                                  param=f"messages.{i}.content.{j}.type")
        messages.append({"role": m.role, "content": content})
    try:
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = processor(text=[text], images=[images] if images else None, add_special_tokens=False, return_tensors="pt")
    except Exception as err:  # templates raise on role order, processors on image/placeholder mismatches
        raise OpenAIError(400, f"the model's processor rejected the messages: {err}", param="messages") from None
    ids = enc["input_ids"][0].tolist()
    if not images and getattr(processor, "image_token_id", None) in ids:
        raise OpenAIError(400, "the text holds the model's image placeholder token but the request has no image part",
                          param="messages", code="invalid_image")
    vision = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in enc.items()
              if k not in ("input_ids", "attention_mask") and isinstance(v, torch.Tensor)}
    return ids, (vision or None)
