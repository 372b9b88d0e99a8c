"""LoFiT: L·H·d_head then K·d_head trainable parameters; zero offsets are the base model; the export is exact."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from ftray.config import build_spec
from ftray.methods import Context, build_methods
from ftray.methods.lofit import attention_layers
from ftray.train.loop import train_step
from ftray.train.optim import build_optimizer, build_scheduler
from tests.methods.helpers import FakeTok, random_batch, tiny_llama
from tests.train.helpers import events, train_tiny

LAYERS, HEADS, HEAD_DIM, K = 2, 4, 8, 3  # tiny_llama: hidden 32, 4 heads
IDS = torch.arange(3, 19).unsqueeze(0)


def make(**fields):
    spec = build_spec({"methods": [{"name": "lofit", "num_heads": K, **fields}], "train": {"warmup_ratio": 0}})
    (method,) = build_methods(spec.methods)
    return method, Context(spec=spec, tokenizer=FakeTok(), max_steps=6)


def train_phase(model, method, ctx, phase: str, steps: int):
    """prepare_model for `phase`, then `steps` optimizer steps with the method's own parameter groups."""
    ctx.phase = phase
    model = method.prepare_model(model, ctx)
    opt = build_optimizer(method.param_groups(model, ctx), ctx.spec.train)
    sched = build_scheduler(opt, ctx.spec.train, steps)
    for step in range(steps):
        train_step(model, [random_batch(seed=step)], [method], opt, sched, ctx, amp=None)
        ctx.step += 1
    return model


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def trained():
    base = tiny_llama(layers=LAYERS, kv_heads=2)  # GQA: offsets live on the query heads
    method, ctx = make()
    model = train_phase(copy.deepcopy(base), method, ctx, "select", 3)
    counts = [trainable(model)]
    model = train_phase(model, method, ctx, "bias", 3)
    counts.append(trainable(model))
    return base, model, method, ctx, counts


def test_trainable_counts_are_all_heads_then_k_heads(trained):
    *_, counts = trained
    assert counts == [LAYERS * HEADS * HEAD_DIM, K * HEAD_DIM]  # spec (e): stage 1 L·H·d_head, stage 2 K·d_head


def test_base_weights_stay_bit_identical(trained):
    base, model, *_ = trained
    own = dict(model.named_parameters())
    assert all(torch.equal(own[n], p) for n, p in base.named_parameters())


def test_zero_offsets_give_exactly_the_base_logits(trained):
    base, model, *_ = trained
    zeroed = copy.deepcopy(model)
    for attn in attention_layers(zeroed):
        if hasattr(attn.o_proj, "lofit"):
            attn.o_proj.lofit.v.data.zero_()
    assert torch.equal(logits(zeroed), logits(base))
    assert not torch.equal(logits(model), logits(base))


def test_stage_two_tunes_the_top_k_heads_by_scale_norm():
    base = tiny_llama(layers=LAYERS)
    method, ctx = make()
    ctx.phase = "select"
    model = method.prepare_model(copy.deepcopy(base), ctx)
    norms = torch.tensor([[0.1, 5.0, 0.2, 0.3], [4.0, 0.1, 0.1, 3.0]])  # top-3: (0,1), (1,0), (1,3)
    for off, row in zip(method.offsets, norms):
        off.A.data = row[:, None].expand(-1, HEAD_DIM) / HEAD_DIM**0.5
    ctx.phase = "bias"
    model = method.prepare_model(model, ctx)
    assert method.heads == [[0, 1], [1, 0], [1, 3]]
    tuned = {(i, int(h)) for i, a in enumerate(attention_layers(model)) if hasattr(a.o_proj, "lofit") for h in a.o_proj.lofit.heads}
    assert tuned == {(0, 1), (1, 0), (1, 3)}
    assert all(off.A is None for off in method.offsets)  # stage 2 starts from the base: the scalings are gone


def test_export_is_plain_transformers_with_equal_logits(trained, tmp_path):
    _, model, method, ctx, _ = trained
    model.save_pretrained(tmp_path / "ckpt")  # what a checkpoint writes mid-training: folded
    final = method.finalize(model, None, ctx)
    final.save_pretrained(tmp_path / "final")
    for path in ("ckpt", "final"):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / path)
        torch.testing.assert_close(logits(reloaded), logits(model))
        attn = attention_layers(reloaded)
        assert reloaded.config.attention_bias
        assert all(not a.q_proj.bias.any() and not a.k_proj.bias.any() and not a.v_proj.bias.any() for a in attn)
        assert any(a.o_proj.bias.any() for a in attn)
    assert any(hasattr(a.o_proj, "lofit") for a in attention_layers(model))  # the export folded a copy, not the live model


def test_stage_one_scalings_fold_into_o_proj(tmp_path):
    base = tiny_llama(layers=LAYERS)
    method, ctx = make()
    model = train_phase(copy.deepcopy(base), method, ctx, "select", 2)
    folded = method.finalize(model, base, ctx)
    torch.testing.assert_close(logits(folded), logits(model))


@pytest.mark.parametrize("where", ["inside_stage_two", "at_stage_boundary"])
def test_resume_keeps_the_selected_heads(where):
    base = tiny_llama(layers=LAYERS)
    method, ctx = make()
    model = train_phase(copy.deepcopy(base), method, ctx, "select", 2)
    boundary_state = method.state_dict()
    ctx.phase = "bias"
    method.prepare_model(model, ctx)
    state = boundary_state if where == "at_stage_boundary" else method.state_dict()
    resumed, rctx = make()
    resumed.load_state_dict(state)
    rctx.step = 2 if where == "at_stage_boundary" else 3
    fresh = copy.deepcopy(base)  # the loop replays stage 1's prepare_model on fresh weights (new random A)
    for phase in ("select", "bias"):
        rctx.phase = phase
        fresh = resumed.prepare_model(fresh, rctx)
    assert resumed.heads == method.heads


def test_real_ray_run_has_both_stages_and_exports_a_plain_model(ray_local, tiny_model_dir, tmp_path):
    result = train_tiny(tiny_model_dir, tmp_path, "lofit", methods=[{"name": "lofit", "num_heads": 2}],
                        data={"max_samples": 32, "eval_max_samples": 8}, train={"max_steps": 4, "checkpoint_every": 2})
    phases = [e for e in events(result.run_dir) if e["event"] == "phase"]
    assert [(e["step"], e["trainable"]) for e in phases] == [(0, 2 * 4 * 16), (2, 2 * 16)]  # 2 layers × 4 heads × d_head 16
    final = AutoModelForCausalLM.from_pretrained(result.final_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert final.config.attention_bias
    biased = [i for i, a in enumerate(attention_layers(final)) if a.o_proj.bias.any()]
    assert 1 <= len(biased) <= 2
    assert not torch.equal(logits(final), logits(base))
