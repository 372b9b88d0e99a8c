"""Shared fixtures: a tiny ChatML tokenizer trained on the bundled data and a tiny random Llama saved with it.

Both are built locally in about a second (no downloads):
- `tiny_tokenizer`: byte-level BPE, vocab ~1000, ChatML template, eos `<|im_end|>`, pad `<|pad|>`.
- `tiny_model_dir`: a directory with that tokenizer and a random 2-layer LlamaForCausalLM
  (`build_tiny_model`), loadable with AutoTokenizer / AutoModelForCausalLM.from_pretrained.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from ftray.tiny_models import CHATML_TEMPLATE, SPECIAL_TOKENS, build_tiny_model, build_tiny_tokenizer  # noqa: F401  (tests import them from here)

# Ray Train's controller polls its workers every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S). A tiny test run
# trains in about a second, so most of its wall time went to waiting for polls: 0.25 s took a tiny run's
# fit from ~21 s to ~15 s here. Set before any Ray starts, so every Ray process of the session inherits it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


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
    from ftray.tiny_models import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="session")
def tiny_idefics3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Idefics3 of the same size, saved with its processor."""
    from ftray.tiny_models import build_tiny_idefics3

    return build_tiny_idefics3(tmp_path_factory.mktemp("tiny_idefics3"))
