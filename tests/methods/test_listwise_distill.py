"""Listwise distillation: the KL's zero and gradient, own-column selection, the false-negative mask, permutation invariance."""

from types import SimpleNamespace

import datasets
import pytest
import torch
import torch.nn.functional as F

from ftray.config import build_spec
from ftray.data import DataError
from ftray.methods import Context, build_methods
from ftray.methods.listwise_distill import false_negative_mask, listwise_kl, own_columns
from tests.methods.helpers import prepare

TAU_R, TAU_KL = 0.05, 0.3


def method_and_ctx(**fields):
    spec = build_spec({"task": {"type": "retrieval", "negatives": 3}, "methods": [{"name": "listwise_distill", **fields}]})
    return build_methods(spec.methods)[0], Context(spec=spec, tokenizer=None)


def test_kl_is_zero_when_student_matches_teacher_up_to_a_per_query_shift():
    t = torch.rand(3, 5)
    s = t * TAU_R / TAU_KL + torch.tensor([[0.2], [-1.0], [3.0]])  # s/τ_rank = t/τ_kl + c_i
    assert listwise_kl(s, t, TAU_R, TAU_KL).item() == pytest.approx(0.0, abs=1e-6)
    assert listwise_kl(s.flip(1), t, TAU_R, TAU_KL).item() > 0.1


def test_kl_gradient_is_softmax_difference_over_tau_rank_times_batch():
    t, s = torch.rand(4, 6), torch.rand(4, 6).requires_grad_()
    listwise_kl(s, t, TAU_R, TAU_KL).backward()
    expected = ((s / TAU_R).softmax(-1) - (t / TAU_KL).softmax(-1)) / (TAU_R * 4)
    torch.testing.assert_close(s.grad, expected.detach())


def test_gradient_steps_move_student_ranking_to_the_teachers():
    t = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.8, 0.2, 0.6, 0.0]])
    s = torch.tensor([[0.9, 0.1, 0.3, 0.5], [0.0, 0.6, 0.2, 0.8]], requires_grad=True)  # reversed orders
    opt = torch.optim.Adam([s], lr=0.01)
    for _ in range(300):
        opt.zero_grad()
        listwise_kl(s, t, TAU_R, TAU_KL).backward()
        opt.step()
    assert torch.equal(s.argsort(1), t.argsort(1))


def test_loss_hook_reads_only_each_querys_own_columns():
    m, ctx = method_and_ctx()
    b, per, temp = 3, 4, ctx.spec.task.temperature
    logits = torch.randn(b, b * per, requires_grad=True)
    teacher = torch.rand(b, per)
    kl, metrics = m.loss(None, {"teacher_scores": teacher}, SimpleNamespace(logits=logits), ctx)
    kl.backward()
    own = torch.zeros(b, b * per, dtype=torch.bool)
    for i in range(b):
        own[i, i * per : (i + 1) * per] = True
    assert (logits.grad[~own] == 0).all() and (logits.grad[own] != 0).all()
    torch.testing.assert_close(kl, listwise_kl(own_columns(logits, per) * temp, teacher, TAU_R, TAU_KL))
    assert metrics["listwise_kl"] == pytest.approx(kl.item())


def test_mask_removes_exactly_the_passages_above_threshold_never_the_positive():
    teacher = torch.tensor([[1.0, 0.7, 0.5, 0.2], [0.3, 0.9, 0.1, 0.0]])  # query 1's positive is not its top
    keys = ["a", "b", "c", "d", "e", "f", "g", "b"]  # query 1's last negative is query 0's passage "b"
    mask = false_negative_mask(teacher, keys, 0.6)
    expected = torch.zeros(2, 8, dtype=torch.bool)
    expected[0, 1] = expected[0, 7] = True  # "b" (0.7 > 0.6): in query 0's list and again in query 1's
    expected[1, 5] = True  # "f" (0.9 is the top); the positive "e" (0.3 < 0.54) stays anyway
    assert torch.equal(mask, expected)
    assert not false_negative_mask(torch.ones(2, 4), keys, 0.6)[[0, 1], [0, 4]].any()  # positives with top scores stay


