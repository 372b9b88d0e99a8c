"""LLMBoost: the spec's sanity checks (a new member equals its base; frozen predecessors get no gradient, CMA does;
CMA is causal; the suppression term is zero where the predecessor is right; cached = uncached decoding), the
checkpoint, the phased chain, and a 2-stage chain through real Ray Train runs with resume."""

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ftray.config import build_spec
from ftray.eval.loading import load_checkpoint
from ftray.methods import Context, build_methods
from ftray.methods.llmboost import error_suppression, truncate_chain
from ftray.methods.llmboost.model import LlmBoostCache, LlmBoostForCausalLM
from ftray.models import load_model
from ftray.train.loop import train_step
from ftray.train.optim import build_optimizer, build_scheduler
from tests.methods.helpers import random_batch

IDS = torch.arange(3, 19).reshape(2, 8)


def make(tiny_model_dir, members: int = 2, **fields):
    """(a chain of `members` on the tiny model, grown as the phased run grows it; its method; ctx; the untouched base)."""
    spec = build_spec({"model": {"name": str(tiny_model_dir)}, "methods": [{"name": "llmboost", "members": members, "lora_r": 4, **fields}],
                       "train": {"warmup_ratio": 0}})
    method = build_methods(spec.methods)[0]
    ctx = Context(spec=spec, tokenizer=None, max_steps=3)
    base = load_model(str(tiny_model_dir))
    torch.manual_seed(0)
    model = copy.deepcopy(base)
    for k in range(1, members + 1):
        ctx.phase = f"member_{k}"
        model = method.prepare_model(model, ctx)
    return model, method, ctx, base


