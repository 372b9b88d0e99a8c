"""Depth upscaling (Yi-9B): exact copies in passthrough order, the cosine criterion, a deeper model that
saves, reloads and decodes with its KV cache, and the method inside a real Ray Train run."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from ftray.config import build_spec
from ftray.merge.depth_upscale import best_block, choose_block, decoder_layers, upscale
from ftray.methods import Context, build_methods
from tests.methods.helpers import run_steps, tiny_llama
from tests.train.helpers import train_tiny

IDS = torch.arange(3, 27).reshape(2, 12)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_zeroed_copies_leave_the_logits_exactly_equal():
    base = tiny_llama(layers=6)
    deeper = upscale(copy.deepcopy(base), (2, 5), zero_copies=True)
    assert deeper.config.num_hidden_layers == 9 and len(decoder_layers(deeper)) == 9
    torch.testing.assert_close(logits(deeper), logits(base), atol=1e-5, rtol=0)
    # Yi's plain copies (no zeroing) do change the output: the duplicated block runs twice
    assert not torch.allclose(logits(upscale(copy.deepcopy(base), (2, 5))), logits(base), atol=1e-3)


def test_layer_order_is_the_passthrough_layout_with_independent_copies():
    base = tiny_llama(layers=6)
    deeper = upscale(copy.deepcopy(base), (1, 4))
    old, new = decoder_layers(base), decoder_layers(deeper)
    order = [0, 1, 2, 3, 1, 2, 3, 4, 5]  # 0..e-1, s..e-1, e..L-1
    for i, j in enumerate(order):
        a, b = new[i].state_dict(), old[j].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), f"new layer {i} is not a copy of layer {j}"
        assert new[i].self_attn.layer_idx == i  # the KV-cache slot follows the new position
        assert new[i].self_attn.config is deeper.config  # copies share the live config, not a stale private one
    assert {p.data_ptr() for p in new[1].parameters()}.isdisjoint(p.data_ptr() for p in new[4].parameters())


def test_cosine_criterion_picks_the_block_that_is_an_identity(tiny_tokenizer):
    model = tiny_llama(layers=8, vocab=len(tiny_tokenizer))
    with torch.no_grad():
        for i in (3, 4):  # no residual contribution: output == input, cosine exactly 1
            decoder_layers(model)[i].self_attn.o_proj.weight.zero_()
            decoder_layers(model)[i].mlp.down_proj.weight.zero_()
    texts = ["A farmer has 23 eggs and sells 4.", "What is the chemical symbol for carbon?", "The answer is 12"]
    assert choose_block(model, tiny_tokenizer, texts, 2) == (3, 5)


def test_candidate_blocks_stay_off_the_ends_and_ties_go_early():
    cos = [0.99, 0.5, 0.9, 0.9, 0.5, 0.99]
    assert best_block(cos, 2) == (2, 4)  # [0,2) and [4,6) touch the first/last layer: not candidates
    assert best_block([0.7, 0.9, 0.9, 0.9, 0.7], 1) == (1, 2)
    assert best_block([0.1, 0.9], 1) == (1, 2)  # too shallow to leave the ends out: every block is a candidate


def test_deeper_model_saves_reloads_and_decodes_with_its_kv_cache(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    upscale(model, (0, 2))
    model.save_pretrained(tmp_path / "deep")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "deep")
    assert reloaded.config.num_hidden_layers == 4 and len(decoder_layers(reloaded)) == 4
    torch.testing.assert_close(logits(reloaded), logits(model))

    prompt, new = IDS[:1, :6], 10
    cached = reloaded.generate(prompt, max_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)
    ids = prompt
    for _ in range(new):  # greedy decoding without a cache: the whole sequence each step
        ids = torch.cat([ids, logits(reloaded, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ids)


def test_method_upscales_once_per_run_and_resumes_with_the_same_block(tiny_tokenizer):
    entry = {"name": "depth_upscale", "n_layers": 2}
    spec = build_spec({"methods": [entry]})
    ctx = Context(spec=spec, tokenizer=tiny_tokenizer)
    [method] = build_methods(spec.methods)
    model = method.prepare_model(tiny_llama(layers=6, vocab=len(tiny_tokenizer)), ctx)
    model = method.prepare_model(model, ctx)  # a second phase: no second upscaling
    assert model.config.num_hidden_layers == 8 and 1 <= method.block[0] and method.block[1] <= 5
    [resumed] = build_methods(spec.methods)
    resumed.load_state_dict({"block": [0, 3]})  # what the checkpoint recorded wins over a new calibration
    assert resumed.prepare_model(tiny_llama(layers=6), ctx).config.num_hidden_layers == 9 and resumed.block == (0, 3)


def test_training_moves_the_copies_apart_from_their_sources():
    model, methods, _ = run_steps(tiny_llama(layers=4), [{"name": "depth_upscale", "block": [1, 3]}], steps=2)
    layers = decoder_layers(model)
    assert len(layers) == 6 and methods[0].block == (1, 3)
    assert not torch.equal(layers[1].mlp.up_proj.weight, layers[3].mlp.up_proj.weight)


@pytest.mark.parametrize("methods,message", [
    ([{"name": "depth_upscale"}, {"name": "lora"}], "merge depth-upscale"),
    ([{"name": "hft"}, {"name": "depth_upscale"}], "list depth_upscale before hft"),
    ([{"name": "depth_upscale", "block": [3, 2]}], "0 <= s < e"),
])
def test_refuses_what_cannot_work(methods, message):
    with pytest.raises(ValueError, match=message):
        build_spec({"methods": methods})


def test_real_ray_run_checkpoints_and_exports_the_deeper_model(ray_local, tiny_model_dir, tmp_path):
    result = train_tiny(tiny_model_dir, tmp_path, "depth", methods=[{"name": "depth_upscale", "calibration_rows": 4}],
                        data={"max_samples": 32, "eval_max_samples": 8}, train={"max_steps": 2, "checkpoint_every": 2},
                        scaling={"num_workers": 2})
    for path in (result.checkpoint_dir, result.final_dir):
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.num_hidden_layers == 3 and len(decoder_layers(model)) == 3
