"""CAR: the surrogate's shape, the spectral term as the top singular value, the EMA, the tail weighting,
state across resume, and two DDP ranks agreeing with one process on the concatenated batch."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ftray.config import build_spec
from ftray.methods import Context, build_methods
from ftray.methods.car import batch_confusion, class_weights, spectral_norm

K = 4


def make(**fields):
    """A CAR method and its context on the long-tailed bundled set, counts read as a worker would."""
    spec = build_spec({"task": {"type": "classification", "num_labels": K},
                       "data": {"source": "bundled:classification_lt"}, "methods": [{"name": "car", **fields}]})
    (m,) = build_methods(spec.methods)
    ctx = Context(spec=spec, tokenizer=None)
    m.prepare_model(torch.nn.Identity(), ctx)
    return m, ctx


def toy(seed: int, b: int = 12, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(b, K, generator=g, dtype=dtype), torch.randint(0, K, (b,), generator=g)


def step(m, ctx, z, y):
    return m.loss(None, {"labels": y}, SimpleNamespace(logits=z), ctx)[0]


def test_surrogate_zero_diagonal_nonnegative_columns_at_most_one():
    z, y = toy(0)
    y[y == 3] = 2  # class 3 absent from the batch: its column is all zeros
    c = batch_confusion(z, y, tau=1.0)
    assert torch.equal(c.diag(), torch.zeros(K)) and (c >= 0).all()
    assert (c.sum(0) <= 1 + 1e-6).all() and torch.equal(c[:, 3], torch.zeros(K))
    # by hand for one sample of class 0: σ(z_i − z_0)·softmax(z)_i for i ≠ 0
    z1, y1 = z[:1], torch.tensor([0])
    p, gate = z1.softmax(1)[0], torch.sigmoid(z1[0] - z1[0, 0])
    torch.testing.assert_close(batch_confusion(z1, y1, 1.0)[:, 0], torch.cat([torch.zeros(1), (gate * p)[1:]]))


def test_confident_correct_predictions_give_zero_regularizer():
    y = torch.arange(K).repeat(3)
    z = 60.0 * torch.nn.functional.one_hot(y, K).float()  # margin → ∞ on the true class
    m, ctx = make()
    assert batch_confusion(z, y, 1.0).abs().max() < 1e-20
    for _ in range(2):
        assert step(m, ctx, z, y).item() < 1e-20


def test_spectral_term_is_the_top_singular_value_of_weighted_ema():
    m, ctx = make(lam=0.5)
    (z1, y1), (z2, y2) = toy(1), toy(2)
    step(m, ctx, z1, y1)
    loss = step(m, ctx, z2, y2)
    counts = torch.tensor([250.0, 54.0, 12.0, 2.0])  # bundled:classification_lt, counted by prepare_model
    w = 1 / torch.sqrt(counts / counts.sum() + 0.2)
    w = w / w.mean()
    cw = (m.ema @ torch.diag(w)).double()
    assert loss.item() / 0.5 == pytest.approx(torch.linalg.matrix_norm(cw, ord=2).item(), rel=1e-5)
    assert loss.item() / 0.5 == pytest.approx(np.linalg.svd(cw.numpy(), compute_uv=False)[0], rel=1e-5)


def test_ema_update_rule_and_first_step_has_no_gradient():
    m, ctx = make(beta=0.9)
    (z1, y1), (z2, y2) = toy(3), toy(4)
    z1.requires_grad_(True)
    assert not step(m, ctx, z1, y1).requires_grad  # first batch: C̄ = sg(C_t), as the reference does
    torch.testing.assert_close(m.ema, batch_confusion(z1, y1, 1.0).detach())
    c_prev = m.ema.clone()
    z2.requires_grad_(True)
    assert step(m, ctx, z2, y2).requires_grad
    torch.testing.assert_close(m.ema, 0.9 * c_prev + 0.1 * batch_confusion(z2, y2, 1.0).detach())


def test_gradient_flows_only_through_the_softmax_term():
    z0, y = toy(5, b=6, dtype=torch.float64)
    w = torch.tensor([0.5, 0.8, 1.2, 1.5], dtype=torch.float64)
    prev = batch_confusion(toy(6, b=6, dtype=torch.float64)[0], y, 1.0)

    def spec_term(z, frozen=None):
        """0.1·C_t(z) through the EMA; `frozen` holds the gate and the true-class logit at a fixed point."""
        if frozen is None:
            c_t = batch_confusion(z, y, 1.0)
        else:
            g, zt = frozen
            off = 1 - torch.nn.functional.one_hot(y, K).double()
            s = torch.softmax(z - zt, 1) * off
            c_t = (g * s).T @ torch.nn.functional.one_hot(y, K).double() / torch.bincount(y, minlength=K).clamp(min=1)
        return spectral_norm(0.9 * prev + 0.1 * c_t, w)

    z = z0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(spec_term(z), z)
    zt = z0.gather(1, y[:, None])
    frozen = (torch.sigmoid(z0 - zt) * (1 - torch.nn.functional.one_hot(y, K).double()), zt)
    eps, fd_soft, fd_full = 1e-6, torch.zeros_like(z0), torch.zeros_like(z0)
    for idx in np.ndindex(*z0.shape):
        e = torch.zeros_like(z0)
        e[idx] = eps
        fd_soft[idx] = (spec_term(z0 + e, frozen) - spec_term(z0 - e, frozen)) / (2 * eps)
        fd_full[idx] = (spec_term(z0 + e) - spec_term(z0 - e)) / (2 * eps)
    assert grad.abs().max() > 1e-4
    torch.testing.assert_close(grad, fd_soft, atol=1e-7, rtol=1e-5)  # exactly the softmax path
    assert (grad - fd_full).abs().max() > 1e-4  # the gate's dependence on z is not differentiated


def test_weights_favour_tail_classes_and_counts_come_from_training_rows():
    m, _ = make()
    assert m.counts == [250, 54, 12, 2]
    w = m.weights(K, torch.device("cpu"))
    assert (w[1:] > w[:-1]).all() and w.mean().item() == pytest.approx(1.0)
    torch.testing.assert_close(class_weights(torch.tensor([1, 1, 1, 1]), 0.2), torch.ones(K))
    # the same confusion mass costs more in a tail column than in the head column
    c_head, c_tail = torch.zeros(K, K), torch.zeros(K, K)
    c_head[1, 0], c_tail[0, 3] = 0.5, 0.5
    assert spectral_norm(c_tail, w) > 2 * spectral_norm(c_head, w)
    unweighted, _ = make(weighting=False)
    torch.testing.assert_close(unweighted.weights(K, torch.device("cpu")), torch.ones(K))


def test_state_dict_resumes_the_same_ema_and_counts():
    m, ctx = make()
    for s in (7, 8):
        step(m, ctx, *toy(s))
    state = m.state_dict()
    fresh, _ = make(class_counts=None)
    fresh.counts, fresh.counted = None, False  # a resumed worker before it counts anything
    fresh.load_state_dict(state)
    fresh.prepare_model(torch.nn.Identity(), ctx)
    assert fresh.counts == m.counts
    z, y = toy(9)
    torch.testing.assert_close(step(fresh, ctx, z, y), step(m, ctx, z, y))


def _rank(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    m, ctx = make()
    ctx.rank, ctx.world_size = rank, world
    grads = []
    for s in (10, 11):
        z, y = toy(s, b=8)
        z = z[rank * 4 : (rank + 1) * 4].clone().requires_grad_(True)
        loss = step(m, ctx, z, y[rank * 4 : (rank + 1) * 4])
        grads.append(torch.autograd.grad(loss, z)[0] if loss.requires_grad else torch.zeros_like(z))
    torch.save({"ema": m.ema, "grads": grads}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ddp_ranks_match_one_process_on_the_whole_batch(tmp_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # fork: the children inherit the imported modules (spawn would re-import transformers & co. per rank)
    mp.start_processes(_rank, args=(2, f"file://{tmp_path}/store", str(tmp_path)), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    m, ctx = make()
    whole = []
    for s in (10, 11):
        z, y = toy(s, b=8)
        z.requires_grad_(True)
        loss = step(m, ctx, z, y)
        whole.append(torch.autograd.grad(loss, z)[0] if loss.requires_grad else torch.zeros_like(z))
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["ema"], m.ema)  # every rank holds the global EMA
        for g_rank, g_whole in zip(got["grads"], whole):
            # DDP averages the two ranks' gradients: half of each rank's equals one process's
            torch.testing.assert_close(g_rank / 2, g_whole[r * 4 : (r + 1) * 4])
    assert whole[1].abs().max() > 0
