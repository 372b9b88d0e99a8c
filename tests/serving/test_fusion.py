"""Logit-fusion ensembles: DLF's defining properties, and static/dynamic ensembles over real HTTP."""

from __future__ import annotations

import shutil
from pathlib import Path

import openai
import pytest
import ray
import torch
from ray import serve
from transformers import AutoModelForCausalLM

from serving.app import build_app
from serving.config import ServeConfigError, parse_serve_config
from serving.fusion import _kl, alpha_grid, dynamic_fusion, static_fusion
from tests.conftest import build_tiny_tokenizer
from tests.serving.conftest import API_KEY, free_port


def logits(seed: int, shape=(3, 50)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_dynamic_alpha_is_the_first_grid_argmin_of_the_kl_matching_loss():
    z_l, z_s, z_e = logits(0), logits(1), torch.stack([logits(2), logits(3)])
    grid = alpha_grid()
    assert len(grid) == 21 and grid[-1] == pytest.approx(2.0)
    alpha, fused = dynamic_fusion(z_l, z_s, z_e, grid)
    logp, logq, logqt = (torch.log_softmax(z, -1) for z in (z_l, z_s, z_e))
    for row in range(3):  # brute force over every (expert, α) in scan order, strict improvement only
        best, best_loss = None, float("inf")
        for t in range(2):
            for a in grid:
                cand = torch.log_softmax(z_l[row] + a * (z_e[t, row] - z_s[row]), -1)
                loss = sum((_kl(cand, logp[row]) - _kl(logqt[u, row], logq[row])) ** 2
                           + (_kl(logp[row], cand) - _kl(logq[row], logqt[u, row])) ** 2 for u in range(2))
                if loss < best_loss - 1e-7:
                    best, best_loss = (t, float(a)), loss
        assert (alpha[row] != 0).sum() <= 1  # one expert active per step
        assert alpha[row, best[0]] == pytest.approx(best[1]) or best[1] == 0
    torch.testing.assert_close(fused, z_l + torch.einsum("bt,tbv->bv", alpha, z_e - z_s[None]))


def test_expert_equal_to_base_leaves_the_large_model_unchanged():
    z_l, z_s = logits(0), logits(1)
    alpha, fused = dynamic_fusion(z_l, z_s, z_s[None].clone(), alpha_grid())
    assert torch.equal(alpha, torch.zeros(3, 1)) and torch.equal(fused, z_l)
    assert float(_kl(torch.log_softmax(z_l, -1), torch.log_softmax(z_l + 0.0 * (z_s - z_l), -1)).abs().max()) == 0.0


def test_static_fusion_with_alpha_one_is_proxy_tuning():
    z_l, z_s, z_e = logits(0), logits(1), logits(2)
    torch.testing.assert_close(static_fusion(z_l, 1.0 * z_e - 1.0 * z_s), z_l + (z_e - z_s))


# ---- over HTTP -------------------------------------------------------------------------------

def reseeded_copy(src: Path, dst: Path, seed: int) -> Path:
    """The tiny model with the same tokenizer and different random weights (a 'large' model here)."""
    shutil.copytree(src, dst)
    model = AutoModelForCausalLM.from_pretrained(src)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    model.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def members(tiny_model_dir: Path, adapter_dir: Path, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fusion")
    return {"large": str(reseeded_copy(tiny_model_dir, root / "large", 1)), "small": str(tiny_model_dir),
            "expert": str(adapter_dir)}


def ensemble(name: str, m: dict, **kw) -> dict:
    return {"name": name, "large": m["large"], "small_base": m["small"], "experts": [{"path": m["expert"]}],
            "dtype": "float32", "large_num_cpus": 0.25, "small_num_cpus": 0.25, "default_max_tokens": 12, **kw}


@pytest.fixture(scope="module")
def client(members):
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    port = free_port()
    config = {
        "models": [{"name": "large", "path": members["large"], "dtype": "float32", "num_cpus": 0.5}],
        "ensembles": [ensemble("fused-zero", members, fusion="static", experts=[{"path": members["expert"], "alpha": 0.0}]),
                      ensemble("fused-dlf", members)],
        "api_key": API_KEY, "host": "127.0.0.1", "port": port,
    }
    serve.shutdown()  # a Serve left running by another module would keep its own port
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="fusion", route_prefix="/")
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    serve.shutdown()
    if started_ray:
        ray.shutdown()


def test_ensembles_are_listed_next_to_models(client):
    assert {m.id for m in client.models.list()} == {"large", "fused-zero", "fused-dlf"}


@pytest.mark.parametrize("prompt", ["The answer is", "Classify the topic: cooking eggs", "x"])
def test_alpha_zero_fusion_equals_the_large_model_greedy_output(client, prompt):
    def greedy(model):
        out = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
        return out.choices[0].text, out.usage.completion_tokens

    assert greedy("fused-zero") == greedy("large")
    assert greedy("fused-dlf")[1] > 0


def test_dynamic_ensemble_chats_and_streams(client):
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    whole = client.chat.completions.create(model="fused-dlf", messages=messages, max_tokens=8, temperature=0)
    chunks = client.chat.completions.create(model="fused-dlf", messages=messages, max_tokens=8, temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content and whole.usage.completion_tokens > 0


def test_a_member_with_another_vocabulary_is_refused_at_build_time(members, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(members["small"], other)
    build_tiny_tokenizer(vocab_size=600).save_pretrained(other)
    config = parse_serve_config({"ensembles": [{**ensemble("bad", members), "experts": [{"path": str(other)}]}]})
    with pytest.raises(ServeConfigError, match=r"ensembles\.0\.experts\.0\.path: .* different tokenizer"):
        build_app(config)
