"""RoSTE: rotations alone leave the fp32 model unchanged, 16-bit STE gradients equal SFT's, each layer keeps its lower-error rotation."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ftray.config import build_spec
from ftray.methods import Context, build_methods
from ftray.methods.roste import dense, fake_quant, hadamard_factors, paley, rotate, sq_err
from tests.methods.helpers import FakeTok, random_batch, run_steps


def llama(tied: bool = True) -> LlamaForCausalLM:
    """Sizes that are not powers of two (hidden 48 = 12×4, head_dim 12, intermediate 96), non-unit norms."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg)
    for n, p in model.named_parameters():
        if "norm" in n:
            p.data.uniform_(0.5, 1.5)  # so fusing the norm scales is exercised
    return model


def prepared(base, **fields):
    spec = build_spec({"methods": [{"name": "roste", "calib_source": "random", **fields}]})
    m = build_methods(spec.methods)[0]
    return m.prepare_model(copy.deepcopy(base), Context(spec=spec, tokenizer=FakeTok())), m


@pytest.mark.parametrize("n", [12, 48, 64, 72, 576, 1536])
def test_hadamard_sizes_are_orthogonal_and_rotate_matches_the_dense_kronecker(n):
    factors = hadamard_factors(n)
    h = dense(factors)
    torch.testing.assert_close(h @ h.T, torch.eye(n), atol=1e-5, rtol=0)
    assert (h.abs() - h.abs()[0, 0]).abs().max() < 1e-6  # a true Hadamard: every entry ±1/√n
    x = torch.randn(3, 2 * n)
    torch.testing.assert_close(rotate(x, factors), x @ torch.block_diag(h, h))  # per-head (block-diagonal) use
    assert [f.shape[0] for f in hadamard_factors(576)] == [72, 8]  # SmolLM2's hidden size: Paley(71) ⊗ Sylvester(8)
    p = paley(11)
    torch.testing.assert_close(p @ p.T, 12 * torch.eye(12))


@pytest.mark.parametrize("tied", [True, False])
def test_rotations_without_quantizers_leave_fp32_logits_unchanged(tied):
    base = llama(tied)
    model, m = prepared(base, rotations="all")
    assert all(all(v) for v in m.choices.values())  # R1, R2, R3, R4 all active
    ids = torch.randint(1, 128, (2, 16))
    model.roste.enabled = False
    with torch.no_grad():
        ref, rot = base(input_ids=ids).logits, model(input_ids=ids).logits
    assert (ref - rot).abs().max() < 1e-3
    model.roste.enabled = True
    with torch.no_grad():
        assert (ref - model(input_ids=ids).logits).abs().max() > 1e-3  # the W4A4KV4 quantizers are on
    assert not model.config.tie_word_embeddings and model.model.norm.weight.eq(1).all()


def test_16_bit_ste_gradients_match_plain_sft():
    base = llama(tied=False)
    model, _ = prepared(base, r1=False, rotations="none", w_bits=16, a_bits=16, kv_bits=16, a_clip=1.0)  # no clipping
    batch = random_batch(seed=1)
    grads = []
    for net in (base, model):
        net.zero_grad()
        net(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
        grads.append({n: p.grad for n, p in net.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-3, atol=1e-5)
    low, _ = prepared(base, r1=False, rotations="none")  # 4 bits: STE still passes a gradient to every weight
    low(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in low.named_parameters() if "proj" in n)


def test_ste_passes_the_gradient_straight_through():
    x = torch.randn(4, 8, requires_grad=True)
    y = fake_quant(x, 4, symmetric=False)
    assert not torch.equal(y, x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_hadamard_lowers_quantization_error_on_outlier_weights():
    w = torch.randn(64, 64) * 0.02
    w[:, 3] = torch.randn(64)  # an outlier input channel dominates every row's scale
    assert sq_err(rotate(w, hadamard_factors(64)), 4, True, 1.0) < 0.5 * sq_err(w, 4, True, 1.0)


def test_each_layer_keeps_the_rotation_with_the_lower_logged_error():
    base = llama()
    with torch.no_grad():  # give layer 1's down_proj an outlier input channel: R4 must win there
        base.model.layers[1].mlp.down_proj.weight[:, 5] = 3.0
    model, m = prepared(base)
    for i in range(2):
        for slot in ("r2", "r3", "r4"):
            identity, hadamard = m.errors[i][slot]
            assert m.choices[slot][i] == (hadamard < identity)
    assert m.choices["r4"][1]
    assert model.config.roste["r4"] == m.choices["r4"]
    # a resumed run reuses the stored choice instead of re-calibrating
    spec = build_spec({"methods": [{"name": "roste", "calib_source": "random"}]})
    again = build_methods(spec.methods)[0]
    again.load_state_dict(m.state_dict())
    again._choose = None  # would raise if called
    resumed = again.prepare_model(copy.deepcopy(base), Context(spec=spec, tokenizer=FakeTok()))
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


def test_training_steps_and_export_reproduce_the_quantizer_free_model(tmp_path):
    base = llama()
    model, (m,), ctx = run_steps(copy.deepcopy(base), [{"name": "roste", "calib_source": "random"}], steps=2)
    ids = torch.randint(1, 128, (1, 12))
    model.roste.enabled = False
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    final = m.finalize(model, base, ctx)
    assert not hasattr(final, "roste") and final.config._attn_implementation == "sdpa"
    final.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert reloaded.config.roste["bits"] == {"w": 4, "a": 4, "kv": 4}
