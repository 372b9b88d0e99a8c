"""Noise-robust losses: GCE's limits (q→0 is CE, q=1 is MAE), RCE's closed forms and bounded influence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ftray.config import build_spec
from ftray.methods import Context, build_methods
from ftray.methods.noise_robust import gce, rce


def criterion(**fields):
    spec = build_spec({"methods": [{"name": "noise_robust", **fields}], "task": {"type": "classification"}})
    (m,) = build_methods(spec.methods)
    return lambda z, y: m.criterion(z, y, Context(spec=spec, tokenizer=None))


def test_gce_limits():
    z, y = torch.randn(16, 5, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 5
    # (1 − p^q)/q = −log p − q·log²p/2 + …: within 1e-3 relative (absolute 1e-3 holds for CE < ~4.4)
    torch.testing.assert_close(gce(z, y, 1e-4), F.cross_entropy(z, y, reduction="none"), atol=0, rtol=1e-3)
    torch.testing.assert_close(gce(z, y, 1.0), 1 - z.softmax(-1)[torch.arange(16), y])
    # the method's pure-GCE criterion with q→0 sums to CE's sum
    assert criterion(q=1e-4, ce_weight=0.0)(z, y).item() == pytest.approx(F.cross_entropy(z, y, reduction="sum").item(), abs=1e-2)


def test_rce_forms_and_signs():
    z, y = torch.randn(8, 4), torch.arange(8) % 4
    p_y = z.softmax(-1)[torch.arange(8), y]
    torch.testing.assert_close(rce(z, y, "original"), 4 * (1 - p_y))
    torch.testing.assert_close(rce(z, y, "nlki"), -p_y)
    assert (gce(z, y, 0.7) >= 0).all() and (rce(z, y) >= 0).all()
    assert ((rce(z, y, "nlki") >= -1) & (rce(z, y, "nlki") <= 0)).all()


def test_bounded_influence_of_a_confidently_wrong_label():
    z = torch.tensor([[0.0, 9.2, 0.0, 0.0]], requires_grad=True)  # p_y(label 0) ≈ 1e-4 ≪ 0.01
    y = torch.tensor([0])
    (g_ce,) = torch.autograd.grad(F.cross_entropy(z, y), z)
    (g_gce,) = torch.autograd.grad(gce(z, y, 0.7).sum(), z)
    (g_sce,) = torch.autograd.grad(criterion(loss="sce", alpha=0.0)(z, y), z)
    assert g_gce.norm() < 0.01 * g_ce.norm() and g_sce.norm() < 0.01 * g_ce.norm()


def test_ignored_targets_drop_out_and_defaults_are_nlki():
    z, y = torch.randn(6, 3), torch.tensor([0, 1, -100, 2, -100, 1])
    keep = y != -100
    crit = criterion()
    expected = 0.4 * F.cross_entropy(z[keep], y[keep], reduction="sum") + 0.6 * gce(z[keep], y[keep], 0.7).sum()
    torch.testing.assert_close(crit(z, y), expected)
