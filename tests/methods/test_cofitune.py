"""CoFiTune: only up/down in the chosen layers move, a unit with I = 1 gets exactly no update, I = 0 is coarse-only."""

import copy

import pytest
import torch

from ftray.config import build_spec
from ftray.methods import Context, build_methods
from ftray.methods import cofitune as cf
from ftray.train.loop import train_step
from ftray.train.optim import build_optimizer, build_scheduler
from tests.methods.helpers import FakeTok, random_batch, tiny_llama

PROBE = [random_batch(seed=100 + i) for i in range(2)]


@pytest.fixture(autouse=True)
def probe_rows(monkeypatch):
    """The fake tokenizer cannot tokenize: the probe set is two random batches (the real path runs in the contract test)."""
    monkeypatch.setattr(cf, "probe_batches", lambda ctx, n, bs, source=None: PROBE)


def train(model, entry: dict, steps: int = 3, importance: dict | None = None, weight_decay: float = 0.0):
    """Prepare `model` with one cofitune entry (optionally with given importance vectors) and take real steps."""
    spec = build_spec({"methods": [entry], "train": {"lr": 1e-2, "warmup_ratio": 0, "schedule": "constant", "weight_decay": weight_decay}})
    (method,) = build_methods(spec.methods)
    if importance is not None:
        method.load_state_dict({"importance": importance})
    ctx = Context(spec=spec, tokenizer=FakeTok(), max_steps=steps)
    model = method.prepare_model(model, ctx)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], spec.train)
    sched = build_scheduler(opt, spec.train, steps)
    for step in range(steps):
        ctx.step = step
        train_step(model, [random_batch(seed=step)], [method], opt, sched, ctx, amp=None)
    return model, method


def changed(before, after) -> set[str]:
    b = dict(before.named_parameters())
    return {n for n, p in after.named_parameters() if not torch.equal(p, b[n])}


@pytest.mark.parametrize("n, expected", [(32, range(8, 16)), (40, range(10, 20)), (60, range(15, 30)), (30, range(7, 15)), (4, [1]), (2, [0])])
def test_second_quarter_is_the_papers_layers(n, expected):
    assert cf.layer_range(n, 0.25, 0.5) == list(expected)


def test_only_up_and_down_of_the_chosen_layers_change():
    base = tiny_llama(layers=8)
    model, method = train(copy.deepcopy(base), {"name": "cofitune"})
    expected = {f"model.layers.{i}.mlp.{m}.weight" for i in (2, 3) for m in ("up_proj", "down_proj")}
    assert changed(base, model) == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert method.importance["in"].shape == (2, 32) and method.importance["out"].shape == (2, 32)


def test_coarse_choice_follows_the_config():
    base = tiny_llama(layers=4)
    model, _ = train(copy.deepcopy(base), {"name": "cofitune", "layers": [0.5, 1.0], "modules": ["q_proj", "v_proj"], "soft_mask": False})
    assert changed(base, model) == {f"model.layers.{i}.self_attn.{m}.weight" for i in (2, 3) for m in ("q_proj", "v_proj")}


def test_unit_with_importance_one_gets_exactly_zero_update():
    base = tiny_llama(layers=4)  # layer 1 is the chosen one
    imp = {"in": torch.rand(1, 32) * 0.9, "out": torch.rand(1, 32) * 0.9}
    imp["in"][0, [3, 17]] = 1.0
    imp["out"][0, [0, 5]] = 1.0
    model, _ = train(copy.deepcopy(base), {"name": "cofitune"}, importance=imp)
    b, a = dict(base.named_parameters()), dict(model.named_parameters())
    for name, rows in (("up_proj", [3, 17]), ("down_proj", [0, 5])):
        w0, w1 = b[f"model.layers.1.mlp.{name}.weight"], a[f"model.layers.1.mlp.{name}.weight"]
        moved = (w0 != w1).any(dim=1)
        assert not moved[rows].any()  # bit-identical rows
        assert moved.sum() == 32 - len(rows)  # every other unit trained


def test_weight_decay_still_shrinks_a_fully_important_unit():
    """Decoupled weight decay is not a gradient: the soft mask leaves it (the paper trains with wd 0.1)."""
    base = tiny_llama(layers=4)
    imp = {"in": torch.ones(1, 32), "out": torch.ones(1, 32)}
    model, _ = train(copy.deepcopy(base), {"name": "cofitune"}, importance=imp, weight_decay=0.1)
    w0, w1 = dict(base.named_parameters())["model.layers.1.mlp.up_proj.weight"], dict(model.named_parameters())["model.layers.1.mlp.up_proj.weight"]
    torch.testing.assert_close(w1, w0 * (1 - 1e-2 * 0.1) ** 3)


