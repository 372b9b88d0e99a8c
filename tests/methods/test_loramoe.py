"""LoRAMoE: starts at the base model, router rows sum to 1, the LBC is CV² of I⊙Q (0 when all equal),
training with δ > 0 splits the experts' groups by task type, and mixed-source rows carry task types."""

import copy

import pytest
import torch

from ftray.config import build_spec
from ftray.methods import Context, build_methods
from ftray.methods.loramoe import LoraMoeLinear, lbc_loss
from ftray.train.loop import train_step
from ftray.train.optim import build_optimizer, build_scheduler
from tests.methods.helpers import FakeTok, prepare, run_steps, tiny_llama

IDS = torch.arange(3, 19).unsqueeze(0)


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def test_starts_at_the_base_model_and_only_experts_and_routers_train():
    base = tiny_llama()
    model, _, _ = run_steps(copy.deepcopy(base), [{"name": "loramoe"}], steps=0)
    torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=1e-6)  # B = 0
    model, _, _ = run_steps(copy.deepcopy(base), ["loramoe"], steps=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in n or ".lora_" in n for n in trainable)
    assert len(trainable) == 4 * 3 * 3  # 4 layers × gate/up/down × {router, A, B}
    layer = model.model.layers[0].mlp.down_proj
    assert layer.lora_A.weight.shape == (6 * 4, 32) and layer.router.weight.shape == (6, 32)
    before = dict(base.named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)  # backbone frozen
    assert not torch.allclose(logits(model), logits(base))


def test_router_rows_sum_to_one():
    model, _, _ = run_steps(tiny_llama(), ["loramoe"], steps=0)
    with torch.enable_grad():
        model(input_ids=IDS)
    for m in model.modules():
        if isinstance(m, LoraMoeLinear):
            assert m.routing.shape == (1, 16, 6)
            torch.testing.assert_close(m.routing.sum(-1), torch.ones(1, 16))


def test_lbc_is_cv_squared_of_weighted_mass_and_zero_when_all_equal():
    assert lbc_loss(torch.full((4, 6), 3.0), None, 0.1) == 0
    types = torch.tensor([1, 0])
    weight = torch.tensor([[1.1, 1.1, 0.9, 0.9], [0.9, 0.9, 1.1, 1.1]])
    assert lbc_loss(1 / weight, types, 0.1).abs() < 1e-12  # I⊙Q all equal
    q = torch.rand(2, 4)
    z = (weight * q).flatten()
    torch.testing.assert_close(lbc_loss(q, types, 0.1), z.var() / z.mean() ** 2)


def train_mixed(delta, steps=25):
    """Train on rows whose task type shows in their tokens; mean mass on experts[:E/2] per type."""
    spec = build_spec({"methods": [{"name": "loramoe", "delta": delta, "beta": 1.0}], "train": {"lr": 1e-2, "warmup_ratio": 0}})
    (method,) = build_methods(spec.methods)
    ctx = Context(spec=spec, tokenizer=FakeTok(), max_steps=steps)
    model = method.prepare_model(tiny_llama(layers=2), ctx)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], spec.train)
    sched = build_scheduler(opt, spec.train, steps)
    g = torch.Generator().manual_seed(0)

    def batch():
        ids = torch.randint(1, 128, (8, 16), generator=g)
        types = torch.tensor([1, 0] * 4)
        ids[types == 1, :8] = 5  # "closed-book QA" rows look alike
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids), "task_type": types}

    for ctx.step in range(steps):
        train_step(model, [batch()], [method], opt, sched, ctx, amp=None)
    b = batch()
    with torch.enable_grad():
        model(input_ids=b["input_ids"])
    first = torch.stack([m.routing.detach() for m in model.modules() if isinstance(m, LoraMoeLinear)])[..., :3].sum(-1)
    first = first.mean(dim=(0, 2))
    return first[b["task_type"] == 1].mean().item(), first[b["task_type"] == 0].mean().item()


def test_localized_balancing_splits_the_groups_by_task_type():
    """With δ > 0 the two task types use the expert groups differently; with δ = 0 they do not.

    Direction: the authors' LBC (followed here) minimises CV²(I⊙Q), whose minimum makes I⊙Q equal,
    i.e. LESS mass where I = 1+δ. So CBQA rows (I = 1+δ on experts[:E/2]) end up with less mass on
    experts[:E/2] than downstream rows: the opposite of the spec's sanity-check wording (see report).
    """
    cbqa, downstream = train_mixed(delta=0.3)
    assert downstream - cbqa > 0.1
    cbqa0, downstream0 = train_mixed(delta=0.0)
    assert abs(downstream0 - cbqa0) < (downstream - cbqa) / 2


def test_mix_source_rows_get_task_types_in_the_training_format(ray_local):
    spec = build_spec({"data": {"source": "bundled:factual_qa", "max_samples": 3},
                       "methods": [{"name": "loramoe", "task_type": 1, "mix_source": "bundled:arithmetic", "mix_samples": 2,
                                    "mix_task_type": 0}]})
    (method,) = build_methods(spec.methods)
    from ftray.data import load_rows
    from ftray.data.formats import format_of_columns

    rows, report = prepare(method, load_rows("bundled:factual_qa", max_samples=3).to_list(), spec)
    assert format_of_columns(rows[0]) == "prompt_completion"
    assert sorted(r["task_type"] for r in rows) == [0, 0, 1, 1, 1] and report["rows_task_type"] == {"1": 3, "0": 2}
    assert all("The answer is" in r["completion"] for r in rows if r["task_type"] == 0)  # arithmetic rows rewritten as prompt/completion
    with pytest.raises(ValueError, match="cannot be written"):
        spec2 = build_spec({"methods": [{"name": "loramoe", "mix_source": "bundled:factual_qa"}]})
        prepare(build_methods(spec2.methods)[0], load_rows("bundled:arithmetic", max_samples=2).to_list(), spec2)