def perturb(model, seed: int = 1, std: float = 0.05) -> None:
    """Random non-zero LoRA B and CMA W_o in every member, so each member differs from the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or (n.startswith("cma.") and n.endswith(".o.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def steps(model, method, ctx, n: int = 2, vocab: int = 1000) -> list[float]:
    """`n` real optimizer steps through the loop's train_step with the method's param group; the losses."""
    model.train()
    opt = build_optimizer(method.param_groups(model, ctx), ctx.spec.train)
    sched = build_scheduler(opt, ctx.spec.train, n)
    return [train_step(model, [random_batch(vocab=vocab, seed=s)], [method], opt, sched, ctx, amp=None)["loss"] for s in range(n)]


def test_default_layers_and_new_members_equal_the_base(tiny_model_dir):
    model, _, _, base = make(tiny_model_dir, members=3)
    assert model.config.layers == [2]  # every 4th layer; a 2-layer model gets its last layer
    assert model.n_members == 3 and [len(c) for c in model.cma] == [0, 1, 1]
    with torch.no_grad():
        expected = base.eval()(input_ids=IDS).logits
        assert (model.eval()(input_ids=IDS).logits - expected).abs().max() <= 1e-6
        states = None
        for m in range(3):  # every member on its own, through the step API
            logits, states = model.member_forward(m, IDS, states)
            assert (logits - expected).abs().max() <= 1e-6
    assert make(tiny_model_dir, members=1, every=1)[0].config.layers == [1, 2]


def test_frozen_members_get_no_gradient_and_cma_does(tiny_model_dir):
    model, method, ctx, _ = make(tiny_model_dir, members=3, every=1)
    perturb(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(model.member_of(n) == 2 and model.is_saved(n) for n in trainable)
    assert any(n.startswith("cma.2.") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    batch = random_batch(vocab=1000)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    out.logits.float().logsumexp(-1).mean().backward()
    assert not any(p.requires_grad for n, p in model.named_parameters() if model.member_of(n) < 2)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)  # members 1, 2 and the shared base
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("cma.2.") and ".o." in n)
    model.zero_grad(set_to_none=True)
    assert all(math.isfinite(v) for v in steps(model, method, ctx))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved <= trainable and any(n.startswith("cma.2.") for n in moved)
    assert not model.members[0].training and not model.members[1].training and model.members[2].training


def test_cma_is_causal_over_the_predecessor(tiny_model_dir):
    model, *_ = make(tiny_model_dir, every=1)
    perturb(model, std=0.5)
    model.eval()
    t = 4
    with torch.no_grad():
        _, states = model.member_forward(0, IDS)
        ref, _ = model.member_forward(1, IDS, states)
        changed = {layer: h.clone() for layer, h in states.items()}
        for h in changed.values():
            h[:, t + 1:] += torch.randn_like(h[:, t + 1:])
        out, _ = model.member_forward(1, IDS, changed)
    assert torch.equal(out[:, : t + 1], ref[:, : t + 1])
    assert not torch.allclose(out[:, t + 1:], ref[:, t + 1:])  # the perturbation reaches the later positions


def test_error_suppression_is_zero_where_the_predecessor_is_right():
    g = torch.Generator().manual_seed(0)
    logits, prev = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    targets = prev.argmax(-1).clone()
    targets[[1, 4]] = (targets[[1, 4]] + 1) % 10  # the predecessor is wrong at 1 and 4
    targets[5] = -100
    term, wrong = error_suppression(logits, prev, targets)
    assert wrong.tolist() == [False, True, False, False, True, False]
    assert torch.equal(term[~wrong], torch.zeros(4))
    p = logits.softmax(-1)[wrong, prev.argmax(-1)[wrong]]
    torch.testing.assert_close(term[wrong], -torch.log1p(-p))


def test_loss_hook_is_lambda_times_the_mean_suppression_plus_error_reweighting(tiny_model_dir):
    model, method, ctx, _ = make(tiny_model_dir, lam=0.5, error_weight=3.0)
    perturb(model)
    batch = random_batch(vocab=1000)
    keep = (batch["labels"][:, 1:] != -100).any(0).nonzero().squeeze(1)
    batch["logit_positions"] = keep
    out = model.train()(input_ids=batch["input_ids"], logits_to_keep=keep)
    extra, metrics = method.loss(model, batch, out, ctx)
    targets = batch["labels"][:, keep + 1].reshape(-1)
    z, zp = out.logits.reshape(-1, 1000), out.prev_logits.reshape(-1, 1000)
    term, wrong = error_suppression(z, zp, targets)
    ce = torch.nn.functional.cross_entropy(z, targets, reduction="none")
    n = (targets != -100).sum()
    torch.testing.assert_close(extra, 0.5 * term.sum() / n + 2.0 * (ce * wrong).sum() / n)
    assert 0 < metrics["prev_error_rate"] <= 1
    one, method1, ctx1, _ = make(tiny_model_dir, members=1)
    assert method1.loss(one, batch, one(input_ids=batch["input_ids"], logits_to_keep=keep), ctx1) == (None, {})


def test_additive_ensemble_adds_beta_times_the_predecessor(tiny_model_dir):
    model, *_ = make(tiny_model_dir, ensemble="additive", beta=0.5)
    perturb(model)
    with torch.no_grad():
        out = model.eval()(input_ids=IDS)
        z1, states = model.member_forward(0, IDS)
        z2, _ = model.member_forward(1, IDS, states)
    torch.testing.assert_close(out.logits, z2 + 0.5 * z1)


def test_kv_cache_decoding_and_generate_equal_full_recomputation(tiny_model_dir):
    model, *_ = make(tiny_model_dir, members=3, every=1)
    perturb(model)
    model.eval()
    with torch.no_grad():
        full = model(input_ids=IDS).logits
        cache = model(input_ids=IDS[:, :5], use_cache=True).past_key_values
        assert isinstance(cache, LlmBoostCache) and len(cache.layers) == 2 + (2 + 2) + (2 + 2)  # decoder + CMA layers
        logits = [model(input_ids=IDS[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1] for t in range(5, 8)]
        torch.testing.assert_close(torch.stack(logits, 1), full[:, 5:], rtol=0, atol=1e-5)
        generated = model.generate(IDS[:, :4], max_new_tokens=6, do_sample=False)
        x = IDS[:, :4]
        for _ in range(6):  # greedy without any cache
            x = torch.cat([x, model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, x)


def test_step_api_with_per_member_caches_decodes_like_the_chain(tiny_model_dir):
    """What a pipelined server does: each member with its own cache, states handed on per step."""
    model, *_ = make(tiny_model_dir, members=3, every=1)
    perturb(model)
    model.eval()
    caches = [model.new_member_cache(m) for m in range(3)]
    x = IDS[:, :4]
    new = x
    with torch.no_grad():
        for _ in range(4):
            states = None
            for m in range(3):
                logits, states = model.member_forward(m, new, states, caches[m], logits_to_keep=1)
            new = logits[:, -1].argmax(-1, keepdim=True)
            x = torch.cat([x, new], 1)
        reference = model.generate(IDS[:, :4], max_new_tokens=4, do_sample=False)
    assert torch.equal(x, reference)
    with pytest.raises(ValueError, match="needs member 0's states"):
        model.member_forward(1, IDS)


def test_continuous_batcher_decodes_a_chain_like_one_request_at_a_time(tiny_model_dir, tiny_tokenizer):
    """The HF engine's batcher merges, trims and drops rows of every member's and CMA cache alike."""
    import queue

    from serving.generation import ContinuousBatcher, Job

    model, *_ = make(tiny_model_dir, every=1)
    perturb(model)
    model.eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]

    def alone(prompt: list[int], n: int) -> list[int]:
        x = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(n):
                x = torch.cat([x, model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)], 1)
        return x[0, len(prompt):].tolist()

    batcher = ContinuousBatcher(model, tiny_tokenizer, eos_ids=set(), pad_id=0, max_batch_size=4)
    inboxes = []
    for prompt, n in zip(prompts, (6, 3, 5)):
        inbox = queue.SimpleQueue()
        inboxes.append((batcher.submit(Job(prompt, n), inbox.put), inbox, n))
    for (seq, inbox, n), prompt in zip(inboxes, prompts):
        events = [inbox.get(timeout=60) for _ in range(n)]
        assert events[-1].finish_reason == "length"
        assert seq.tracker.ids == alone(prompt, n)
    batcher.close()


def test_checkpoint_holds_no_base_weights_reloads_equal_and_truncates(tiny_model_dir, tiny_tokenizer, tmp_path):
    model, *_ = make(tiny_model_dir, every=1)
    perturb(model)
    model.save_pretrained(tmp_path / "chain")
    tiny_tokenizer.save_pretrained(tmp_path / "chain")
    saved = load_file(tmp_path / "chain" / "model.safetensors")
    assert saved and all(k.startswith("cma.1.") or "lora_" in k for k in saved)
    manifest = json.loads((tmp_path / "chain" / "manifest.json").read_text())
    assert manifest["finished_stages"] == 2 and manifest["layers"] == [1, 2]
    assert [m["member"] for m in manifest["members"]] == [1, 2]
    with torch.no_grad():
        expected = model.eval()(input_ids=IDS).logits
        member1, _ = model.member_forward(0, IDS)
    for reloaded in (AutoModelForCausalLM.from_pretrained(tmp_path / "chain"), load_checkpoint(tmp_path / "chain")[0]):
        assert isinstance(reloaded, LlmBoostForCausalLM) and reloaded.n_members == 2
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=IDS).logits, expected)
    first = truncate_chain(tmp_path / "chain", 1, tmp_path / "member1")
    alone = AutoModelForCausalLM.from_pretrained(first)
    assert alone.n_members == 1 and (first / "tokenizer.json").exists()
    with torch.no_grad():
        assert torch.equal(alone(input_ids=IDS).logits, member1)


def test_phased_resume_restores_the_finished_members(tiny_model_dir):
    """A phased run resumed in phase 2 rebuilds member 1 from the method state saved in its checkpoint."""
    model, method, ctx, base = make(tiny_model_dir)
    perturb(model)
    state = method.state_dict()
    assert state["members"] and all(n.startswith("members.0.") for n in state["members"])
    fresh = build_methods(ctx.spec.methods)[0]
    fresh.load_state_dict(state)
    rebuilt = copy.deepcopy(base)
    for k in (1, 2):
        ctx.phase = f"member_{k}"
        rebuilt = fresh.prepare_model(rebuilt, ctx)
    for n, p in rebuilt.named_parameters():
        if n.startswith("members.0.") and "lora_" in n:
            assert torch.equal(p, model.state_dict()[n]), n


def test_check_refuses_fsdp_packing_and_stage_without_chain(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="ddp"):
        build_spec({"methods": ["llmboost"], "scaling": {"strategy": "fsdp"}})
    with pytest.raises(ValueError, match="packing"):
        build_spec({"methods": ["llmboost"], "data": {"packing": True}})
    with pytest.raises(ValueError, match="chain_dir"):
        build_spec({"methods": [{"name": "llmboost", "stage": 2}]})
    with pytest.raises(ValueError, match="stage 3 > "):
        build_spec({"methods": [{"name": "llmboost", "stage": 3}]})
    with pytest.raises(ValueError, match="cannot be combined"):
        build_spec({"methods": ["lora", "llmboost"]})
    with pytest.raises(ValueError, match="1..2"):
        make(tiny_model_dir, layers=[3])


@pytest.mark.slow
def test_two_stage_chain_through_ray_train_resumes_and_reloads(ray_local, tiny_model_dir, tmp_path):
    """`ftray boost`'s driver: stage 1 alone, then the same chain with 2 members runs only stage 2; the chain
    directory reloads with `ftray eval`'s loader, member 1 unchanged by stage 2."""
    from ftray.boost import run_chain
    from tests.train.helpers import logged

    spec = build_spec({
        "model": {"name": str(tiny_model_dir)},
        "data": {"source": "bundled:arithmetic", "max_len": 96, "max_samples": 32, "eval_max_samples": 4},
        "methods": [{"name": "llmboost", "members": 2, "every": 1, "lora_r": 4, "lr": 1e-2}],
        "train": {"max_steps": 3, "batch_size": 4, "log_every": 1, "warmup_ratio": 0.0},
        "scaling": {"num_workers": 1},
        "output": {"dir": str(tmp_path), "name": "boost"},
    })
    lines = []
    first = run_chain(spec, members=1, log=lines.append)
    chain = tmp_path / "boost-chain"
    assert first["finished_stages"] == 1 and (chain / "manifest.json").exists()
    one = load_checkpoint(chain)[0]
    stage1_metrics = (tmp_path / "boost-stage1" / "metrics.jsonl").read_text()

    lines.clear()
    second = run_chain(spec, members=2, log=lines.append)
    assert any("stage 2/2" in line for line in lines) and not any("stage 1/" in line for line in lines)
    assert (tmp_path / "boost-stage1" / "metrics.jsonl").read_text() == stage1_metrics  # stage 1 did not run again
    assert second["finished_stages"] == 2 and [s["stage"] for s in second["stages"]] == [1, 2]
    losses = logged(tmp_path / "boost-stage2")
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses.values())
    model, tokenizer = load_checkpoint(chain)
    assert isinstance(model, LlmBoostForCausalLM) and model.n_members == 2 and len(tokenizer) > 0
    for n, p in one.named_parameters():  # member 1 frozen through stage 2
        assert torch.equal(p, model.state_dict()[n]), n
    assert model.cma[1]["1"].o.weight.abs().sum() > 0  # CMA trained away from its zero start
    lines.clear()
    assert run_chain(spec, members=2, log=lines.append)["finished_stages"] == 2 and "all 2 stages finished" in lines[0]


