"""Full fine-tuning: every parameter is trainable and moves."""

import copy

import torch

from tests.methods.helpers import run_steps, tiny_llama


def test_every_parameter_trains():
    base = tiny_llama()
    model, _, _ = run_steps(copy.deepcopy(base), ["full"], steps=2)
    b = dict(base.named_parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert all(not torch.equal(p, b[n]) for n, p in model.named_parameters())
