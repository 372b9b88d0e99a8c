"""LfU: α = 0 is exactly SFT, θ and its gradients are untouched by the hook, L_cons grows with α, DDP runs."""

import copy
import math

import pytest
import torch

from ftray.config import build_spec
from ftray.methods import Context, Method, build_methods
from ftray.methods.lfu import consistency
from ftray.train.loss import forward_and_loss
from ftray.train.loop import train_step
from ftray.train.optim import build_optimizer, build_scheduler
from tests.methods.helpers import FakeTok, random_batch, tiny_llama
from tests.train.helpers import logged, train_tiny

LORA = {"name": "lora", "r": 4, "target_modules": "all-linear"}  # default dropout 0.05: the RNG stream matters


def setup(entries, train=None, extra_methods=()):
    """A tiny LoRA'd model, its methods and a context whose `draw_batch` serves seeded random batches."""
    spec = build_spec({"methods": entries, "train": {"lr": 1e-2, "warmup_ratio": 0, "precision": "fp32", **(train or {})}})
    methods = build_methods(spec.methods) + list(extra_methods)
    ctx = Context(spec=spec, tokenizer=FakeTok(), max_steps=4)
    ctx.generator.manual_seed(0)
    ctx.draws = 0

    def draw():
        ctx.draws += 1
        return random_batch(seed=1000 + int(torch.randint(10**6, (1,), generator=ctx.generator)))

    ctx.draw_batch = draw
    model = tiny_llama()
    for m in methods:
        model = m.prepare_model(model, ctx)
    return model, methods, ctx


def train(entries, steps=3, accum=2, extra_methods=()):
    """Take `steps` optimizer steps of `accum` micro-batches each; returns model, methods, ctx, metrics."""
    torch.manual_seed(0)
    model, methods, ctx = setup(entries, extra_methods=extra_methods)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], ctx.spec.train)
    sched = build_scheduler(opt, ctx.spec.train, steps)
    history = []
    for step in range(steps):
        ctx.step = step
        for m in methods:
            m.on_step(model, opt, ctx)
        batches = [random_batch(seed=10 * step + k) for k in range(accum)]
        history.append(train_step(model, batches, methods, opt, sched, ctx, amp=None))
    return model, methods, ctx, history


def test_alpha_zero_gives_zero_consistency_and_training_equals_sft_bitwise():
    sft, _, _, _ = train([LORA])
    lfu, _, ctx, history = train([LORA, {"name": "lfu", "alpha": 0.0}])
    assert ctx.draws == 3 * 2  # one x′ per micro-batch
    assert all(h["lfu_cons"] == 0.0 and h["lfu_ascent_grad_norm"] > 0 for h in history)
    b = dict(sft.named_parameters())
    assert all(torch.equal(p, b[n]) for n, p in lfu.named_parameters())  # dropout stream untouched, zero gradient
    moved, _, _, _ = train([LORA, {"name": "lfu", "alpha": 0.5}])
    assert not all(torch.equal(p, b[n]) for n, p in moved.named_parameters())  # α > 0 does change the update


class Snapshot(Method):
    """Records θ before the step's first forward and checks it is unchanged right before clipping/step."""

    name = "snapshot"
    checked = 0

    def on_step(self, model, optimizer, ctx):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def after_backward(self, model, ctx):
        assert all(torch.equal(p, self.before[n]) for n, p in model.named_parameters())
        Snapshot.checked += 1


def test_parameters_are_bitwise_restored_before_every_optimizer_step():
    _, _, _, history = train([LORA, {"name": "lfu", "alpha": 1.0}], steps=3, extra_methods=[Snapshot(None)])
    assert Snapshot.checked == 3 and all(h["lfu_cons"] > 0 for h in history)


def test_hook_leaves_parameters_accumulated_gradients_and_rng_untouched():
    model, (_, lfu), ctx, _ = train([LORA, {"name": "lfu", "alpha": 1.0}], steps=2)
    params = dict(model.named_parameters())
    batch = random_batch(seed=7)
    out, loss_sum, count = forward_and_loss(model, batch, None)
    (loss_sum / count).backward()  # gradients of an earlier micro-batch
    theta = {n: p.detach().clone() for n, p in params.items()}
    grads = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    rng = torch.get_rng_state()
    extra, metrics = lfu.loss(model, batch, out, ctx)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(p, theta[n]) for n, p in params.items())
    assert all(torch.equal(params[n].grad, g) for n, g in grads.items())
    assert extra.requires_grad and metrics["lfu_cons"] > 0
    assert math.isclose(float(extra.detach()), 5.0 * metrics["lfu_cons"], rel_tol=1e-6)  # β = 5, the paper's LoRA setting


def test_consistency_loss_grows_with_alpha_and_is_zero_at_alpha_zero():
    model, (_, lfu), ctx, _ = train([LORA, {"name": "lfu"}], steps=2)
    batch = random_batch(seed=9)
    out, _, _ = forward_and_loss(model, batch, None)
    values = []
    for alpha in (0.0, 0.01, 0.1, 1.0):
        lfu.config.alpha = alpha
        ctx.generator.manual_seed(3)  # the same x′ and dropout seeds for every α
        values.append(lfu.loss(model, batch, out, ctx)[1]["lfu_cons"])
    assert values[0] == 0.0
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_layer_range_selects_hidden_states():
    model, _, _ = setup([LORA])
    batch = random_batch(seed=2)
    # A perturbation only of the adapters: the embedding output (hidden state 0) cannot change.
    delta = {n: 0.5 * torch.ones_like(p) for n, p in model.named_parameters() if p.requires_grad}

    def cons(start, finish):
        return float(consistency(model, batch, delta, None, 0, start, finish).detach())

    assert cons(0, 0) == 0.0
    assert cons(1, 1) > 0
    # tiny_llama: 4 layers → 5 hidden states; the mean runs over the chosen ones, embeddings included.
    assert cons(0, -1) == pytest.approx(cons(1, 4) * 4 / 5)
    with pytest.raises(ValueError, match="outside"):
        consistency(model, batch, delta, None, 0, 0, 5)
    with pytest.raises(ValueError, match="finish"):
        build_spec({"methods": [{"name": "lfu", "start": 3, "finish": 1}]})


def test_sharded_strategies_are_refused_before_ray_starts():
    with pytest.raises(ValueError, match="lfu"):
        build_spec({"methods": [LORA, "lfu"], "scaling": {"strategy": "fsdp", "num_workers": 2}})


def test_two_ddp_workers_with_accumulation_in_a_real_ray_run(ray_local, tiny_model_dir, tmp_path):
    result = train_tiny(tiny_model_dir, tmp_path, "lfu-ddp", methods=[LORA, {"name": "lfu"}],
                        data={"max_samples": 64, "eval_max_samples": 8},
                        train={"max_steps": 2, "grad_accum": 2, "batch_size": 2, "log_every": 1},
                        scaling={"num_workers": 2})
    cons = logged(result.run_dir, "lfu_cons")
    assert sorted(cons) == [1, 2] and all(math.isfinite(v) and v > 0 for v in cons.values())
    assert (result.final_dir / "adapter_config.json").exists()
