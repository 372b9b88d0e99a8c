"""GLUE tricks: LLRD's geometric lrs, FGM's ‖r‖ = ε and doubled gradient at ε = 0, SiFT, EMA self-distillation, the transductive guard."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from ftray.config import SpecError, build_spec
from ftray.methods import Context, build_methods
from ftray.tasks import get_task
from tests.methods.helpers import random_batch, run_steps, tiny_llama

OFF = {"llrd": False, "adversarial": "none", "self_distill": 0.0}


def setup(task: str = "causal_lm", **fields):
    """(method, ctx, model, batch) on a tiny random Llama; fp32 so extra forwards match the main one exactly."""
    spec = build_spec({"task": {"type": task, "num_labels": 4}, "methods": [{"name": "glue_tricks", **OFF, **fields}],
                       "train": {"precision": "fp32", "lr": 1e-2, "batch_size": 4}})
    (m,) = build_methods(spec.methods)
    ctx = Context(spec=spec, tokenizer=None)
    if task == "classification":
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=4, num_labels=4, pad_token_id=0)
        model = LlamaForSequenceClassification(cfg)
        ids = torch.randint(1, 128, (4, 12), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        ids[:2, 8:], mask[:2, 8:] = 0, 0  # right padding on two rows
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 3])}
    else:
        model, batch = tiny_llama(), random_batch()
    return m, ctx, m.prepare_model(model, ctx), batch


def step_grads(m, ctx, model, batch):
    """The loop's micro-batch: corrupt → forward + CE → method loss → backward; returns (grads, metrics, CE)."""
    batch = m.corrupt_batch(dict(batch), ctx)
    out, loss_sum, count = get_task(ctx.spec).forward_and_loss(model, batch, None)
    ce = loss_sum / count
    extra, metrics = m.loss(model, batch, out, ctx)
    model.zero_grad()
    (ce if extra is None else ce + extra).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, metrics, ce.item(), extra


def test_llrd_lrs_decay_geometrically_by_depth_and_the_head_gets_the_base_lr():
    m, ctx, model, _ = setup("classification", llrd=True, llrd_decay=0.8)
    groups = m.param_groups(model, ctx)
    lr, by_name = ctx.spec.train.lr, {}
    for g in groups:
        for p in g["params"]:
            by_name[next(n for n, q in model.named_parameters() if q is p)] = g["lr"]
    assert by_name["score.weight"] == by_name["model.norm.weight"] == lr == groups[0]["lr"]  # head first: the logged lr
    for i in range(4):  # layer ℓ = i + 1 of L = 4: lr·ξ^(L−ℓ)
        assert by_name[f"model.layers.{i}.self_attn.q_proj.weight"] == pytest.approx(lr * 0.8 ** (3 - i))
    assert by_name["model.embed_tokens.weight"] == pytest.approx(lr * 0.8**4)
    lrs = [g["lr"] for g in groups]
    assert all(b / a == pytest.approx(0.8) for a, b in zip(lrs, lrs[1:]))
    assert len(by_name) == sum(1 for _ in model.parameters())  # every parameter in exactly one group


