"""Shared fixtures: a tiny ChatML tokenizer trained on the bundled data and a tiny random Llama saved with it.

Both are built locally in about a second (no downloads):
- `tiny_tokenizer`: byte-level BPE, vocab ~1000, ChatML template, eos `<|im_end|>`, pad `<|pad|>`.
- `tiny_model_dir`: a directory with that tokenizer and a random 2-layer LlamaForCausalLM
  (`build_tiny_model`), loadable with AutoTokenizer / AutoModelForCausalLM.from_pretrained.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ftray.data import bundled

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]


def _bundled_texts() -> list[str]:
    texts = ["system", "user", "assistant", "Classify the topic:", "Options:", "The answer is"]
    for name in ("arithmetic", "classification", "factual_edits", "factual_qa"):  # fixed: new sets must not change the tokenizer
        with open(bundled.path(name, "train"), encoding="utf-8") as f:
            for line in f:
                texts += [v for v in json.loads(line).values() if isinstance(v, str)]
    return texts


def build_tiny_tokenizer(vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the bundled train files, with a ChatML chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_bundled_texts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(path: Path) -> Path:
    """Save the tiny tokenizer and a seeded random 2-layer Llama (hidden 64, 4 heads, 2 kv heads) to `path`."""
    path = Path(path)
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny ChatML tokenizer (shared by the whole session: do not mutate it)."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the tiny tokenizer and a random 2-layer Llama."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole session (2 CPUs, as on CI: two 1-CPU training workers)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=True)  # the state API (kill test) needs it
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny LLaVA (2-layer CLIP tower, 2-layer Llama) saved with its processor (tests/tasks/vlm_helpers.py)."""
    from tests.tasks.vlm_helpers import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="session")
def tiny_idefics3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Idefics3 of the same size, saved with its processor."""
    from tests.tasks.vlm_helpers import build_tiny_idefics3

    return build_tiny_idefics3(tmp_path_factory.mktemp("tiny_idefics3"))
