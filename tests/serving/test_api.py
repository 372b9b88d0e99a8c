"""The OpenAI API over real HTTP on a local Ray Serve: the `openai` client, streaming, batching, errors."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.serving.conftest import API_KEY

PROMPTS = ["The answer is", "Classify the topic: cooking eggs", "x", "Options: a, b or c and then more",
           "user", "The answer is 12", "system prompt here", "assistant says"]


@pytest.fixture(scope="module")
def client(serve_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(serve_url: str) -> httpx.Client:
    with httpx.Client(base_url=serve_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


def greedy(client, prompt: str, model: str = "tiny", max_tokens: int = 8, **kw) -> str:
    out = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)
    return out.choices[0].text


def test_health_needs_no_key_and_models_lists_adapters(serve_url, client):
    assert httpx.get(f"{serve_url}/health").json() == {"status": "ok"}
    assert {m.id for m in client.models.list()} == {"tiny", "tiny:lora", "tiny-merged"}


def test_completion_equals_direct_generate_and_counts_usage(client, tiny_model_dir):
    out = client.completions.create(model="tiny", prompt="The answer is", max_tokens=8, temperature=0)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = tok("The answer is", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    assert out.choices[0].text == tok.decode(gen, skip_special_tokens=True)
    assert out.usage.prompt_tokens == ids.shape[1]
    assert out.usage.completion_tokens == len(gen)
    assert out.usage.total_tokens == ids.shape[1] + len(gen)
    assert out.choices[0].finish_reason in ("length", "stop")


def test_chat_stream_equals_non_stream(client):
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens >= 1 and whole.usage.prompt_tokens > 5
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_completion_stream_is_sse_ending_with_done(http):
    body = {"model": "tiny", "prompt": "The answer is", "max_tokens": 8, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    text = "".join(c["choices"][0]["text"] for c in chunks)
    whole = http.post("/v1/completions", json={**body, "stream": False}).json()
    assert text == whole["choices"][0]["text"]


def test_concurrent_requests_batched_equal_unbatched(client):
    alone = [greedy(client, p) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: greedy(client, p), PROMPTS))
    assert together == alone
    # One request with several prompts of different lengths is one left-padded batch for sure.
    out = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=8, temperature=0)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == alone


def test_seeded_sampling_is_reproducible_per_request(client):
    kw = {"model": "tiny", "prompt": "The answer is", "max_tokens": 8, "temperature": 1.0, "top_p": 0.9}
    one = client.completions.create(seed=7, **kw).choices[0].text
    assert client.completions.create(seed=7, **kw).choices[0].text == one
    two = client.completions.create(seed=7, n=2, **kw)  # choice 0 shares a batch with choice 1
    assert len(two.choices) == 2 and two.choices[0].text == one
    assert two.choices[1].text != one  # seed + 1


def test_stop_sequence_truncates_stream_and_non_stream(client):
    full = greedy(client, "Classify the topic: cooking eggs", max_tokens=16)
    stop = full[4:7]
    assert stop.strip(), full
    cut = client.completions.create(model="tiny", prompt="Classify the topic: cooking eggs", max_tokens=16,
                                    temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="Classify the topic: cooking eggs", max_tokens=16,
                                         temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:full.index(stop)]


def test_completion_logprobs_top_k(client):
    out = client.completions.create(model="tiny", prompt="The answer is", max_tokens=5, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) == 2 and max(top.values()) == pytest.approx(v, abs=1e-5)
               for top, v in zip(lp.top_logprobs, lp.token_logprobs))  # greedy picks the top token
    assert "".join(lp.tokens) == out.choices[0].text


def test_adapter_served_next_to_base(client):
    prompt = "Options: a, b or c and then more"
    base, adapted = greedy(client, prompt, "tiny", 12), greedy(client, prompt, "tiny:lora", 12)
    assert adapted != base
    assert greedy(client, prompt, "tiny-merged", 12) == adapted  # the adapter dir served merged
    # Base and adapter rows in one batch (PEFT mixed-adapter forward) give the same answers as alone.
    with ThreadPoolExecutor(4) as pool:
        mixed = list(pool.map(lambda m: greedy(client, prompt, m, 12), ["tiny", "tiny:lora"] * 2))
    assert mixed == [base, adapted] * 2


def test_wrong_or_missing_key_is_401(serve_url):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": API_KEY}):
        resp = httpx.post(f"{serve_url}/v1/completions", headers=headers, json={"model": "tiny", "prompt": "x"})
        assert resp.status_code == 401
        assert resp.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{serve_url}/v1", api_key="wrong", max_retries=0).models.list()


LONG = "The answer is " * 200  # > 512 tokens, the tiny model's context
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
BAD = {
    "malformed json": ("/v1/completions", b'{"model": "tiny", "prompt": ', 400),
    "json not an object": ("/v1/completions", [1, 2], 400),
    "unknown model": ("/v1/completions", {"model": "nope", "prompt": "x"}, 404),
    "unknown adapter": ("/v1/chat/completions", {**CHAT, "model": "tiny:nope"}, 404),
    "temperature < 0": ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -1}, 400),
    "n < 1": ("/v1/chat/completions", {**CHAT, "n": 0}, 400),
    "max_tokens < 1": ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400),
    "top_p 0": ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 0}, 400),
    "5 stop strings": ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": list("abcde")}, 400),
    "logprobs > 5": ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 6}, 400),
    "no messages": ("/v1/chat/completions", {"model": "tiny"}, 400),
    "wrong type": ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400),
    "prompt over context": ("/v1/completions", {"model": "tiny", "prompt": LONG}, 400),
    "streamed prompt over context": ("/v1/completions", {"model": "tiny", "prompt": LONG, "stream": True}, 400),
    "chat over context": ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": LONG}]}, 400),
    "max_tokens past context": ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 600}, 400),
    "unknown route": ("/v1/embeddings", {"model": "tiny", "input": "x"}, 404),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_4xx_openai_error(http, case):
    path, body, status = BAD[case]
    if isinstance(body, bytes):
        resp = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        resp = http.post(path, json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in resp.text


def test_bad_fields_name_the_param(http):
    error = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "temperature": -1}).json()["error"]
    assert error["param"] == "temperature"
    error = http.post("/v1/completions", json={"model": "tiny", "prompt": LONG}).json()["error"]
    assert error["code"] == "context_length_exceeded" and "512" in error["message"]


@pytest.mark.slow
def test_smollm2_answers_a_chat(serve_url):
    from ray import serve

    from serving.app import build_app

    config = {"models": [{"name": "smollm2", "path": "smollm2-135m", "num_cpus": 1}]}
    serve.run(build_app(config), name="smol", route_prefix="/smol")
    try:
        client = openai.OpenAI(base_url=f"{serve_url}/smol/v1", api_key="unused", max_retries=0, timeout=300)
        out = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0)
        answer = out.choices[0].message.content
        assert "Paris" in answer, answer
        assert out.usage.completion_tokens >= 1
    finally:
        serve.delete("smol")
