"""`prompt_prefix` (e.g. a UL2 mode token) goes before every rendered prompt at generation."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from ftray.data import render_prompt
from ftray.eval.generate import generate
from ftray.methods.ul2 import mode_prompt


def test_prefix_is_generated_from(tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    (with_prefix,) = generate(model, tiny_tokenizer, [prompt], max_new_tokens=4, prefix="[S2S]")
    ids = tiny_tokenizer(mode_prompt(render_prompt(prompt, tiny_tokenizer), "S"), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
    assert with_prefix == tiny_tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
