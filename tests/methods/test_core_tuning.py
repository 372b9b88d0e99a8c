"""Core-tuning: the mixed 3B batch and its soft labels, hard-pair mining, focal SupCon, and real steps."""

import math

import pytest
import torch
import torch.nn.functional as F

from ftray.config import build_spec
from ftray.data import load_rows
from ftray.methods import Context, build_methods
from ftray.methods.core_tuning import PROJECTOR, feature_mixup, focal_supcon, mine_pairs, soft_cross_entropy, supcon_terms
from ftray.tasks import get_task
from ftray.train.loop import train_step
from ftray.train.optim import build_optimizer, build_scheduler


def cls_setup(model_dir, tokenizer, entries, n_batches=2, batch_size=4, **train):
    """A tiny classification model prepared with `entries`, its optimizer and a few real batches."""
    spec = build_spec({"model": {"name": str(model_dir)}, "task": {"type": "classification", "num_labels": 4},
                       "methods": entries, "train": {"lr": 1e-2, "warmup_ratio": 0, "precision": "fp32", **train}})
    task = get_task(spec)
    rows = task.tokenize(load_rows("bundled:classification", "train", 4 * n_batches * batch_size), tokenizer, "test")
    batches = [task.collate(rows[i : i + batch_size], tokenizer.pad_token_id) for i in range(0, len(rows), batch_size)][:n_batches]
    methods = build_methods(spec.methods)
    ctx = Context(spec=spec, tokenizer=tokenizer, max_steps=n_batches)
    torch.manual_seed(0)
    model = task.load_model()
    for m in methods:
        model = m.prepare_model(model, ctx)
    return spec, task, methods, ctx, model, batches


def steps(task, methods, ctx, model, batches):
    """One real optimizer step per batch through the loop's train_step; returns the metrics."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, ctx.spec.train)
    sched = build_scheduler(opt, ctx.spec.train, len(batches))
    out = []
    for step, batch in enumerate(batches):
        ctx.step = step
        torch.manual_seed(step)
        out.append(train_step(model, [batch], methods, opt, sched, ctx, amp=None, task=task))
    return out


def test_soft_labels_of_the_3b_rows_sum_to_one_and_negatives_lean_on_the_partner():
    torch.manual_seed(0)
    f, y = torch.randn(8, 5), torch.arange(8) % 4
    feats, targets = feature_mixup(f, y, 4, alpha=1.0, mix_min=0.8)
    assert feats.shape == (24, 5) and targets.shape == (24, 4)
    torch.testing.assert_close(targets.sum(1), torch.ones(24))
    assert (targets >= 0).all()
    torch.testing.assert_close(feats[:8], f)
    # hard negatives: λ ≥ 0.8 on the partner, so no row keeps more than 0.2 of its own label unless paired with itself
    own = targets[8:16][torch.arange(8), y]
    assert ((own <= 0.2 + 1e-6) | torch.isclose(own, torch.ones(8))).all()


def test_alpha_to_zero_without_clamp_mixes_reduce_to_originals():
    torch.manual_seed(1)
    f, y = torch.randn(6, 5), torch.tensor([0, 0, 1, 1, 2, 3])
    feats, targets = feature_mixup(f, y, 4, alpha=1e-4, mix_min=0.0)
    onehot = F.one_hot(y, 4).float()
    for row, label in zip(feats[6:], targets[6:]):
        match = torch.isclose(row[None], f, atol=1e-5).all(1)
        assert match.any(), "every mixed row is one of the originals"
        torch.testing.assert_close(label, onehot[match.nonzero()[0, 0]])


def test_hard_pairs_are_least_similar_same_class_and_most_similar_other_class():
    f = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.8, 0.6], [-1.0, 0.0]])
    y = torch.tensor([0, 0, 0, 1, 2])
    pos, neg = mine_pairs(f, y)
    assert pos.tolist() == [2, 2, 0, 3, 4]  # classes 1 and 2 have one sample: the anchor itself
    assert neg.tolist() == [3, 3, 3, 1, 2]  # e.g. sample 4 (−x): its most similar other-class is [0,1]


def test_focal_supcon_known_value_and_at_most_plain_supcon():
    # two classes of identical unit vectors, τ = 1: each anchor has one positive (cos 1) and two negatives (cos 0)
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    targets = F.one_hot(torch.tensor([0, 0, 1, 1]), 2).float()
    p = math.e / (math.e + 2)
    expected = -(1 - p) * math.log(p) / 4  # divided by N = 4, not by the positive count (the code's quirk)
    assert float(focal_supcon(z, targets, tau=1.0)) == pytest.approx(expected, rel=1e-5)
    torch.manual_seed(0)
    z = F.normalize(torch.randn(12, 6), dim=1)
    targets = F.one_hot(torch.randint(0, 3, (12,)), 3).float()
    focal, pos = supcon_terms(z, targets, 0.07, focal=True)
    plain, _ = supcon_terms(z, targets, 0.07, focal=False)
    assert pos.any() and (focal <= plain).all() and focal.sum() < plain.sum()


def test_total_loss_is_3b_soft_ce_plus_eta_con_and_projector_is_trained(tiny_model_dir, tiny_tokenizer):
    _, task, methods, ctx, model, batches = cls_setup(tiny_model_dir, tiny_tokenizer, ["full", {"name": "core_tuning", "eta": 0.0}])
    method = methods[1]
    batch = batches[0]
    torch.manual_seed(3)
    out, loss_sum, count = task.forward_and_loss(model, batch, None)
    extra, metrics = method.loss(model, batch, out, ctx)
    torch.manual_seed(3)  # the same mixing draws, by hand
    feats, targets = feature_mixup(out.features, batch["labels"], 4, 1.0, 0.8)
    by_hand = soft_cross_entropy(model.score(feats), targets)
    torch.testing.assert_close(loss_sum / count + extra, by_hand)
    assert metrics["core_cls"] == pytest.approx(float(by_hand), rel=1e-5)

    # with η > 0 a real step moves the projector, the backbone and the head; finalize removes the projector
    _, task, methods, ctx, model, batches = cls_setup(tiny_model_dir, tiny_tokenizer, ["full", "core_tuning"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = steps(task, methods, ctx, model, batches)
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["core_con"]) for m in metrics)
    moved = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {PROJECTOR, "model", "score"} <= moved
    model = methods[1].finalize(model, None, ctx)
    assert not hasattr(model, PROJECTOR) and not any(PROJECTOR in k for k in model.state_dict())


def test_fsdp_is_refused():
    with pytest.raises(ValueError, match="fsdp"):
        build_spec({"task": {"type": "classification"}, "methods": ["full", "core_tuning"], "scaling": {"strategy": "fsdp", "num_workers": 2}})
