"""LT-SFT: the sparse phase moves exactly K entries chosen by one global threshold; the rest stay bit-identical."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from ftray.config import build_spec
from ftray.merge.sparse_diff import DIFF_FILE, apply_diff, load_diff, revert_diff
from ftray.methods import Context, build_methods
from ftray.methods.lt_sft import maskable_names, select_top_k
from ftray.train.loop import train_step
from ftray.train.optim import build_optimizer, build_scheduler
from tests.methods.helpers import FakeTok, random_batch, tiny_llama
from tests.train.helpers import events, train_tiny

K = 300


def make(entry: dict, steps: int):
    spec = build_spec({"methods": [entry], "train": {"lr": 1e-2, "warmup_ratio": 0}})
    (method,) = build_methods(spec.methods)
    return method, Context(spec=spec, tokenizer=FakeTok(), max_steps=2 * steps)


def train_phase(model, method, ctx, phase: str, steps: int):
    """prepare_model for `phase`, then `steps` real optimizer steps on one fixed batch (every entry gets gradient)."""
    ctx.phase = phase
    model = method.prepare_model(model, ctx)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], ctx.spec.train)
    sched = build_scheduler(opt, ctx.spec.train, steps)
    for _ in range(steps):
        train_step(model, [random_batch(seed=0)], [method], opt, sched, ctx, amp=None)
        ctx.step += 1
    return model


@pytest.fixture(scope="module")
def trained():
    base = tiny_llama(layers=2)
    method, ctx = make({"name": "lt_sft", "k": K}, steps=3)
    model = train_phase(copy.deepcopy(base), method, ctx, "dense", 3)
    dense = copy.deepcopy(model)
    model = train_phase(model, method, ctx, "sparse", 3)
    return base, dense, model, method, ctx


def deltas(model, base) -> dict[str, torch.Tensor]:
    b = dict(base.named_parameters())
    return {n: (p.detach() - b[n]).abs() for n, p in model.named_parameters()}


def test_sparse_phase_moves_exactly_k_selected_entries_and_nothing_else(trained):
    base, _, model, method, _ = trained
    moved = {n: d.flatten().nonzero().flatten() for n, d in deltas(model, base).items()}
    assert sum(m.numel() for m in moved.values()) == K  # nnz(φ) = K (no selected entry had an exact-zero update)
    for n, idx in moved.items():
        assert set(idx.tolist()) <= set(method.mask.get(n, torch.tensor([])).tolist()), n
    frozen = {n for n in moved if "norm" in n or n == "lm_head.weight"}
    assert frozen and all(moved[n].numel() == 0 for n in frozen)  # norms and the untied head never train


def test_selection_is_one_global_threshold_over_all_tensors(trained):
    base, dense, _, method, _ = trained
    d = deltas(dense, base)
    chosen = torch.cat([d[n].flatten()[idx] for n, idx in method.mask.items()])
    rest = torch.cat([d[n].flatten()[torch.ones(d[n].numel(), dtype=torch.bool).index_fill_(0, idx, False)] for n, idx in method.mask.items()])
    assert chosen.numel() == K and chosen.min() >= rest.max()
    counts = {n: idx.numel() for n, idx in method.mask.items()}
    assert len(set(counts.values())) > 1  # not a fixed share per matrix
    assert set(method.mask) == set(maskable_names(base))


def test_entering_the_sparse_phase_resets_to_theta0():
    base = tiny_llama(layers=2)
    method, ctx = make({"name": "lt_sft", "k": K}, steps=2)
    model = train_phase(copy.deepcopy(base), method, ctx, "dense", 2)
    ctx.phase = "sparse"
    model = method.prepare_model(model, ctx)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters()))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable <= sum(p.numel() for n, p in model.named_parameters() if n in set(maskable_names(base)))


def test_finalize_exports_phi_and_apply_revert_are_exact_inverses(trained, tmp_path):
    base, _, model, method, ctx = trained
    final = method.finalize(model, base, ctx)
    final.save_pretrained(tmp_path / "final")
    diff, meta = load_diff(tmp_path / "final" / DIFF_FILE)
    assert diff.nnz() == K and meta["method"] == "lt_sft"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    applied = apply_diff(copy.deepcopy(base), diff)
    assert all(torch.equal(p, q) for p, q in zip(applied.parameters(), reloaded.parameters()))  # θ⁰ + φ = θ, bit for bit
    reverted = revert_diff(applied, diff)
    assert all(torch.equal(p, q) for p, q in zip(reverted.parameters(), base.parameters()))  # and back to θ⁰


@pytest.mark.parametrize("where", ["inside_sparse_phase", "at_phase_boundary"])
def test_resume_keeps_the_selection(where):
    """The loop replays prepare_model on freshly loaded (θ⁰) weights after load_state_dict; the selection must survive."""
    base = tiny_llama(layers=2)
    method, ctx = make({"name": "lt_sft", "k": K}, steps=2)
    model = train_phase(copy.deepcopy(base), method, ctx, "dense", 2)
    boundary_state = method.state_dict()  # a checkpoint written at the dense phase's last step
    ctx.phase = "sparse"
    model = method.prepare_model(model, ctx)
    expected = {n: t.clone() for n, t in method.mask.items()}
    state = boundary_state if where == "at_phase_boundary" else method.state_dict()
    resumed, rctx = make({"name": "lt_sft", "k": K}, steps=2)
    resumed.load_state_dict(state)
    rctx.step = 2 if where == "at_phase_boundary" else 3
    fresh = copy.deepcopy(base)
    for phase in ("dense", "sparse"):
        rctx.phase = phase
        fresh = resumed.prepare_model(fresh, rctx)
    assert resumed.mask.keys() == expected.keys()
    assert all(torch.equal(resumed.mask[n], expected[n]) for n in expected)


def test_check_refuses_weight_decay_and_fsdp():
    with pytest.raises(ValueError, match="weight_decay"):
        build_spec({"methods": ["lt_sft"], "train": {"weight_decay": 0.01}})
    with pytest.raises(ValueError, match="fsdp"):
        build_spec({"methods": ["lt_sft"], "scaling": {"strategy": "fsdp"}})


def test_real_ray_run_has_both_phases_and_exports_phi(ray_local, tiny_model_dir, tmp_path):
    result = train_tiny(tiny_model_dir, tmp_path, "lt_sft", methods=[{"name": "lt_sft", "k": 2000}],
                        data={"max_samples": 32, "eval_max_samples": 8}, train={"max_steps": 4, "checkpoint_every": 2})
    phases = [e for e in events(result.run_dir) if e["event"] == "phase"]
    assert [e["step"] for e in phases] == [0, 2]  # dense for steps 0-1, sparse for steps 2-3
    assert phases[1]["trainable"] <= phases[0]["trainable"] < phases[0]["total"]  # norms and the untied head never train
    diff, _ = load_diff(result.final_dir / DIFF_FILE)
    assert 0 < diff.nnz() <= 2000
    final = AutoModelForCausalLM.from_pretrained(result.final_dir)
    moved = sum(int(d.count_nonzero()) for d in deltas(final, AutoModelForCausalLM.from_pretrained(tiny_model_dir)).values())
    assert diff.nnz() <= moved <= 2000  # only the K selected entries ever left θ⁰
