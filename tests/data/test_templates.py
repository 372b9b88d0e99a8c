"""Named chat templates: golden renders of a 2-turn conversation, masking of every assistant turn, generation stops."""

from __future__ import annotations

import copy

import datasets
import pytest

from ftray.data import render_prompt, tokenize_dataset
from ftray.data.templates import ALPACA_PREAMBLE, cut_at_stop, render_chat, stop_strings, use_chat_template

TWO_TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima"}]
EOS = "<|im_end|>"  # the tiny tokenizer's eos
GOLDEN = {
    "chatml": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
              "<|im_start|>user\nCapital of Peru?<|im_end|>\n<|im_start|>assistant\nLima<|im_end|>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nCapital of Peru?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nLima<|eot_id|>",
    "alpaca": f"{ALPACA_PREAMBLE}\n\n### Instruction:\nHi\n\n### Response:\nHello!{EOS}"
              f"\n\n### Instruction:\nCapital of Peru?\n\n### Response:\nLima{EOS}",
    "plain": f"Hi\nHello!{EOS}\nCapital of Peru?\nLima{EOS}",
}
GENERATION_PROMPT = {
    "chatml": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "alpaca": f"{ALPACA_PREAMBLE}\n\n### Instruction:\nHi\n\n### Response:\n",
    "plain": "Hi\n",
}
END_OF_TURN = {"chatml": "<|im_end|>\n", "llama3": "<|eot_id|>", "alpaca": EOS, "plain": EOS}


@pytest.fixture(scope="module")
def marker_tokenizer(tiny_tokenizer):
    """The tiny tokenizer with Llama-3's markers as special tokens, so that no BPE merge crosses a turn boundary."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>",
                                                          "<|end_header_id|>", "<|eot_id|>"]})
    return tok


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_two_turn_render_matches_the_golden_string(tiny_tokenizer, name: str) -> None:
    assert render_chat(TWO_TURNS, tiny_tokenizer, name) == GOLDEN[name]
    assert render_prompt(TWO_TURNS[:1], tiny_tokenizer, name) == GENERATION_PROMPT[name]


def test_alpaca_system_message_replaces_the_preamble(tiny_tokenizer) -> None:
    messages = [{"role": "system", "content": "Be terse."}, *TWO_TURNS[:2]]
    assert render_chat(messages, tiny_tokenizer, "alpaca") == f"Be terse.\n\n### Instruction:\nHi\n\n### Response:\nHello!{EOS}"


def test_auto_is_the_tokenizers_own_template_else_chatml(tiny_tokenizer) -> None:
    own = copy.deepcopy(tiny_tokenizer)
    own.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    assert render_chat(TWO_TURNS[:2], own) == "[user] Hi\n[assistant] Hello!\n"
    bare = copy.deepcopy(tiny_tokenizer)
    bare.chat_template = None
    assert render_chat(TWO_TURNS, bare) == GOLDEN["chatml"]
    assert use_chat_template(bare, "auto").chat_template == use_chat_template(copy.deepcopy(own), "chatml").chat_template
    with pytest.raises(ValueError, match="unknown template 'vicuna'"):
        render_chat(TWO_TURNS, own, "vicuna")


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_every_assistant_turn_and_its_end_is_learned_and_nothing_else(marker_tokenizer, name: str) -> None:
    t = tokenize_dataset(datasets.Dataset.from_list([{"messages": TWO_TURNS}]), marker_tokenizer, "chat", max_len=256,
                         chat_template=name)[0]
    assert marker_tokenizer.decode(t["input_ids"]) == GOLDEN[name]
    labelled = [i for i, label in zip(t["input_ids"], t["labels"]) if label != -100]
    assert marker_tokenizer.decode(labelled) == "Hello!" + END_OF_TURN[name] + "Lima" + END_OF_TURN[name]


def test_supervised_count_is_assistant_content_plus_end_tokens(tiny_tokenizer) -> None:
    """The spec's masking check on ChatML: count = assistant content tokens + end tokens; no user token labelled."""
    t = tokenize_dataset(datasets.Dataset.from_list([{"messages": TWO_TURNS}]), tiny_tokenizer, "chat", max_len=256)[0]
    n = lambda text: len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    assistant = [m["content"] for m in TWO_TURNS if m["role"] == "assistant"]
    supervised = sum(label != -100 for label in t["labels"])
    assert supervised == sum(n(c) for c in assistant) + len(assistant) * n("<|im_end|>\n")
    text = render_chat(TWO_TURNS, tiny_tokenizer)
    offsets = tiny_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for m in (m for m in TWO_TURNS if m["role"] == "user"):
        start = text.index(f"user\n{m['content']}") + len("user\n")
        inside = [k for k, (a, b) in enumerate(offsets) if start <= a < start + len(m["content"])]
        assert inside and all(t["labels"][k] == -100 for k in inside)


def test_generation_stops_at_a_text_end_of_turn_marker(tiny_tokenizer, marker_tokenizer) -> None:
    assert stop_strings(use_chat_template(copy.deepcopy(tiny_tokenizer), "chatml")) == []  # <|im_end|> is its eos
    assert stop_strings(use_chat_template(copy.deepcopy(marker_tokenizer), "llama3")) == ["<|eot_id|>"]
    assert stop_strings(tiny_tokenizer) == [] and stop_strings(use_chat_template(copy.deepcopy(tiny_tokenizer), "plain")) == []
    assert cut_at_stop("Lima<|eot_id|><|start_header_id|>user", ["<|eot_id|>"]) == "Lima"


def test_eval_generation_renders_and_stops_with_a_named_template(tiny_model_dir, marker_tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    from ftray.eval.generate import generate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(marker_tokenizer))
    tok = use_chat_template(copy.deepcopy(marker_tokenizer), "llama3")
    out = generate(model, tok, [TWO_TURNS[:1]], max_new_tokens=4)  # stop_strings=["<|eot_id|>"] goes to generate
    assert len(out) == 1 and "<|eot_id|>" not in out[0]


def test_a_checkpoint_generates_with_the_template_it_was_trained_with(tiny_model_dir, tmp_path) -> None:
    import shutil

    import yaml

    from ftray.data.templates import ALPACA
    from ftray.eval.loading import load_checkpoint_tokenizer

    ckpt = shutil.copytree(tiny_model_dir, tmp_path / "ckpt")
    assert load_checkpoint_tokenizer(ckpt).chat_template != ALPACA  # no spec: the tokenizer's own
    (ckpt / "ftray_spec.yaml").write_text(yaml.safe_dump({"data": {"chat_template": "alpaca"}}))
    assert load_checkpoint_tokenizer(ckpt).chat_template == ALPACA