def test_criterion_is_weighted_masked_infonce_at_its_own_temperature():
    m, ctx = method_and_ctx()
    temp = ctx.spec.task.temperature
    b, per = 2, 4
    teacher = torch.tensor([[1.0, 0.7, 0.5, 0.2], [1.0, 0.1, 0.1, 0.0]])
    ids = torch.arange(1, b + b * per + 1)[:, None].repeat(1, 3)  # all passages distinct
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(b) * per, "teacher_scores": teacher}
    m.corrupt_batch(batch, ctx)
    logits = torch.randn(b, b * per)
    cos = logits * temp / 0.01
    cos[0, 1] = float("-inf")  # query 0's 0.7 candidate is a likely false negative
    expected = 0.1 * F.cross_entropy(cos, batch["labels"], reduction="sum")
    torch.testing.assert_close(m.criterion(logits, batch["labels"], ctx), expected)


def test_permuting_candidates_within_a_list_leaves_both_losses_unchanged():
    m, ctx = method_and_ctx()
    b, per, h = 3, 4, 8
    q, d = F.normalize(torch.randn(b, h), dim=-1), F.normalize(torch.randn(b * per, h), dim=-1)
    teacher = torch.rand(b, per)
    ids = torch.arange(1, b + b * per + 1)[:, None].repeat(1, 2)

    def losses(order):  # order: a permutation of the negatives (positions 1..per-1) applied to every list
        cols = torch.tensor([i * per + j for i in range(b) for j in [0, *order]])
        batch = {"input_ids": torch.cat([ids[:b], ids[b:][cols]]), "attention_mask": torch.ones(b + b * per, 2, dtype=torch.long),
                 "labels": torch.arange(b) * per, "teacher_scores": teacher[:, [0, *order]]}
        logits = q @ d[cols].T / ctx.spec.task.temperature
        m.corrupt_batch(batch, ctx)
        return m.criterion(logits, batch["labels"], ctx), m.loss(None, batch, SimpleNamespace(logits=logits), ctx)[0]

    for a, b_ in zip(losses([1, 2, 3]), losses([3, 1, 2])):
        torch.testing.assert_close(a, b_)


def test_prepare_data_normalises_to_unit_range_and_filters_low_queries(ray_local):
    m, ctx = method_and_ctx()
    rows = [{"query": f"q{i}", "positive": "p", "negatives": ["n"] * 3, "teacher_scores": [float(i), i - 1.0, i - 2.0, i - 9.0]}
            for i in range(20)]
    out, report = prepare(m, rows, ctx.spec)
    assert 0 < len(out) < len(rows) and report["queries_dropped_low_teacher"] == len(rows) - len(out)  # lowest-scoring queries dropped
    flat = [s for r in out for s in r["teacher_scores"]]
    assert min(flat) >= 0 and max(flat) <= 1 and max(flat) == 1.0
    with pytest.raises(DataError, match="teacher_scores"):
        prepare(m, [{"query": "q", "positive": "p", "negatives": ["n"]}], ctx.spec)


def test_two_real_steps_lower_the_kl_on_a_tiny_bi_encoder(tiny_model_dir, tiny_tokenizer):
    from ftray.tasks import get_task
    from ftray.train.loop import train_step
    from ftray.train.optim import build_optimizer, build_scheduler

    spec = build_spec({"model": {"name": str(tiny_model_dir)}, "task": {"type": "retrieval", "negatives": 3},
                       "methods": ["listwise_distill"], "train": {"lr": 3e-3, "warmup_ratio": 0, "schedule": "constant"}})
    task, (m,) = get_task(spec), build_methods(spec.methods)
    rows = [{"query": f"what is {i}?", "positive": f"{i} is a number", "negatives": [f"{i + j + 1} apples" for j in range(3)],
             "teacher_scores": [1.0, 0.1, 0.5, 0.0]} for i in range(4)]
    batch = task.collate(task.tokenize(datasets.Dataset.from_list(rows), tiny_tokenizer, "t"), tiny_tokenizer.pad_token_id)
    model = task.load_model()
    opt = build_optimizer(list(model.parameters()), spec.train)
    sched, ctx = build_scheduler(opt, spec.train, 10), Context(spec=spec, tokenizer=tiny_tokenizer, max_steps=10)
    kls = [train_step(model, [dict(batch)], [m], opt, sched, ctx, amp=None, task=task)["listwise_kl"] for _ in range(6)]
    assert kls[-1] < kls[0]
