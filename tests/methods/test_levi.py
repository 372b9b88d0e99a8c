"""LEVI: the spec's sanity checks (P bit-identical and gradient-free, ensemble = mean of views, zeroed G),
the checkpoint (no P weights, exact reload), KV-cache decoding and a 2-worker DDP run through Ray Train."""

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
from ftray.methods.levi import domain_metrics
from ftray.methods.levi.model import LeviCache, LeviForCausalLM
from ftray.models import load_model
from ftray.train.loop import train_step
from ftray.train.optim import build_optimizer, build_scheduler
from tests.methods.helpers import random_batch


def make(tiny_model_dir, **fields):
    """(LEVI model on the tiny model, its method, ctx, the untouched base)."""
    spec = build_spec({"model": {"name": str(tiny_model_dir)}, "methods": [{"name": "levi", **fields}],
                       "train": {"warmup_ratio": 0}})
    method = build_methods(spec.methods)[0]
    ctx = Context(spec=spec, tokenizer=None, max_steps=3)
    base = load_model(str(tiny_model_dir))
    torch.manual_seed(0)
    return method.prepare_model(copy.deepcopy(base), ctx), method, ctx, base


def steps(model, method, ctx, n: int = 3, vocab: int = 1000) -> list[float]:
    """`n` real optimizer steps through the loop's train_step with the method's param groups; the losses."""
    model.train()
    opt = build_optimizer(method.param_groups(model, ctx), ctx.spec.train)
    sched = build_scheduler(opt, ctx.spec.train, n)
    losses = []
    for step in range(n):
        ctx.step = step
        losses.append(train_step(model, [random_batch(vocab=vocab, seed=step % 2)], [method], opt, sched, ctx, amp=None)["loss"])
    return losses


def perturb(model, seed: int = 1, std: float = 0.05) -> None:
    """Random non-zero adapters (and LoRA B), so the model differs from P."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("adapters.") or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


IDS = torch.arange(3, 19).reshape(2, 8)


def test_default_layers_and_start_equals_the_base_exactly(tiny_model_dir):
    model, _, _, base = make(tiny_model_dir)
    assert isinstance(model, LeviForCausalLM) and model.config.layers == [1, 2]  # {⌊L/2⌋, L} for L = 2
    assert model.config.base_model == str(tiny_model_dir.resolve())
    with torch.no_grad():  # zero-initialised adapter outputs + residual: LEVI's logits are P's
        assert torch.equal(model.eval()(input_ids=IDS).logits, base.eval()(input_ids=IDS).logits)


def test_training_leaves_the_base_bit_identical_and_gradient_free_and_lowers_the_loss(tiny_model_dir):
    model, method, ctx, base = make(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = steps(model, method, ctx, n=6)
    for n, p in model.named_parameters():
        if n.startswith("base."):
            assert torch.equal(p, before[n]) and not p.requires_grad, n  # P bit-identical
        else:
            assert not torch.equal(p, before[n]), n  # every G and adapter tensor moved
    assert losses[-1] < losses[0]
    # Gradient norms on P are None after a backward pass.
    out = model.train()(input_ids=IDS, attention_mask=torch.ones_like(IDS))
    out.logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("base."))
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("base."))


@pytest.mark.parametrize("residual", [True, False])
def test_ensemble_logits_are_the_mean_of_the_views(tiny_model_dir, residual):
    model, *_ = make(tiny_model_dir, per_view_loss=0.5, residual=residual, layers=[1, 2, 2])
    perturb(model)
    out = model.train()(input_ids=IDS)
    assert len(out.view_logits) == 3
    torch.testing.assert_close(out.logits, torch.stack(out.view_logits).mean(0), rtol=0, atol=1e-5)
    assert model.eval()(input_ids=IDS).view_logits is None  # only computed when the per-view loss needs them


def test_per_view_loss_is_lambda_times_the_mean_view_ce(tiny_model_dir):
    model, method, ctx, _ = make(tiny_model_dir, per_view_loss=0.5)
    perturb(model)
    batch = random_batch(vocab=1000)
    keep = (batch["labels"][:, 1:] != -100).any(0).nonzero().squeeze(1)
    batch["logit_positions"] = keep
    out = model.train()(input_ids=batch["input_ids"], logits_to_keep=keep)
    extra, metrics = method.loss(model, batch, out, ctx)
    targets = batch["labels"][:, keep + 1].reshape(-1)
    ces = [torch.nn.functional.cross_entropy(v.reshape(-1, 1000), targets) for v in out.view_logits]
    torch.testing.assert_close(extra, 0.5 * (ces[0] + ces[1]) / 2)
    assert metrics["view_ce"] > 0


def test_k1_with_g_zeroed_is_p_features_plus_a_trainable_head(tiny_model_dir):
    """The spec's reduction: K = 1 and g = 0 give lm_head(A([h_P^(L); 0])) (no residual: the literal z = A(...))."""
    model, method, ctx, _ = make(tiny_model_dir, layers=[2], residual=False)
    perturb(model)
    with torch.no_grad():
        model.task.norm.weight.zero_()  # G's output g = 0
        h = model.base.model(input_ids=IDS).last_hidden_state
        z = model.adapters[0](torch.cat([h, torch.zeros(*h.shape[:2], 128)], -1))
        expected = model.base.lm_head(z)
        got = model.eval()(input_ids=IDS).logits
    assert got.shape == (2, 8, 1000)
    torch.testing.assert_close(got, expected)
    assert all(math.isfinite(loss) for loss in steps(model, method, ctx, n=2))


