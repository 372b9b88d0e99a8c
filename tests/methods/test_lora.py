"""LoRA family: only adapter weights train, a fresh adapter leaves outputs unchanged, PiSSA exports load on the original base."""

import copy

import pytest
import torch

from ftray.config import build_spec
from ftray.eval.loading import load_checkpoint
from ftray.methods import Context, build_methods
from ftray.models import load_model
from ftray.train.checkpoint import export_hf
from tests.methods.helpers import run_steps, tiny_llama

IDS = torch.arange(3, 19).unsqueeze(0)


def out(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def prepared(variant, base, **fields):
    spec = build_spec({"methods": [{"name": "lora", "variant": variant, **fields}]})
    (lora,) = build_methods(spec.methods)
    return lora.prepare_model(copy.deepcopy(base), Context(spec=spec, tokenizer=None))


def test_only_adapter_weights_train_with_rank_r_shapes():
    base = tiny_llama()
    model, _, _ = run_steps(copy.deepcopy(base), [{"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}], steps=3)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 4 * 2 * 2  # 4 layers × {q, v} × {A, B}
    assert all(4 in p.shape for p in trainable.values())
    merged = model.merge_and_unload()
    frozen_same = [torch.equal(dict(base.named_parameters())[n], p) for n, p in merged.named_parameters() if "q_proj" not in n and "v_proj" not in n]
    assert all(frozen_same)  # everything but the adapted projections is bit-identical


@pytest.mark.parametrize("variant", ["lora", "dora", "pissa", "olora"])
def test_fresh_adapter_starts_at_the_base_model(variant):
    base = tiny_llama()
    torch.testing.assert_close(out(prepared(variant, base)), out(base), rtol=1e-4, atol=1e-4)


def test_dora_adds_magnitude_vectors():
    names = [n for n, p in prepared("dora", tiny_llama()).named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names)


def test_pissa_checkpoint_converts_to_plain_lora_on_the_original_base(tiny_model_dir, tmp_path):
    base = load_model(str(tiny_model_dir))
    model, _, _ = run_steps(prepared("pissa", base, r=4), [], steps=0)
    with torch.no_grad():  # stand-in for training: move the adapter away from its init
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.01 * torch.randn_like(p))
    export_hf(model, model.state_dict(), tmp_path / "pissa")
    (tmp_path / "pissa" / "tokenizer_config.json").write_text((tiny_model_dir / "tokenizer_config.json").read_text())
    (tmp_path / "pissa" / "tokenizer.json").write_text((tiny_model_dir / "tokenizer.json").read_text())
    reloaded, _ = load_checkpoint(tmp_path / "pissa")  # original (un-residualised) base + converted adapter
    torch.testing.assert_close(out(reloaded), out(model), rtol=1e-3, atol=1e-3)
