"""DR-Tune: rotation and per-class translation of the calibration, the frozen encoder, the queues, resume and DDP."""

import math
import os
import tempfile
import threading

import pytest
import torch
import torch.nn.functional as F

from ftray.methods import dr_tune
from ftray.methods.dr_tune import DRTune, calibrate, gather_rows, rotation, translate
from tests.methods.test_core_tuning import cls_setup, steps


def test_rotation_recovers_a_rigid_map_and_never_increases_the_distance():
    torch.manual_seed(0)
    x = torch.randn(32, 6)
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    q = q if torch.linalg.det(q) > 0 else q @ torch.diag(torch.tensor([1.0, 1, 1, 1, 1, -1]))  # a rotation
    r, t = rotation(x, x @ q.T + 0.5)
    torch.testing.assert_close(r, q, atol=1e-4, rtol=0)
    torch.testing.assert_close(t, torch.full((6,), 0.5), atol=1e-4, rtol=0)
    for seed in range(5):  # unrelated normalised queues (K < D too): the fitted map only brings them closer
        g = torch.Generator().manual_seed(seed)
        a, b = F.normalize(torch.randn(16, 24, generator=g), dim=1), F.normalize(torch.randn(16, 24, generator=g) + 0.3, dim=1)
        r, t = rotation(a, b)
        assert torch.linalg.det(r) > 0
        assert ((a @ r.T + t - b) ** 2).sum(1).mean() <= ((a - b) ** 2).sum(1).mean() + 1e-6


def test_translation_puts_each_class_mean_on_the_head_weighted_downstream_centre():
    torch.manual_seed(1)
    q_p, q_d = torch.randn(12, 5), torch.randn(12, 5)
    y = torch.tensor([0, 1, 2] * 4)
    w_hat = F.normalize(torch.randn(3, 5), dim=1)
    out = translate(q_p, q_d, y, w_hat)
    for c in range(3):
        a = torch.softmax(q_d[y == c] @ w_hat[c], 0)
        torch.testing.assert_close(out[y == c].mean(0), a @ q_d[y == c])
        torch.testing.assert_close(out[y == c] - q_p[y == c], (out[y == c] - q_p[y == c])[:1].expand(4, 5))  # a shift


def test_calibration_moves_pretrained_class_centres_toward_the_downstream_ones():
    torch.manual_seed(2)
    centres = F.normalize(torch.randn(3, 8), dim=1) * 3
    y = torch.arange(30) % 3
    q_d = centres[y] + 0.3 * torch.randn(30, 8)
    q_p = torch.randn(30, 8)  # pre-trained features: unrelated to the downstream classes
    r, t = rotation(F.normalize(q_p, dim=1), F.normalize(q_d, dim=1))
    out = calibrate(q_p, q_d, y, centres, r, t, scale=2.0)
    torch.testing.assert_close(out.norm(dim=1), torch.full((30,), 2.0))
    qd, qp = F.normalize(q_d, dim=1), F.normalize(q_p, dim=1)
    for c in range(3):
        m = y == c
        before = (qp[m].mean(0) - qd[m].mean(0)).norm()
        after = (F.normalize(out[m], dim=1).mean(0) - qd[m].mean(0)).norm()
        assert after < 0.5 * before


def test_frozen_encoder_is_untouched_queue_warms_up_and_dr_rows_only_train_the_head(tiny_model_dir, tiny_tokenizer):
    entries = ["full", {"name": "dr_tune", "queue_size": 10}]
    _, task, methods, ctx, model, batches = cls_setup(tiny_model_dir, tiny_tokenizer, entries, n_batches=3)
    method = methods[1]
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = steps(task, methods, ctx, model, batches)
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["dr_queue_ce"]) for m in metrics)
    ref = dict(method.reference.named_parameters())
    assert all(torch.equal(ref[n], p) and not ref[n].requires_grad for n, p in pretrained.items())
    assert any(not torch.equal(p, pretrained[n]) for n, p in model.named_parameters())
    assert method.count == 10 and method.calls == 3  # warm-up (3 batches of 4, FIFO) then one enqueue per step
    assert set(method.queue["y"].tolist()) <= {0, 1, 2, 3}

    # the DR rows' loss alone (out detached) reaches the head and nothing else
    model.zero_grad(set_to_none=True)
    out, _, _ = task.forward_and_loss(model, batches[0], None)
    out.features, out.logits = out.features.detach(), out.logits.detach()
    extra, _ = method.loss(model, batches[0], out, ctx)
    extra.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == {"score.weight"}