def test_zero_importance_equals_coarse_only_training():
    base = tiny_llama(layers=4)
    zeros = {"in": torch.zeros(1, 32), "out": torch.zeros(1, 32)}
    masked, _ = train(copy.deepcopy(base), {"name": "cofitune"}, importance=zeros)
    coarse, _ = train(copy.deepcopy(base), {"name": "cofitune", "soft_mask": False})
    assert changed(base, coarse)
    for (n, p), (_, q) in zip(masked.named_parameters(), coarse.named_parameters()):
        assert torch.equal(p, q), n


def test_after_backward_scales_each_units_row_by_one_minus_importance():
    spec = build_spec({"methods": ["cofitune"]})
    (method,) = build_methods(spec.methods)
    imp = {"in": torch.rand(1, 32), "out": torch.rand(1, 32)}
    method.load_state_dict({"importance": imp})
    model = method.prepare_model(tiny_llama(layers=4), Context(spec=spec, tokenizer=FakeTok()))
    mlp = model.model.layers[1].mlp
    for lin in (mlp.up_proj, mlp.down_proj):
        lin.weight.grad = torch.ones_like(lin.weight)
    method.after_backward(model, Context(spec=spec, tokenizer=FakeTok()))
    torch.testing.assert_close(mlp.up_proj.weight.grad, (1 - imp["in"][0])[:, None].expand(32, 32))
    torch.testing.assert_close(mlp.down_proj.weight.grad, (1 - imp["out"][0])[:, None].expand(32, 32))


def test_importance_is_standardised_per_layer_seeded_and_kept_across_resume(monkeypatch):
    model = tiny_llama(layers=8)
    a = cf.importance_vectors(model, [2, 3], PROBE, dropout=0.003, seed=1)
    b = cf.importance_vectors(model, [2, 3], PROBE, dropout=0.003, seed=1)
    assert torch.equal(a["in"], b["in"]) and torch.equal(a["out"], b["out"])  # same on every rank
    assert not any(p.grad is not None or not p.requires_grad for p in model.parameters())  # probing leaves no trace
    for v in a.values():
        assert v.shape == (2, 32) and ((v >= 0) & (v <= 1)).all() and v.std() > 0
    g = torch.tensor([[1.0, 2.0, 3.0, 10.0]])
    torch.testing.assert_close(cf.standardized_importance(g), torch.tanh((g - g.mean()) / g.std()).abs())

    _, method = train(tiny_llama(layers=8), {"name": "cofitune"}, steps=1)
    state = method.state_dict()
    monkeypatch.setattr(cf, "probe_batches", lambda *a, **k: pytest.fail("a resumed run recomputed the importance"))
    _, resumed = train(tiny_llama(layers=8), {"name": "cofitune"}, steps=1, importance=state["importance"])
    assert resumed.importance is state["importance"]


def test_several_probe_sources_combine_by_elementwise_max(monkeypatch):
    other = [random_batch(seed=200)]
    monkeypatch.setattr(cf, "probe_batches", lambda ctx, n, bs, source=None: other if source else PROBE)
    _, method = train(tiny_llama(layers=4), {"name": "cofitune", "probe_sources": ["other.jsonl"]}, steps=1)
    seed = cf.stable_seed("cofitune", 0)
    ref = [cf.importance_vectors(tiny_llama(layers=4), [1], batches, 0.003, seed) for batches in (PROBE, other)]
    for k in ("in", "out"):
        torch.testing.assert_close(method.importance[k], torch.maximum(ref[0][k], ref[1][k]))


def test_soft_mask_refuses_sharded_gradients():
    with pytest.raises(ValueError, match="cofitune"):
        build_spec({"methods": ["cofitune"], "scaling": {"strategy": "fsdp", "num_workers": 2}})
    build_spec({"methods": [{"name": "cofitune", "soft_mask": False}], "scaling": {"strategy": "fsdp", "num_workers": 2}})
    with pytest.raises(ValueError, match="layers"):
        build_spec({"methods": [{"name": "cofitune", "layers": [0.5, 0.25]}]})
