"""HFT: half of each parameter category trains; every frozen tensor is bit-identical after training."""

import copy

import pytest
import torch

from ftray.methods.hft import ATTENTION, FFN, NORMS, block_parameters
from tests.methods.helpers import run_steps, tiny_llama


def changed(before, after) -> set[str]:
    b = dict(before.named_parameters())
    return {n for n, p in after.named_parameters() if not torch.equal(p, b[n])}


def test_half_of_each_category_trains_and_frozen_tensors_stay_bit_identical():
    base = tiny_llama(layers=4)
    model, methods, _ = run_steps(copy.deepcopy(base), ["hft"], steps=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen_blocks = block_parameters(model) - trainable
    assert changed(base, model) == trainable  # exactly the selected tensors moved
    assert not frozen_blocks & changed(base, model)
    ffn_counts = []
    for i in range(4):
        pre = f"model.layers.{i}."
        attn = [m for m in ATTENTION if f"{pre}self_attn.{m}.weight" in trainable]
        ffn = [m for m in FFN if f"{pre}mlp.{m}.weight" in trainable]
        norms = [m for m in NORMS if f"{pre}{m}.weight" in trainable]
        assert len(attn) == 2 and len(norms) == 1
        ffn_counts.append(len(ffn))
    assert sorted(ffn_counts) == [1, 1, 2, 2]  # half the layers update 2 of 3, the other half 1
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= trainable
    # MHA, even layer count: exactly 50% of the decoder-block matrices (norms aside) train.
    params = dict(model.named_parameters())
    mats = [n for n in block_parameters(model) if "norm" not in n]
    share = sum(params[n].numel() for n in mats if n in trainable) / sum(params[n].numel() for n in mats)
    assert share == pytest.approx(0.5, abs=1e-12)


def test_gqa_share_is_reported_not_exactly_half():
    model, _, _ = run_steps(tiny_llama(layers=4, kv_heads=1), ["hft"], steps=1)
    params = dict(model.named_parameters())
    mats = [n for n in block_parameters(model) if "norm" not in n]
    share = sum(params[n].numel() for n in mats if params[n].requires_grad) / sum(params[n].numel() for n in mats)
    assert 0.3 < share < 0.7


def test_selection_is_seeded_and_differs_between_stages():
    def selection(seed, phase="train"):
        from ftray.config import build_spec
        from ftray.methods import Context, build_methods

        spec = build_spec({"methods": ["hft"], "train": {"seed": seed}})
        m = build_methods(spec.methods)[0]
        model = m.prepare_model(tiny_llama(layers=8), Context(spec=spec, tokenizer=None, phase=phase))
        return {n for n, p in model.named_parameters() if p.requires_grad}

    assert selection(0) == selection(0)  # every DDP rank draws the same half
    assert selection(0) != selection(0, phase="stage-2")
    assert selection(0) != selection(1)


def test_epoch_mode_drops_frozen_gradients_and_reselects():
    base = tiny_llama(layers=4)
    model, (hft,), ctx = run_steps(copy.deepcopy(base), [{"name": "hft", "reselect": "epoch"}], steps=2)
    assert all(p.requires_grad for p in model.parameters())  # DDP-safe: the graph never changes
    first_frozen = set(hft.frozen)
    assert not first_frozen & changed(base, model)
    ctx.epoch = 1
    hft.on_step(model, None, ctx)
    assert hft.frozen != first_frozen


def test_selection_is_identical_across_processes():
    """Every DDP rank is its own process: the draw must not depend on Python's salted str hash."""
    import subprocess
    import sys

    code = (
        "from ftray.config import build_spec; from ftray.methods import Context, build_methods;"
        "from tests.methods.helpers import tiny_llama;"
        "spec = build_spec({'methods': ['hft']}); m = build_methods(spec.methods)[0];"
        "model = m.prepare_model(tiny_llama(layers=8), Context(spec=spec, tokenizer=None));"
        "print(sorted(n for n, p in model.named_parameters() if p.requires_grad))"
    )
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(s), "PATH": ""}, cwd=str(__import__("pathlib").Path(__file__).parents[2])).stdout
            for s in (1, 2)}
    assert len(outs) == 1
