"""Images in the OpenAI chat endpoint: a served tiny LLaVA (engine hf) next to a text model, on a real local Ray Serve.

fp32 weights, so the served greedy reply equals `generate` on the same image exactly.
"""

from __future__ import annotations

import base64
import io
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import ray
from PIL import Image
from ray import serve

from ftray.data.bundled.shapes_vqa import draw
from serving.app import build_app
from serving.images import ImageLimits, load_image
from serving.openai_api import OpenAIError
from tests.serving.conftest import API_KEY, free_port

QUESTION = "What colour is the shape?"


def png(colour: str, kind: str = "circle", size: int = 96) -> bytes:
    img = draw([{"kind": kind, "colour": colour, "cell": 4, "box": [28, 28, 68, 68]}], random.Random(0))
    buf = io.BytesIO()
    img.resize((size, size)).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(url: str, text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("served_images")
    (d / "red.png").write_bytes(png("red"))
    return d


@pytest.fixture(scope="module")
def vlm_url(tiny_llava_dir: Path, tiny_model_dir: Path, image_dir: Path) -> str:
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    port = free_port()
    common = {"dtype": "float32", "num_cpus": 0.5, "default_max_tokens": 8, "batch_wait_timeout_s": 0.05}
    config = {"models": [
        {"name": "vlm", "path": str(tiny_llava_dir), **common,
         "images": {"max_bytes": 60_000, "max_pixels": 512 * 512, "max_images": 2, "local_dirs": [str(image_dir)]}},
        {"name": "tiny", "path": str(tiny_model_dir), **common},
    ], "api_key": API_KEY, "host": "127.0.0.1", "port": port}
    serve.shutdown()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="vlm", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    if started_ray:
        ray.shutdown()


@pytest.fixture(scope="module")
def client(vlm_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{vlm_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def direct(tiny_llava_dir: Path):
    """Greedy replies of the same model called in-process (`generate`), for a colour's image."""
    from ftray.models import load_model, load_processor
    from ftray.tasks.vision_language import generate_replies

    model, processor = load_model(str(tiny_llava_dir), task="vision_language"), load_processor(str(tiny_llava_dir))

    def reply(colour: str, max_tokens: int = 8) -> str:
        row = {"images": [png(colour)], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": "unused: generate_replies answers the turns before the last"}]}
        return generate_replies(model, processor, [row], max_tokens)[0]

    return reply


def chat(client, messages, model: str = "vlm", **kw):
    return client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, **kw)


def test_data_url_image_answers_like_direct_generate(client, direct):
    out = chat(client, image_message(data_url(png("red"))))
    assert out.choices[0].message.content == direct("red")
    # 16 image tokens (32-px image, 8-px patches) are part of the prompt
    text_only = chat(client, [{"role": "user", "content": QUESTION}])
    assert out.usage.prompt_tokens == text_only.usage.prompt_tokens + 16


def test_stream_and_concurrent_image_requests_equal_solo(client, direct):
    chunks = client.chat.completions.create(model="vlm", messages=image_message(data_url(png("blue"))), max_tokens=8,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct("blue")
    # image prompts are prefilled one by one, text prompts together, then all decode in one batch
    asks = [image_message(data_url(png(c))) for c in ("red", "green", "yellow")] + [[{"role": "user", "content": QUESTION}]]
    solo = [chat(client, m).choices[0].message.content for m in asks]
    with ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(lambda m: chat(client, m).choices[0].message.content, asks))
    assert together == solo
    assert solo[:3] == [direct("red"), direct("green"), direct("yellow")]


def test_local_file_in_an_allowed_dir(client, direct, image_dir):
    for url in (str(image_dir / "red.png"), (image_dir / "red.png").as_uri()):
        assert chat(client, image_message(url)).choices[0].message.content == direct("red")


BAD = {
    "not base64": ("data:image/png;base64,@@@not-base64@@@", 400, "invalid_image"),
    "not an image": (data_url(b"this is not a png at all"), 400, "invalid_image"),
    "truncated png": (data_url(png("red")[:200]), 400, "invalid_image"),
    "not base64-encoded data url": ("data:image/png,rawbytes", 400, "invalid_image"),
    "remote url": ("https://example.com/cat.png", 400, "remote_image_not_supported"),
    "file outside local_dirs": ("/etc/hostname", 400, "local_image_not_allowed"),
    "missing local file": ("{image_dir}/nope.png", 400, "invalid_image"),
    "too many bytes": (data_url(b"\x89PNG" + bytes(70_000)), 413, "image_too_large"),
    "too many pixels": (None, 413, "image_too_large"),  # a 600x600 PNG: small file, too many pixels
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_image_is_a_4xx_openai_error(vlm_url, image_dir, case):
    url, status, code = BAD[case]
    if url is None:
        buf = io.BytesIO()
        Image.new("RGB", (600, 600), "white").save(buf, format="PNG")
        url = data_url(buf.getvalue())
    url = url.replace("{image_dir}", str(image_dir))
    resp = httpx.post(f"{vlm_url}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120,
                      json={"model": "vlm", "messages": image_message(url), "max_tokens": 4})
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert error["param"] == "messages.0.content.0.image_url" and "Traceback" not in resp.text


def test_openai_client_raises_bad_request_for_a_bad_image(client):
    with pytest.raises(openai.BadRequestError, match="cannot be decoded"):
        chat(client, image_message(data_url(b"GIF89a-broken")))


def test_too_many_images_and_unknown_parts_are_400(client):
    three = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png("red"))}}] * 3}]
    with pytest.raises(openai.BadRequestError, match="at most 2 images"):
        chat(client, three)
    with pytest.raises(openai.BadRequestError, match="unsupported content part type 'input_audio'"):
        chat(client, [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}])


def test_image_to_a_text_model_is_400(client):
    with pytest.raises(openai.BadRequestError, match="does not take images") as info:
        chat(client, image_message(data_url(png("red"))), model="tiny")
    assert info.value.status_code == 400 and info.value.body["code"] == "images_not_supported"
    assert chat(client, [{"role": "user", "content": QUESTION}], model="tiny").choices[0].message.content is not None


def test_pixel_limit_is_checked_before_decoding():
    # a 5000x5000 one-bit PNG: a few kB encoded, 25 M pixels; refused from its header
    buf = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buf, format="PNG")
    with pytest.raises(OpenAIError) as info:
        load_image({"url": data_url(buf.getvalue())}, ImageLimits(), "p")
    assert info.value.status == 413 and "5000x5000" in info.value.message


@pytest.mark.slow  # resolving smollm2-135m converts the bundled GGUF the first time
def test_bundled_aliases_are_classified_without_asking_the_hub(monkeypatch):
    from transformers import AutoConfig

    from serving.images import is_vision_language

    def offline(*args, **kwargs):
        raise AssertionError(f"asked the hub for {args[0]!r}")

    monkeypatch.setattr(AutoConfig, "from_pretrained", offline)
    assert is_vision_language("tiny-llava") and not is_vision_language("smollm2-135m")
