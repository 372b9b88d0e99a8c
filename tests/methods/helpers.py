"""Helpers for method tests: a tiny random Llama and a few real optimizer steps through `train_step`."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ftray.config import build_spec
from ftray.methods import Context, build_methods
from ftray.train.loop import train_step
from ftray.train.optim import build_optimizer, build_scheduler


def tiny_llama(layers: int = 4, vocab: int = 128, kv_heads: int = 4, seed: int = 0) -> LlamaForCausalLM:
    """A random 4-layer MHA Llama (q/k/v/o and gate/up/down all the same size)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


class FakeTok:
    """Just what hooks read from a tokenizer: its length and pad id."""

    def __init__(self, vocab: int = 128) -> None:
        self.vocab, self.pad_token_id = vocab, 0

    def __len__(self) -> int:
        return self.vocab


def random_batch(vocab: int = 128, batch: int = 4, seq: int = 16, prompt: int = 6, seed: int = 0) -> dict:
    """input_ids with the first `prompt` positions masked out of the labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def run_steps(model, entries: list, steps: int = 3, overrides: dict | None = None):
    """Prepare `model` with the methods in `entries` and take `steps` real optimizer steps."""
    spec = build_spec({"methods": entries, "train": {"lr": 1e-2, "warmup_ratio": 0, **(overrides or {})}})
    methods = build_methods(spec.methods)
    ctx = Context(spec=spec, tokenizer=FakeTok(), max_steps=steps)
    for m in methods:
        model = m.prepare_model(model, ctx)
    groups = next((g for m in methods if (g := m.param_groups(model, ctx))), None)
    params = groups or [p for p in model.parameters() if p.requires_grad]
    opt = next((o for m in methods if (o := m.optimizer(params, ctx))), None) or build_optimizer(params, spec.train)
    sched = build_scheduler(opt, spec.train, steps)
    for step in range(steps):
        ctx.step = step
        for m in methods:
            m.on_step(model, opt, ctx)
        train_step(model, [random_batch(seed=step)], methods, opt, sched, ctx, amp=None)
    return model, methods, ctx


def prepare(method, rows: list[dict], spec, tokenizer=None) -> tuple[list[dict], dict]:
    """Run `method.prepare_data` on Ray Data over `rows` (as the pipeline does); (rows out in order, report)."""
    import ray.data

    from ftray.train.trainer import ensure_ray

    ensure_ray()
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ctx = Context(spec=spec, tokenizer=tokenizer)
    return method.prepare_data(ray.data.from_items(rows), ctx).take_all(), ctx.report
