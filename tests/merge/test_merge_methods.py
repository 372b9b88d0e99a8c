"""Uniform soup, task arithmetic and LiNeS on the tiny model: the identities each paper's method must satisfy."""

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ftray.merge import merge_checkpoints
from ftray.merge.lines import block_index
from tests.merge.helpers import full_checkpoint, lora_checkpoint, state_of


@pytest.fixture(scope="module")
def ckpts(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    return {
        "full_a": full_checkpoint(tiny_model_dir, d / "full_a", seed=1),
        "full_b": full_checkpoint(tiny_model_dir, d / "full_b", seed=2),
        "lora_a": lora_checkpoint(tiny_model_dir, d / "lora_a", seed=3),
        "lora_b": lora_checkpoint(tiny_model_dir, d / "lora_b", seed=4, r=2),
    }


def assert_equal_states(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kind", ["full_a", "lora_a"])
def test_uniform_soup_of_copies_is_the_checkpoint(ckpts, kind, tmp_path):
    out = merge_checkpoints("uniform", [str(ckpts[kind])] * 3, tmp_path / "soup")
    assert_equal_states(state_of(out), state_of(ckpts[kind]))  # bit-identical: float64 sums of copies are exact
    record = yaml.safe_load((out / "merge.yaml").read_text())
    assert record["method"] == "uniform" and len(record["checkpoints"]) == 3


def test_uniform_soup_of_loras_averages_the_dense_updates(ckpts, tiny_model_dir, tmp_path):
    out = merge_checkpoints("uniform", [str(ckpts["lora_a"]), str(ckpts["lora_b"])], tmp_path / "soup")
    soup, a, b, base = (state_of(p) for p in (out, ckpts["lora_a"], ckpts["lora_b"], tiny_model_dir))
    for k in base:  # θ0 + mean_k(s_k B_k A_k), for adapters of different ranks
        torch.testing.assert_close(soup[k], base[k] + ((a[k] - base[k]) + (b[k] - base[k])) / 2, rtol=0, atol=1e-6)
    assert any(not torch.equal(soup[k], base[k]) for k in base)
    key = "model.layers.1.mlp.down_proj.weight"  # and from the adapters' own factors: θ0 + mean(s·B·A), s = alpha/r = 2
    deltas = []
    for name in ("lora_a", "lora_b"):
        f = load_file(ckpts[name] / "adapter_model.safetensors")
        prefix = "base_model.model." + key.removesuffix(".weight")
        deltas.append(2.0 * f[f"{prefix}.lora_B.weight"] @ f[f"{prefix}.lora_A.weight"])
    torch.testing.assert_close(soup[key], base[key] + (deltas[0] + deltas[1]) / 2, rtol=0, atol=1e-6)
    AutoModelForCausalLM.from_pretrained(out)  # a normal checkpoint, loadable without ftray


def test_task_arithmetic_identities(ckpts, tiny_model_dir, tmp_path):
    a = str(ckpts["full_a"])
    one = merge_checkpoints("task_arithmetic", [a], tmp_path / "one", base=str(tiny_model_dir), scale=1.0)
    assert_equal_states(state_of(one), state_of(a))
    zero = merge_checkpoints("task_arithmetic", [a], tmp_path / "zero", base=str(tiny_model_dir), scale=0.0)
    assert_equal_states(state_of(zero), state_of(tiny_model_dir))
    two = merge_checkpoints("task_arithmetic", [a, str(ckpts["lora_a"])], tmp_path / "two", base=str(tiny_model_dir), scale=0.4)
    s, ta, tb, base = (state_of(p) for p in (two, a, ckpts["lora_a"], tiny_model_dir))
    for k in base:
        torch.testing.assert_close(s[k], base[k] + 0.4 * ((ta[k] - base[k]) + (tb[k] - base[k])), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["full_a", "lora_a"])
def test_lines_endpoints_are_the_finetuned_and_the_base_model(ckpts, kind, tiny_model_dir, tmp_path):
    base = str(tiny_model_dir)
    ft = merge_checkpoints("lines", [str(ckpts[kind])], tmp_path / "ft", base=base, alpha=1.0, beta=0.0)
    assert_equal_states(state_of(ft), state_of(ckpts[kind]))
    b0 = merge_checkpoints("lines", [str(ckpts[kind])], tmp_path / "b0", base=base, alpha=0.0, beta=0.0)
    assert_equal_states(state_of(b0), state_of(tiny_model_dir))


def test_lines_scales_each_block_linearly_in_depth(ckpts, tiny_model_dir, tmp_path):
    alpha, beta = 0.2, 0.5
    out = merge_checkpoints("lines", [str(ckpts["full_a"])], tmp_path / "l", base=str(tiny_model_dir), alpha=alpha, beta=beta)
    merged, ft, base = (state_of(p) for p in (out, ckpts["full_a"], tiny_model_dir))
    seen = set()
    for k in base:
        layer = block_index(k)
        expected = {None: alpha, 0: alpha, 1: alpha + beta}[layer]  # the tiny model has L=2 blocks
        seen.add(layer)
        torch.testing.assert_close(merged[k] - base[k], expected * (ft[k] - base[k]), rtol=0, atol=1e-6, msg=k)
    assert seen == {None, 0, 1}  # embeddings/final norm/lm_head, first block, last block
    record = yaml.safe_load((out / "merge.yaml").read_text())
    assert record["params"] == {"alpha": alpha, "beta": beta}


def test_lines_defaults_follow_the_paper(ckpts, tiny_model_dir, tmp_path):
    one = merge_checkpoints("lines", [str(ckpts["full_a"])], tmp_path / "one", base=str(tiny_model_dir))
    assert yaml.safe_load((one / "merge.yaml").read_text())["params"] == {"alpha": 0.1, "beta": pytest.approx(0.9)}
    two = merge_checkpoints("lines", [str(ckpts["full_a"]), str(ckpts["full_b"])], tmp_path / "two", base=str(tiny_model_dir))
    assert yaml.safe_load((two / "merge.yaml").read_text())["params"] == {"alpha": 0.5, "beta": 0.5}  # α = 1/T


def test_block_index_reads_the_block_prefix_only():
    assert block_index("model.layers.12.self_attn.q_proj.weight") == 12
    assert block_index("transformer.h.3.attn.c_attn.weight") == 3
    assert block_index("model.embed_tokens.weight") is None
    assert block_index("model.norm.weight") is None and block_index("lm_head.weight") is None
    assert block_index("model.moe.experts.3.w1.weight") is None