def test_checkpoint_holds_no_base_weights_and_reloads_equal(tiny_model_dir, tiny_tokenizer, tmp_path):
    model, *_ = make(tiny_model_dir)
    perturb(model)
    model.save_pretrained(tmp_path / "ckpt")
    tiny_tokenizer.save_pretrained(tmp_path / "ckpt")
    saved = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert saved and not any(k.startswith("base.") for k in saved)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["base_model"] == str(tiny_model_dir.resolve())
    for reloaded in (AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt"), load_checkpoint(tmp_path / "ckpt")[0]):
        assert isinstance(reloaded, LeviForCausalLM)
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=IDS).logits, model.eval()(input_ids=IDS).logits)


def test_lora_base_mode_trains_and_saves_only_lora_on_p(tiny_model_dir, tmp_path):
    model, method, ctx, _ = make(tiny_model_dir, base_mode="lora", lora_r=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and all(not n.startswith("base.") or "lora_" in n for n in trainable)
    groups = method.param_groups(model, ctx)
    assert [g["lr"] for g in groups] == [1e-3, 1e-4]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps(model, method, ctx, n=2)
    for n, p in model.named_parameters():
        if n.startswith("base.") and "lora_" not in n:
            assert torch.equal(p, before[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_B" in n)
    model.save_pretrained(tmp_path / "ckpt")
    saved = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert any("lora_B" in k for k in saved) and not any(k.startswith("base.") and "lora_" not in k for k in saved)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, model.eval()(input_ids=IDS).logits)


def test_kv_cache_decoding_and_generate_equal_full_recomputation(tiny_model_dir):
    model, *_ = make(tiny_model_dir)
    perturb(model)
    model.eval()
    with torch.no_grad():
        full = model(input_ids=IDS).logits
        out = model(input_ids=IDS[:, :5], use_cache=True)
        cache = out.past_key_values
        assert isinstance(cache, LeviCache) and len(cache.layers) == 2 + 2  # P's layers, then G's
        logits = [model(input_ids=IDS[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1] for t in range(5, 8)]
        torch.testing.assert_close(torch.stack(logits, 1), full[:, 5:], rtol=0, atol=1e-5)
        generated = model.generate(IDS[:, :4], max_new_tokens=6, do_sample=False)
        x = IDS[:, :4]
        for _ in range(6):  # greedy without any cache
            x = torch.cat([x, model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, x)


def test_continuous_batcher_decodes_levi_like_one_request_at_a_time(tiny_model_dir, tiny_tokenizer):
    """The HF engine's batcher merges, trims and drops rows of P's and G's caches alike: one forward per step."""
    import queue

    from serving.generation import ContinuousBatcher, Job

    model, *_ = make(tiny_model_dir)
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
    for prompt, n in zip(prompts, (6, 3, 5)):  # rows of different lengths leave at different steps
        inbox = queue.SimpleQueue()
        seq = batcher.submit(Job(prompt, n), inbox.put)
        inboxes.append((seq, inbox, n))
    for (seq, inbox, n), prompt in zip(inboxes, prompts):
        events = [inbox.get(timeout=60) for _ in range(n)]
        assert events[-1].finish_reason == "length"
        assert seq.tracker.ids == alone(prompt, n)
    batcher.close()


def test_check_refuses_fsdp_and_bad_layers(tiny_model_dir):
    with pytest.raises(ValueError, match="ddp"):
        build_spec({"methods": ["levi"], "scaling": {"strategy": "fsdp"}})
    with pytest.raises(ValueError, match="1..2"):
        make(tiny_model_dir, layers=[3])
    with pytest.raises(ValueError, match="cannot be combined"):
        build_spec({"methods": ["lora", "levi"]})


@pytest.mark.slow
def test_two_worker_ddp_run_exports_a_levi_checkpoint(ray_local, tiny_model_dir, tmp_path):
    """A real 2-worker Ray Train run (DDP, frozen P: no unused-parameter complaint): finite losses, a final dir
    without P's weights that loads as LEVI with P untouched and trained adapters, and the bench's in-domain /
    shifted measurement on it."""
    from ftray.train.trainer import run
    from tests.train.helpers import logged

    spec = build_spec({
        "model": {"name": str(tiny_model_dir)},
        "data": {"source": "bundled:factual_qa", "max_len": 64, "max_samples": 64, "eval_max_samples": 8},
        "methods": [{"name": "levi", "task_hidden": 32, "adapter_hidden": 32}],
        "train": {"max_steps": 6, "batch_size": 4, "log_every": 2, "warmup_ratio": 0.0},
        "scaling": {"num_workers": 2},
        "output": {"dir": str(tmp_path), "name": "levi"},
    })
    result = run(spec)
    losses = logged(result.run_dir)
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses.values())
    saved = load_file(result.final_dir / "model.safetensors")
    assert not any(k.startswith("base.") for k in saved)
    model, _ = load_checkpoint(result.final_dir)
    base = load_model(str(tiny_model_dir))
    assert isinstance(model, LeviForCausalLM)
    assert all(torch.equal(p, model.base.state_dict()[n]) for n, p in base.state_dict().items())
    assert all(a[2].weight.abs().sum() > 0 for a in model.adapters)  # trained away from the zero start
    metrics = domain_metrics(str(result.final_dir), 4, tmp_path)
    assert set(metrics) == {"id_loss", "id_em", "shift_loss", "shift_em"} and all(math.isfinite(v) for v in metrics.values())
