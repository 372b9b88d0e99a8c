"""Masked Thought: ≈p of response tokens corrupted in the input, none in the prompt, labels intact."""

import copy

import pytest
import torch

from ftray.config import build_spec
from ftray.methods import Context, build_methods
from ftray.methods.masked_thought import mask_probability
from tests.methods.helpers import FakeTok, random_batch, run_steps, tiny_llama


def corrupt(p: float, step: int = 0, max_steps: int = 1, warmup: float = 0.0, seed: int = 0):
    spec = build_spec({"methods": [{"name": "masked_thought", "p": p, "warmup": warmup}]})
    (mt,) = build_methods(spec.methods)
    ctx = Context(spec=spec, tokenizer=FakeTok(), step=step, max_steps=max_steps)
    ctx.generator.manual_seed(seed)
    batch = random_batch(batch=64, seq=64, prompt=20)
    return batch, mt.corrupt_batch(batch, ctx)


def test_corrupted_fraction_matches_p_and_prompt_is_untouched():
    batch, out = corrupt(0.3)
    response = batch["labels"] != -100
    changed = out["input_ids"] != batch["input_ids"]
    assert not changed[~response].any()  # no prompt (or padding) token changes
    assert torch.equal(out["labels"], batch["labels"])  # labels are the uncorrupted ids
    frac = changed[response].float().mean().item()
    assert frac == pytest.approx(0.3, abs=0.02)  # random ids collide with the original only 1/128 of the time


def test_warmup_schedule_is_linear_to_p_max():
    assert mask_probability(0.4, 0.66, 0, 100) == 0
    assert mask_probability(0.4, 0.66, 33, 100) == pytest.approx(0.4 * 33 / 67)
    assert mask_probability(0.4, 0.66, 90, 100) == 0.4
    _, out = corrupt(0.4, step=0, max_steps=100, warmup=0.66)
    batch, _ = corrupt(0.0)
    assert torch.equal(out["input_ids"], batch["input_ids"])


def test_p_zero_equals_plain_sft_exactly():
    base = tiny_llama()
    plain, _, _ = run_steps(copy.deepcopy(base), ["full"], steps=3)
    masked, _, _ = run_steps(copy.deepcopy(base), ["full", {"name": "masked_thought", "p": 0.0}], steps=3)
    for (n, a), (_, b) in zip(plain.named_parameters(), masked.named_parameters()):
        assert torch.equal(a, b), n


def test_pad_replacement_uses_pad_id():
    spec = build_spec({"methods": [{"name": "masked_thought", "p": 1.0, "warmup": 0, "replace": "pad"}]})
    (mt,) = build_methods(spec.methods)
    batch = random_batch()
    out = mt.corrupt_batch(batch, Context(spec=spec, tokenizer=FakeTok(), max_steps=1))
    assert (out["input_ids"][batch["labels"] != -100] == 0).all()
