"""LLMBoost chains served by member actors: pipelined = sequential = the chain's own generate(), over real HTTP too."""

from __future__ import annotations

import openai
import pytest
import ray
import torch
from ray import serve

from serving.app import build_app
from serving.boost import BoostDecoder, ChainGraph, start_members
from serving.config import ServeConfigError, parse_serve_config
from tests.methods.test_llmboost import make, perturb
from tests.serving.conftest import API_KEY, free_port

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]


def save_chain(tiny_model_dir, tokenizer, out, members: int, **fields):
    """A tiny chain with random non-zero LoRA and CMA (members differ from the base), saved as a chain dir."""
    model, *_ = make(tiny_model_dir, members=members, **fields)
    perturb(model, std=0.3)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, model.eval()


@pytest.fixture(scope="module")
def ray_cpus():
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def chains(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("chains")
    return {
        # S = {1, 2}: two CMA layers, no layers after the last one
        "every1": save_chain(tiny_model_dir, tiny_tokenizer, root / "every1", 2, every=1),
        # S = {1}: one CMA layer then a tail layer; 3 members, the additive ensemble (two members have heads)
        "additive3": save_chain(tiny_model_dir, tiny_tokenizer, root / "additive3", 3, layers=[1], ensemble="additive", beta=0.5),
    }


def reference(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """The chain model's own greedy generate() over the left-padded batch (no eos stop)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, width:].tolist()


def decode(graph: ChainGraph, prompts: list[list[int]], n: int) -> list[list[int]]:
    decoder = BoostDecoder(graph, prompts, pad_id=0)
    tokens, out = None, []
    try:
        for _ in range(n):
            tokens = decoder.step(tokens).argmax(-1).tolist()
            out.append(tokens)
    finally:
        decoder.close()
    return [list(row) for row in zip(*out)]


@pytest.mark.parametrize("name", ["every1", "additive3"])
def test_pipelined_equals_sequential_equals_generate(ray_cpus, chains, name):
    path, model = chains[name]
    n_members, ensemble = model.n_members, model.config.ensemble
    actors = start_members(str(path), n_members, ensemble, "float32", num_cpus=0.25, threads=1)
    info = ray.get(actors[-1].info.remote())
    assert info["layers"] == model.config.layers and info["n_members"] == n_members
    try:
        results = {}
        for pipeline in (True, False):  # one actor set, one compiled graph at a time
            graph = ChainGraph(actors, info, pipeline)
            try:
                results[pipeline] = {b: decode(graph, PROMPTS[:b], 6) for b in (1, 2)}
                results[pipeline]["twice"] = decode(graph, PROMPTS[1:], 4)  # a new session after one ended
            finally:
                graph.teardown()
    finally:
        for actor in actors:
            ray.kill(actor)
    assert results[True] == results[False]
    for b in (1, 2):
        assert results[True][b] == reference(model, PROMPTS[:b], 6)
    assert results[True]["twice"] == reference(model, PROMPTS[1:], 4)


def boost_entry(name: str, path, **kw) -> dict:
    return {"kind": "llmboost", "name": name, "path": str(path), "dtype": "float32", "member_num_cpus": 0.25,
            "default_max_tokens": 8, **kw}


def test_a_bad_llmboost_entry_fails_validation_naming_the_field(chains, tmp_path, tiny_model_dir):
    path = chains["every1"][0]
    with pytest.raises(ServeConfigError, match=r"ensembles\.0\.member_num_cpus"):
        parse_serve_config({"ensembles": [boost_entry("b", path, member_num_cpus=0)]})
    with pytest.raises(ServeConfigError, match=r"ensembles\.0\.pipelined: Extra inputs"):
        parse_serve_config({"ensembles": [boost_entry("b", path, pipelined=True)]})
    with pytest.raises(ServeConfigError, match=r"ensembles\.0\.path: Field required"):
        parse_serve_config({"ensembles": [{"kind": "llmboost", "name": "b"}]})
    with pytest.raises(ServeConfigError, match=r"ensembles\.0.*llmboost"):
        parse_serve_config({"ensembles": [{**boost_entry("b", path), "kind": "boost"}]})
    with pytest.raises(ServeConfigError, match=r"ensembles\.0\.path: .* not an LLMBoost chain"):
        build_app(parse_serve_config({"ensembles": [boost_entry("b", tiny_model_dir)]}))
    with pytest.raises(ServeConfigError, match=r"ensembles\.0\.path: .* does not exist"):
        build_app({"ensembles": [boost_entry("b", tmp_path / "missing")]})
    # kind defaults to fusion: a fusion entry without `kind` still validates as one
    fusion = parse_serve_config({"ensembles": [{"name": "f", "large": "a", "small_base": "b", "experts": [{"path": "c"}]}]})
    assert fusion.ensembles[0].kind == "fusion"


@pytest.fixture(scope="module")
def client(ray_cpus, chains):
    port = free_port()
    path = chains["every1"][0]
    config = {"ensembles": [boost_entry("boost", path), boost_entry("boost-seq", path, pipeline=False)],
              "api_key": API_KEY, "host": "127.0.0.1", "port": port}
    serve.shutdown()  # a Serve left running by another module would keep its own port
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="boost", route_prefix="/")
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    serve.shutdown()


def test_served_chain_answers_the_openai_client(client, chains, tiny_tokenizer):
    assert {m.id for m in client.models.list()} == {"boost", "boost-seq"}
    prompt = "The answer is"
    outs = {name: client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0) for name in ("boost", "boost-seq")}
    assert outs["boost"].choices[0].text == outs["boost-seq"].choices[0].text
    assert outs["boost"].usage.completion_tokens > 0
    ids = tiny_tokenizer(prompt).input_ids
    expected = reference(chains["every1"][1], [ids], outs["boost"].usage.completion_tokens)[0]
    assert outs["boost"].choices[0].text == tiny_tokenizer.decode(expected, skip_special_tokens=True)
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    whole = client.chat.completions.create(model="boost", messages=messages, max_tokens=5, temperature=0)
    chunks = client.chat.completions.create(model="boost", messages=messages, max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="boost", prompt=prompt, max_tokens=6, temperature=-1)
    assert err.value.status_code == 400 and err.value.body["param"] == "temperature"
