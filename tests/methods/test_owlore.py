"""OwLore: exactly γ sampled layers (plus embeddings, head, final norm) get gradients, inclusion tracks p,
GaLore states are r×n or m×r, unsampled layers never move, and a resumed run continues exactly."""

import copy
import io
import pytest
import torch

from ftray.config import build_spec
from ftray.methods import Context, build_methods, stable_seed
from ftray.methods import owlore as ow
from ftray.train.checkpoint import gather_state, restore_state
from ftray.train.loop import train_step
from ftray.train.optim import build_scheduler
from tests.methods.helpers import FakeTok, random_batch, tiny_llama

ALWAYS = {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}


def setup(model, entry: dict, steps: int, state: dict | None = None):
    """Prepare `model` with one owlore entry the way the loop does; returns (model, method, optimizer, scheduler, ctx)."""
    spec = build_spec({"methods": [{"name": "owlore", "calib_samples": 0, "rank": 4, **entry}],
                       "train": {"lr": 1e-2, "warmup_ratio": 0, "schedule": "constant"}})
    (method,) = build_methods(spec.methods)
    if state:
        method.load_state_dict(state)
    ctx = Context(spec=spec, tokenizer=FakeTok(), max_steps=steps)
    model = method.prepare_model(model, ctx)
    opt = method.optimizer(method.param_groups(model, ctx), ctx)
    return model, method, opt, build_scheduler(opt, spec.train, steps), ctx


def layer_of(name: str) -> int | None:
    return int(name.split(".")[2]) if name.startswith("model.layers.") else None


def test_exactly_gamma_layers_have_gradients_and_unsampled_layers_never_move():
    model, method, opt, sched, ctx = setup(tiny_llama(layers=8, kv_heads=2), {"gamma": 3, "interval": 2}, steps=6)
    windows = []
    for step in range(6):
        ctx.step = step
        method.on_step(model, opt, ctx)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model(**random_batch(seed=step)).loss.backward()
        method.after_backward(model, ctx)
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert {layer_of(n) for n in with_grad} - {None} == set(method.active) and len(method.active) == 3
        assert ALWAYS <= with_grad
        opt.step()
        opt.zero_grad(set_to_none=True)
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert {layer_of(n) for n in moved} - {None} == set(method.active)  # frozen layers: bit-identical
        assert ALWAYS <= moved
        windows.append(tuple(method.active))
        # The draw depends on (seed, round) only, through stable_seed (not Python's salted hash): every rank agrees.
        assert method.active == ow.draw_layers(method.probabilities(8), 3, stable_seed("owlore", 0, step // 2))
    assert windows[0] == windows[1] and windows[2] == windows[3] and windows[4] == windows[5]  # redrawn every K=2
    assert len(set(windows)) > 1


def test_inclusion_frequencies_track_p_over_ten_thousand_draws():
    p = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.5])
    gamma, n = 2, 10_000
    counts = torch.zeros(5)
    for i in range(n):
        counts[ow.draw_layers(p, gamma, stable_seed("owlore", 0, i))] += 1
    freq = counts / n
    # Successive sampling without replacement: P(i in) = p_i + Σ_{j≠i} p_j · p_i / (1 − p_j).
    exact = torch.tensor([p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(5) if j != i) for i in range(5)])
    torch.testing.assert_close(freq, exact, atol=0.02, rtol=0)
    assert torch.equal(freq.argsort(), p.argsort())  # more outliers, sampled more often
    assert freq[-1] / freq[0] < p[-1] / p[0]  # but not proportionally: without replacement