@pytest.mark.slow
def test_phased_chain_in_one_two_worker_ddp_run_and_member1_metrics(ray_local, tiny_model_dir, tmp_path):
    """`ftray train llmboost` (stage null): one Ray Train run, one phase per member, DDP on 2 workers; the final
    directory is a 2-member chain, and the bench's member-1 measurement runs on it."""
    from ftray.methods.llmboost import member1_metrics
    from ftray.train.trainer import run

    spec = build_spec({
        "model": {"name": str(tiny_model_dir)},
        "data": {"source": "bundled:arithmetic", "max_len": 96, "max_samples": 32, "eval_max_samples": 4},
        "methods": [{"name": "llmboost", "members": 2, "every": 1, "lora_r": 4, "lr": 1e-2}],
        "train": {"max_steps": 4, "batch_size": 2, "log_every": 1, "warmup_ratio": 0.0},
        "scaling": {"num_workers": 2},
        "output": {"dir": str(tmp_path), "name": "phased"},
    })
    result = run(spec)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    phases = [r for r in rows if r.get("event") == "phase"]
    assert [r["step"] for r in phases] == [0, 2]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert [r for r in rows if "prev_error_rate" in r] and all(r["step"] > 2 for r in rows if "prev_error_rate" in r)
    model, _ = load_checkpoint(result.final_dir)
    assert isinstance(model, LlmBoostForCausalLM) and model.n_members == 2
    assert json.loads((result.final_dir / "manifest.json").read_text())["finished_stages"] == 2
    metrics = member1_metrics(str(result.final_dir), 2, tmp_path)
    assert set(metrics) == {"member1_arith_em", "member1_arith_ppl"} and math.isfinite(metrics["member1_arith_ppl"])