def test_zero_queue_weight_is_plain_fine_tuning(tiny_model_dir, tiny_tokenizer):
    _, task, methods, ctx, plain, batches = cls_setup(tiny_model_dir, tiny_tokenizer, ["full"])
    steps(task, methods, ctx, plain, batches)
    entries = ["full", {"name": "dr_tune", "queue_size": 6, "queue_weight": 0.0}]
    _, task, methods, ctx, model, batches = cls_setup(tiny_model_dir, tiny_tokenizer, entries)
    steps(task, methods, ctx, model, batches)
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, msg=n)


def test_state_dict_resumes_the_same_loss(tiny_model_dir, tiny_tokenizer):
    entries = ["full", {"name": "dr_tune", "queue_size": 8, "rotate_every": 3}]
    _, task, methods, ctx, model, batches = cls_setup(tiny_model_dir, tiny_tokenizer, entries)
    steps(task, methods, ctx, model, batches)
    state = methods[1].state_dict()
    resumed = DRTune(methods[1].config)
    resumed.load_state_dict(torch.load(_roundtrip(state), weights_only=False))
    resumed.reference = methods[1].reference
    with torch.no_grad():
        out, _, _ = task.forward_and_loss(model, batches[0], None)
        a, _ = methods[1].loss(model, batches[0], out, ctx)
        b, _ = resumed.loss(model, batches[0], out, ctx)
    assert float(a) == float(b)
    torch.testing.assert_close(methods[1].queue["p"], resumed.queue["p"])


def test_head_lr_multiplier_groups_and_lora_uses_the_base_as_frozen_encoder(tiny_model_dir, tiny_tokenizer):
    spec, task, methods, ctx, model, batches = cls_setup(tiny_model_dir, tiny_tokenizer, ["full", {"name": "dr_tune", "head_lr_mult": 10}])
    groups = methods[1].param_groups(model, ctx)
    assert [len(g["params"]) for g in groups][1] == 1 and groups[1]["lr"] == pytest.approx(10 * spec.train.lr)
    entries = [{"name": "lora", "r": 4, "target_modules": "all-linear"}, {"name": "dr_tune", "queue_size": 6}]
    _, task, methods, ctx, model, batches = cls_setup(tiny_model_dir, tiny_tokenizer, entries)
    assert methods[1].reference is None
    metrics = steps(task, methods, ctx, model, batches)
    assert all(math.isfinite(m["dr_queue_ce"]) for m in metrics)


def _roundtrip(state):
    path = os.path.join(tempfile.mkdtemp(), "state.pt")
    torch.save(state, path)
    return path


class TwoRankDist:
    """torch.distributed as two threads see it (a real 2-process gloo group costs a minute of imports
    on the shared test machine): all_gather swaps tensors through a barrier, in rank order."""

    def __init__(self) -> None:
        self.barrier, self.slots, self.local = threading.Barrier(2), [None, None], threading.local()

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self) -> int:
        return 2

    def all_gather(self, parts, x) -> None:
        self.slots[self.local.rank] = x.clone()
        self.barrier.wait()
        for part, sent in zip(parts, self.slots):
            part.copy_(sent)
        self.barrier.wait()


def test_queues_are_identical_across_ddp_ranks(monkeypatch):
    fake = TwoRankDist()
    monkeypatch.setattr(dr_tune, "dist", fake)
    states = [None, None]

    def rank(r: int) -> None:
        fake.local.rank = r
        method = DRTune(DRTune.Config(queue_size=6, warmup=False))
        method._allocate(3, torch.device("cpu"))
        for step in range(2):  # each rank enqueues its own rows; every rank must hold all of them
            rows = torch.full((2, 3), float(10 * r + step))
            method._enqueue(gather_rows(rows), gather_rows(rows + 0.5), gather_rows(torch.tensor([r, r])))
        states[r] = method.state_dict()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    a, b = states
    for k in ("d", "p", "y"):
        assert torch.equal(a["queue"][k], b["queue"][k])
    assert a["count"] == 6 and a["queue"]["y"].tolist() == [1, 1, 1, 1, 0, 0]  # FIFO: 8 rows (rank order) through 6 slots
    assert a["queue"]["d"][:, 0].tolist() == [11.0, 11.0, 10.0, 10.0, 1.0, 1.0]  # rank 1 step 1, rank 1 step 0, rank 0 step 1