def test_outlier_ratio_finds_the_layer_with_planted_outliers_and_sets_p():
    model = tiny_llama(layers=4)
    assert ow.layer_outlier_ratios(model, [random_batch()], m=13.0).sum() == 0  # random init: no outliers
    with torch.no_grad():
        model.model.layers[3].self_attn.q_proj.weight.view(-1)[:40] *= 200  # 40 huge weights in the last layer
    lod = ow.layer_outlier_ratios(model, [random_batch(seed=i) for i in range(2)], m=13.0)
    n_weights = sum(mod.weight.numel() for mod in model.model.layers[3].modules() if isinstance(mod, torch.nn.Linear))
    assert lod[:3].sum() == 0 and 40 / n_weights * 0.5 <= lod[3] <= 40 / n_weights
    torch.testing.assert_close(ow.sampling_probabilities(torch.tensor([0.1, 0.3, 0.6]), 2), torch.tensor([0.1, 0.3, 0.6]))
    floored = ow.sampling_probabilities(torch.tensor([0.0, 0.0, 0.5]), 2)
    assert (floored > 0).all() and floored.argmax() == 2  # sampling γ=2 without replacement needs 2 nonzero weights
    torch.testing.assert_close(ow.sampling_probabilities(torch.zeros(4), 2), torch.full((4,), 0.25))


def test_galore_states_are_rank_r_and_updates_stay_in_the_projected_subspace():
    base = tiny_llama(layers=2, kv_heads=2)  # k/v are 16×32 (m < n), q/o/MLP 32×32
    model, method, opt, sched, ctx = setup(copy.deepcopy(base), {"gamma": 2}, steps=1)
    method.on_step(model, opt, ctx)
    train_step(model, [random_batch()], [method], opt, sched, ctx, amp=None)
    galore = {id(p) for g in opt.param_groups if "rank" in g for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    b = dict(base.named_parameters())
    assert len(galore) == 2 * 7
    for p, state in opt.state.items():
        m, n = p.shape if p.dim() == 2 else (None, None)
        if id(p) not in galore:
            assert state["exp_avg"].shape == p.shape  # embeddings, head, norms: plain AdamW
        elif m < n:
            assert state["exp_avg"].shape == (4, n) and state["projection"].shape == (m, 4)  # r×n
            proj = state["projection"].float()
            delta = p.detach() - b[names[id(p)]]
            torch.testing.assert_close(delta - proj @ (proj.T @ delta), torch.zeros_like(delta), atol=1e-6, rtol=0)
        else:
            assert state["exp_avg"].shape == (m, 4) and state["projection"].shape == (4, n)  # m×r


def test_layers_leaving_the_sample_drop_their_optimizer_state():
    model, method, opt, sched, ctx = setup(tiny_llama(layers=8), {"gamma": 2, "interval": 1}, steps=4)
    for step in range(4):
        ctx.step = step
        method.on_step(model, opt, ctx)
        stateful = {layer_of(names) for names, p in model.named_parameters() if p in opt.state} - {None}
        assert stateful <= set(method.active)
        train_step(model, [random_batch(seed=step)], [method], opt, sched, ctx, amp=None)


def test_resume_from_a_checkpoint_continues_exactly():
    """Method state and the GaLore optimizer go through ftray's checkpoint functions (torch DCP) and back."""
    entry, steps = {"gamma": 2, "interval": 2}, 5
    base = tiny_llama(layers=6, kv_heads=2)

    def run(model, method, opt, sched, ctx, start, stop):
        for step in range(start, stop):
            ctx.step = step
            method.on_step(model, opt, ctx)
            train_step(model, [random_batch(seed=step)], [method], opt, sched, ctx, amp=None)

    straight = setup(copy.deepcopy(base), entry, steps)
    run(*straight, 0, steps)

    first = setup(copy.deepcopy(base), entry, steps)
    run(*first, 0, 3)
    model, method, opt, sched, _ = first
    model_sd, optim_sd = gather_state(model, opt)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buf = io.BytesIO()
    torch.save({"model": {k: v for k, v in model_sd.items() if k in trainable}, "optimizer": optim_sd,
                "method": method.state_dict(), "scheduler": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)

    resumed = setup(copy.deepcopy(base), entry, steps, state=saved["method"])
    restore_state(resumed[0], resumed[2], saved)
    resumed[3].load_state_dict(saved["scheduler"])
    run(*resumed, 3, steps)
    for (n, p), (_, q) in zip(straight[0].named_parameters(), resumed[0].named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)


def test_sharded_strategies_are_refused_before_ray_starts():
    with pytest.raises(ValueError, match="owlore"):
        build_spec({"methods": ["owlore"], "scaling": {"strategy": "fsdp", "num_workers": 2}})