def test_llrd_groups_keep_their_ratios_through_the_runs_optimizer_and_schedule():
    from ftray.train.optim import build_optimizer, build_scheduler

    m, ctx, model, _ = setup(llrd=True)
    opt = build_optimizer(m.param_groups(model, ctx), ctx.spec.train)
    sched = build_scheduler(opt, ctx.spec.train, 10)
    for _ in range(3):
        opt.step()
        sched.step()
    lrs = sched.get_last_lr()
    assert [g["depth"] for g in opt.param_groups] == [0, 1, 2, 3, 4]
    assert all(b / a == pytest.approx(0.9) for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("task", ["causal_lm", "classification"])
def test_fgm_with_zero_eps_doubles_the_plain_gradient_and_leaves_weights_untouched(task):
    m, ctx, model, batch = setup(task, adversarial="fgm", fgm_eps=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain, _, _, _ = step_grads(build_methods(build_spec({"methods": [{"name": "glue_tricks", **OFF}]}).methods)[0], ctx, model, batch)
    doubled, metrics, ce, _ = step_grads(m, ctx, model, batch)
    for n in plain:
        torch.testing.assert_close(doubled[n], 2 * plain[n])
    assert metrics["adv_loss"] == pytest.approx(ce, rel=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # no residual perturbation


@pytest.mark.parametrize("task", ["causal_lm", "classification"])
def test_fgm_perturbation_has_norm_eps_per_example_and_raises_the_loss(task):
    m, ctx, model, batch = setup(task, adversarial="fgm", fgm_eps=0.5)
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda mod, i, o: seen.append(m._delta.clone()) if m._delta is not None else None)
    _, metrics, ce, _ = step_grads(m, ctx, model, batch)
    (r,) = seen
    torch.testing.assert_close(r.flatten(1).norm(dim=1), torch.full((4,), 0.5))
    assert (r[batch["attention_mask"] == 0] == 0).all()  # pads are never perturbed
    assert metrics["adv_loss"] > ce  # the step goes up the loss


def test_sift_is_zero_without_perturbation_and_positive_with_one():
    m, ctx, model, batch = setup("classification", adversarial="sift", sift_eps=0.0, sift_noise=0.0)
    _, metrics, _, _ = step_grads(m, ctx, model, batch)
    assert metrics["adv_loss"] == pytest.approx(0.0, abs=1e-6)
    m, ctx, model, batch = setup("classification", adversarial="sift", sift_eps=0.5)
    _, metrics, _, extra = step_grads(m, ctx, model, batch)
    assert metrics["adv_loss"] > 0 and extra.requires_grad


@pytest.mark.parametrize("task", ["causal_lm", "classification"])
def test_self_distill_kl_is_zero_when_teacher_equals_student_so_loss_is_scaled_ce(task):
    m, ctx, model, batch = setup(task, self_distill=0.5)
    _, metrics, ce, extra = step_grads(m, ctx, model, batch)
    assert metrics["self_distill_kl"] == pytest.approx(0.0, abs=1e-6)
    assert (ce + extra).item() == pytest.approx(0.5 * ce, rel=1e-5)  # (1−γ)·CE + γ·τ²·0
    m0, ctx0, model0, batch0 = setup(task, self_distill=0.0)
    assert step_grads(m0, ctx0, model0, batch0)[3] is None  # γ = 0 is plain CE


def test_ema_teacher_update_and_resume():
    m, ctx, model, _ = setup(self_distill=0.5, ema_decay=0.9)
    name = "model.layers.0.mlp.up_proj.weight"
    old = m.teacher.get_parameter(name).detach().clone()
    with torch.no_grad():
        model.get_parameter(name).add_(1.0)
    ctx.step = 1
    m.on_step(model, None, ctx)
    torch.testing.assert_close(m.teacher.get_parameter(name), 0.9 * old + 0.1 * model.get_parameter(name))
    (fresh,) = build_methods(ctx.spec.methods)
    fresh.load_state_dict(m.state_dict())
    fresh.prepare_model(tiny_llama(), ctx)  # a resumed worker: base weights, then the checkpoint's EMA
    torch.testing.assert_close(fresh.teacher.get_parameter(name), m.teacher.get_parameter(name))


def test_teacher_follows_lora_when_listed_after_it_and_refuses_otherwise():
    with pytest.raises(SpecError, match="after 'lora'"):
        build_spec({"methods": ["glue_tricks", "lora"]})
    model, (_, m), _ = run_steps(tiny_llama(), ["lora", {"name": "glue_tricks", "adversarial": "fgm"}], steps=2)
    teacher = dict(m.teacher.named_parameters())
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all(n in teacher for n in lora) and set(m.state_dict()["teacher"]) == set(lora)


def test_transductive_refuses_without_the_flag_and_outside_classification():
    with pytest.raises(SpecError, match="allow_test_inputs"):
        build_spec({"task": {"type": "classification"}, "methods": [{"name": "glue_tricks", "transductive": True}]})
    with pytest.raises(SpecError, match="classification"):
        build_spec({"methods": [{"name": "glue_tricks", "transductive": True, "allow_test_inputs": True}]})
    with pytest.raises(SpecError, match="noise_robust"):
        build_spec({"task": {"type": "classification"}, "methods": ["noise_robust", "glue_tricks"]})


def test_pseudo_labels_train_only_on_confident_unlabelled_inputs():
    m, ctx, model, _ = setup("classification", transductive=True, allow_test_inputs=True, pseudo_threshold=0.0)
    ctx.tokenizer = type("Tok", (), {"pad_token_id": 0})()
    m._unlabelled = [{"input_ids": list(range(1, 6 + i))} for i in range(10)]  # eval inputs, no labels
    loss, share = m._pseudo_label_loss(model, ctx, None)
    assert share == 1.0 and loss.item() > 0 and loss.requires_grad
    m.config.pseudo_threshold = 1.0
    loss, share = m._pseudo_label_loss(model, ctx, None)
    assert share == 0.0 and loss.item() == 0.0
