"""LocFT-BF: only the chosen tensor moves; epochs cover every edit once; converged batches are skipped."""

import copy

import pytest
import torch

from ftray.config import build_spec
from ftray.methods import Context, build_methods
from ftray.methods.locft_bf import per_sample_loss
from ftray.data import collate
from ftray.train.loop import make_plan, micro_batches
from tests.methods.helpers import run_steps, tiny_llama


def changed(before, after) -> set[str]:
    b = dict(before.named_parameters())
    return {n for n, p in after.named_parameters() if not torch.equal(p, b[n])}


def method(**fields):
    spec = build_spec({"methods": [{"name": "locft_bf", **fields}]})
    return build_methods(spec.methods)[0], spec


def test_only_the_target_tensor_differs_from_the_base():
    base = tiny_llama(layers=4)
    model, _, _ = run_steps(copy.deepcopy(base), ["locft_bf"], steps=3)
    # default location: floor(22/32 × 4) = layer 2's down-projection, nothing else
    assert changed(base, model) == {"model.layers.2.mlp.down_proj.weight"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"model.layers.2.mlp.down_proj.weight"}


def test_entire_layer_location_and_explicit_layer():
    base = tiny_llama(layers=4)
    model, _, _ = run_steps(copy.deepcopy(base), [{"name": "locft_bf", "layer": 1, "module": ""}], steps=2)
    moved = changed(base, model)
    assert moved and all(n.startswith("model.layers.1.") for n in moved)
    assert "model.layers.1.self_attn.q_proj.weight" in moved and "model.layers.1.mlp.down_proj.weight" in moved


def test_proportional_position_for_smollm2_and_llama3():
    m, _ = method()
    assert m.target_prefix(tiny_llama(layers=30)) == "model.layers.20.mlp.down_proj"  # SmolLM2-135M
    assert m.target_prefix(tiny_llama(layers=32)) == "model.layers.22.mlp.down_proj"  # the paper's Llama-3-8B
    with pytest.raises(ValueError, match="out of range"):
        method(layer=9)[0].target_prefix(tiny_llama(layers=4))
    with pytest.raises(ValueError, match="no sub-module"):
        method(module="mlp.nope")[0].target_prefix(tiny_llama(layers=4))


def test_batches_below_skip_loss_are_not_applied():
    base = tiny_llama(layers=4)
    model, (m,), _ = run_steps(copy.deepcopy(base), [{"name": "locft_bf", "skip_loss": 1e9}], steps=3)
    assert changed(base, model) == set() and m.skipped == 3
    model, (m,), _ = run_steps(copy.deepcopy(base), [{"name": "locft_bf", "skip_loss": 0.0}], steps=3)
    assert changed(base, model) and m.skipped == 0


def test_breadth_first_epochs_see_every_edit_once_and_updates_are_batches_minus_skipped():
    """N = 40 edits, B = 8: 5 steps per epoch, a fresh shuffle each epoch, every edit exactly once."""
    m, spec = method()
    spec = build_spec({"methods": spec.methods, "train": {"batch_size": 4, "grad_accum": 2, "epochs": 3}})
    rows = [{"input_ids": [i + 1, 1], "labels": [-100, 1], "span_ids": [0, 1]} for i in range(40)]
    plan = make_plan(spec, len(rows), 1, [m])
    assert (plan.steps_per_epoch, plan.max_steps) == (5, 15)
    orders = []
    for epoch in range(3):
        seen = [int(t) - 1 for s in range(5) for b in micro_batches(rows, spec, epoch * 5 + s, plan, 0, 1, lambda b: collate(b, 0))
                for t in b["input_ids"][:, 0]]
        assert sorted(seen) == list(range(40))
        orders.append(seen)
    assert orders[0] != orders[1]
    # the stop rule: an epoch whose mean batch loss is below stop_loss turns every later step into a skip
    ctx = Context(spec=spec, tokenizer=None)
    m.epoch_sum, m.epoch_steps, ctx.epoch = 0.001 * 5, 5, 1
    m.on_step(None, None, ctx)
    assert m.converged and (m.epoch, m.epoch_steps) == (1, 0)
    model = tiny_llama(layers=2)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    m._step_sum, m._step_n = 5.0, 1  # a high loss, yet converged: skipped
    m.after_backward(model, ctx)
    assert all(p.grad is None for p in model.parameters()) and m.skipped == 1
    restored = method()[0]
    restored.load_state_dict(m.state_dict())
    assert restored.converged and restored.skipped == 1


def test_loss_is_per_sample_mean_then_batch_mean():
    class Out:
        logits = torch.randn(2, 5, 11)

    labels = torch.full((2, 6), -100)
    labels[0, 1:6] = torch.tensor([1, 2, 3, 4, 5])  # 5 target tokens
    labels[1, 5] = 7  # 1 target token
    batch = {"labels": labels, "logit_positions": torch.arange(5)}
    sample_mean, token_mean = per_sample_loss(batch, Out)
    ce = torch.nn.functional.cross_entropy(Out.logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
    row0, row1 = ce[0].mean(), ce[1, 4]
    torch.testing.assert_close(sample_mean, (row0 + row1) / 2)
    torch.testing.assert_close(token_mean, (ce[0].sum() + row1) / 6)
