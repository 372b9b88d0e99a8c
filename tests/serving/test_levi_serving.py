"""A LEVI checkpoint (P named in its config, G and adapters in its weights) served by the HF engine on a real
local Ray Serve, answering the `openai` client exactly as direct greedy decoding of the same model does."""

from __future__ import annotations

import copy

import openai
import pytest
import ray
import torch
from ray import serve
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftray.config import build_spec
from ftray.methods import Context, build_methods
from ftray.methods.levi.model import LeviForCausalLM
from ftray.models import load_model
from serving.app import build_app
from tests.serving.conftest import API_KEY, free_port


@pytest.fixture(scope="module")
def levi_dir(tiny_model_dir, tmp_path_factory):
    """A LEVI checkpoint on the tiny model with random non-zero adapters (so it answers unlike P)."""
    spec = build_spec({"model": {"name": str(tiny_model_dir)}, "methods": ["levi"]})
    torch.manual_seed(0)
    model = build_methods(spec.methods)[0].prepare_model(copy.deepcopy(load_model(str(tiny_model_dir))), Context(spec=spec, tokenizer=None))
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("levi")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def levi_url(levi_dir):
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    port = free_port()
    serve.shutdown()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = {"models": [{"name": "levi", "path": str(levi_dir), "dtype": "float32", "num_cpus": 0.5, "max_batch_size": 4,
                          "default_max_tokens": 12}], "api_key": API_KEY, "host": "127.0.0.1", "port": port}
    serve.run(build_app(config), name="levi", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    if started_ray:
        ray.shutdown()


def test_levi_chat_completion_equals_direct_greedy_decoding(levi_url, levi_dir):
    client = openai.OpenAI(base_url=f"{levi_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == ["levi"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = client.chat.completions.create(model="levi", messages=messages, max_tokens=10, temperature=0)

    tok = AutoTokenizer.from_pretrained(levi_dir)
    model = AutoModelForCausalLM.from_pretrained(levi_dir)
    assert isinstance(model, LeviForCausalLM)
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False,
              return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
    assert out.choices[0].message.content == tok.decode(gen, skip_special_tokens=True)
    assert out.usage.prompt_tokens == ids.shape[1] and out.usage.completion_tokens == len(gen)
