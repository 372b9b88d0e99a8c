"""CorDA: the initialised model equals the base, W = W_res + s·B·A exactly, and the adapter holds the
largest (IPM) or smallest (KPM) components of W·C for the covariance C of the calibration inputs."""

import copy

import pytest
import torch

from ftray.config import build_spec
from ftray.methods import Context, build_methods
from ftray.models import load_model

IDS = torch.arange(3, 19).unsqueeze(0)
R = 8


def setup(mode, tiny_model_dir, tiny_tokenizer):
    spec = build_spec({"model": {"name": str(tiny_model_dir)},
                       "methods": [{"name": "corda", "mode": mode, "r": R, "calibration_samples": 32}]})
    (corda,) = build_methods(spec.methods)
    return corda, Context(spec=spec, tokenizer=tiny_tokenizer)


@pytest.fixture(scope="module", params=["ipm", "kpm"])
def prepared(request, tiny_model_dir, tiny_tokenizer):
    corda, ctx = setup(request.param, tiny_model_dir, tiny_tokenizer)
    base = load_model(str(tiny_model_dir))
    return request.param, base, corda.prepare_model(copy.deepcopy(base), ctx), corda.calibration_ids(ctx)


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def targets(model):
    """(name, LoRA layer) of every adapted linear."""
    return [(n.removeprefix("base_model.model."), m) for n, m in model.named_modules() if hasattr(m, "lora_A") and m.lora_A]


def damped_covariance(base, name, rows):
    """C̃ = mean over rows of (X/max X)ᵀ(X/max X), damped until C̃·C̃⁻¹ ≈ I (the spec's steps 1-2)."""
    acc = []
    hook = base.get_submodule(name).register_forward_hook(lambda m, i, o: acc.append(i[0][0] / i[0].max().abs()))
    with torch.no_grad():
        for ids in rows:
            base(input_ids=torch.tensor([ids]))
    hook.remove()
    c = sum(x.T @ x for x in acc) / len(acc)
    damp = 0.01
    while True:
        fixed = c + damp * c.diag().mean() * torch.eye(len(c))
        if torch.dist(fixed @ torch.linalg.inv(fixed), torch.eye(len(c))) < 0.05:
            return fixed
        damp *= 2


def test_initialised_model_equals_base_and_residual_is_exact(prepared):
    mode, base, model, _ = prepared
    torch.testing.assert_close(logits(model), logits(base), rtol=1e-4, atol=1e-4)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "lora_A" in n or "lora_B" in n}
    layers = targets(model)
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in both layers
    for name, layer in layers:
        w = base.get_submodule(name).weight
        s = layer.scaling["default"]
        assert s == 1.0  # alpha = r
        delta = s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(layer.get_base_layer().weight + delta, w, rtol=0, atol=1e-5)


def test_adapter_holds_the_covariance_oriented_components(prepared):
    """sv(s·B·A·C̃) = the r largest (IPM) or r smallest (KPM) singular values of W·C̃, not those of W."""
    mode, base, model, rows = prepared
    for name, layer in targets(model)[:: 3]:  # a spread of modules (every third) keeps the test fast
        w = base.get_submodule(name).weight
        c = damped_covariance(base, name, rows)
        s_wc = torch.linalg.svdvals(w @ c)
        kept = s_wc[:R] if mode == "ipm" else s_wc[-R:]
        delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(torch.linalg.svdvals(delta @ c)[:R], kept, rtol=1e-3, atol=1e-5)
        plain = torch.linalg.svdvals(w)[:R] if mode == "ipm" else torch.linalg.svdvals(w)[-R:]
        assert not torch.allclose(torch.linalg.svdvals(delta)[:R], plain, rtol=1e-2)  # context changed the choice


def test_kpm_calibrates_on_knowledge_prompts_and_ipm_on_whole_training_rows(tiny_model_dir, tiny_tokenizer):
    kpm, ctx = setup("kpm", tiny_model_dir, tiny_tokenizer)
    prompts = [tiny_tokenizer.decode(ids) for ids in kpm.calibration_ids(ctx)]
    assert len(prompts) == 32 and all(p.endswith("<|im_start|>assistant\n") for p in prompts)  # questions only
    assert "How many grams are in 1 kilogram?" in prompts[0]  # bundled:factual_qa
    ipm, ctx = setup("ipm", tiny_model_dir, tiny_tokenizer)
    rows = [tiny_tokenizer.decode(ids) for ids in ipm.calibration_ids(ctx)]
    assert all(r.endswith("<|im_end|>\n") and "The answer is" in r for r in rows)  # arithmetic, with replies


def test_rank_is_capped_by_small_modules_and_fsdp_is_refused(tiny_model_dir, tiny_tokenizer):
    corda, _ = setup("ipm", tiny_model_dir, tiny_tokenizer)
    corda.config.r = 128
    config = corda.lora_config(load_model(str(tiny_model_dir)))
    assert config.rank_pattern[r"model\.layers\.0\.self_attn\.k_proj"] == 32  # 64 → 32 (2 kv heads)
    assert config.alpha_pattern[r"model\.layers\.0\.self_attn\.k_proj"] == 32  # alpha follows: s stays 1
    with pytest.raises(Exception, match="fsdp"):
        build_spec({"methods": ["corda"], "scaling": {"strategy": "fsdp"}})
