"""NoiseFiT: σ=0 reduces the hybrid loss to α·CE; noise only on the SNR-selected layers, only during the step."""

import copy

import pytest
import torch

from ftray.config import build_spec
from ftray.methods import Context, build_methods
from ftray.methods.noisefit import layer_snr, noisy, pick_layers
from ftray.train.loss import forward_and_loss
from tests.methods.helpers import FakeTok, random_batch, run_steps, tiny_llama


def setup(**fields):
    spec = build_spec({"methods": [{"name": "noisefit", **fields}]})
    (method,) = build_methods(spec.methods)
    return method, Context(spec=spec, tokenizer=FakeTok())


def hybrid(model, method, ctx, batch, amp=None):
    """(loop CE, CE + the hook's extra term = the total the loop backpropagates, metrics)."""
    out, loss_sum, count = forward_and_loss(model, batch, amp)
    ce = loss_sum / count
    extra, metrics = method.loss(model, batch, out, ctx)
    return ce, ce + extra, metrics


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("alpha,amp", [(0.5, None), (0.8, None), (0.5, torch.bfloat16)])
def test_sigma_zero_gives_alpha_times_ce_in_value_and_gradient(alpha, amp):
    """The defining property; under autocast the noisy passes reuse the clean pass's dtype, so KL stays 0."""
    model = tiny_llama(layers=4)
    method, ctx = setup(sigma=0.0, alpha=alpha, lam=0.1)
    ce, total, metrics = hybrid(model, method, ctx, random_batch(), amp)
    assert metrics["noisefit_kl_noisy"] == pytest.approx(0, abs=1e-7)
    assert metrics["noisefit_kl_consistency"] == pytest.approx(0, abs=1e-7)
    torch.testing.assert_close(total, alpha * ce)
    g_total = grads(model, total)
    ce2, _, _ = hybrid(model, method, ctx, random_batch(), amp)  # fresh graph for the plain-CE gradient
    for a, b in zip(g_total, grads(model, alpha * ce2)):
        torch.testing.assert_close(a, b)


def test_two_noisy_passes_differ_and_every_term_is_positive():
    model = tiny_llama(layers=4)
    method, ctx = setup(sigma=0.5, square_sigma=False, k=2)
    torch.manual_seed(0)
    ce, total, metrics = hybrid(model, method, ctx, random_batch())
    assert metrics["noisefit_kl_consistency"] > 0 and metrics["noisefit_kl_noisy"] > 0
    expected = 0.5 * ce + 0.5 * metrics["noisefit_kl_noisy"] + 0.1 * metrics["noisefit_kl_consistency"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert all(torch.isfinite(g).all() for g in grads(model, total))


def layer_outputs(model, ids):
    """Each decoder layer's output in one forward (hooks registered last, so they see any noise)."""
    seen = []
    handles = [layer.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone())) for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return seen


def test_noise_only_on_selected_layers_identity_when_sigma_zero_and_hooks_removed():
    model = tiny_llama(layers=4)
    ids = random_batch()["input_ids"]
    clean = layer_outputs(model, ids)
    layers = list(model.model.layers)
    with noisy([layers[2]], coeff=0.5, beta=0.1, max_factor=5.0):
        assert [bool(layer._forward_hooks) for layer in layers] == [False, False, True, False]
        noised = layer_outputs(model, ids)
    for i in (0, 1):
        assert torch.equal(noised[i], clean[i])  # upstream of the noise: untouched
    assert not torch.allclose(noised[2], clean[2])
    with noisy(layers, coeff=0.0, beta=0.1, max_factor=5.0):  # σ = 0: the hooks are the identity
        zero = layer_outputs(model, ids)
    assert all(torch.equal(a, b) for a, b in zip(zero, clean))
    assert not any(layer._forward_hooks for layer in layers)


def test_snr_picks_the_largest_or_smallest_and_ignores_the_noise_seed():
    # SNR = mean|h| / noise with noise ∝ std(h)·MAD, so scaling a layer's states by c divides its SNR by ~c.
    torch.manual_seed(0)
    base = torch.randn(2, 8, 32)
    hidden = [base * c for c in (4.0, 0.5, 2.0, 0.25, 1.0)]
    picks = set()
    for seed in range(4):
        snr = layer_snr(hidden, 0.1, 0.1, 5.0, 10, torch.Generator().manual_seed(seed))
        assert snr.argsort().tolist() == [0, 2, 4, 1, 3]
        picks.add((tuple(pick_layers(snr, 2, "largest")), tuple(pick_layers(snr, 2, "smallest"))))
    assert picks == {((1, 3), (0, 2))}
    assert pick_layers(snr, 9, "largest") == [0, 1, 2, 3, 4]  # k past the layer count: every layer


def test_selection_is_stable_across_train_seeds_for_a_fixed_batch():
    model, batch = tiny_llama(layers=6), random_batch()
    picked = set()
    for seed in range(3):
        spec = build_spec({"methods": [{"name": "noisefit", "k": 2}], "train": {"seed": seed}})
        (method,) = build_methods(spec.methods)
        picked.add(tuple(method.select(model, batch, Context(spec=spec, tokenizer=FakeTok()))))
    assert len(picked) == 1 and len(next(iter(picked))) == 2
    assert model.training  # restored after the eval-mode scoring forward


def test_real_steps_select_once_leave_no_hooks_and_the_selection_survives_resume():
    base = tiny_llama(layers=4)
    model, (method,), ctx = run_steps(copy.deepcopy(base), [{"name": "noisefit", "k": 2}], steps=2)
    assert len(method.selected) == 2
    # Eval and export see a clean model: it computes what a fresh copy of its weights computes. (The
    # SNR forward leaves transformers' own hidden-state capturing hook behind, which is harmless.)
    assert not any("noisy" in h.__qualname__ for layer in model.model.layers for h in layer._forward_hooks.values())
    fresh = tiny_llama(layers=4)
    fresh.load_state_dict(model.state_dict())
    ids = random_batch()["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
    resumed, _ = setup(k=2)
    resumed.load_state_dict(method.state_dict())
    out, _, _ = forward_and_loss(model, batch := random_batch(seed=9), None)
    resumed.loss(model, batch, out, ctx)
    assert resumed.selected == method.selected  # not re-scored on a different batch after resume


def test_composes_with_lora_noise_reaches_the_layers_inside_peft():
    spec = build_spec({"methods": [{"name": "lora", "dropout": 0.0}, {"name": "noisefit", "k": 1, "sigma": 0.5}]})
    lora, method = build_methods(spec.methods)
    ctx = Context(spec=spec, tokenizer=FakeTok())
    model = lora.prepare_model(tiny_llama(layers=4), ctx)
    _, total, metrics = hybrid(model, method, ctx, random_batch())
    assert len(method.selected) == 1 and metrics["noisefit_kl_consistency"] > 0  # no dropout: only the noise differs
    total.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
