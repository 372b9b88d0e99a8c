"""Merges refuse what cannot be merged, with the reason, before loading any weights."""

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ftray.merge import MergeError, merge_checkpoints
from tests.conftest import build_tiny_model
from tests.merge.helpers import full_checkpoint, lora_checkpoint


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """Same architecture as the tiny model, but another base model (its own directory)."""
    return build_tiny_model(tmp_path_factory.mktemp("other_base"))


@pytest.fixture(scope="module")
def deeper_base(tiny_model_dir, tmp_path_factory):
    """A 3-block variant of the tiny model."""
    d = tmp_path_factory.mktemp("deeper")
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers = 3
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(d)
    return d


def test_soup_of_different_bases_is_refused(tiny_model_dir, other_base, tmp_path):
    a = full_checkpoint(tiny_model_dir, tmp_path / "a", seed=1)
    b = lora_checkpoint(other_base, tmp_path / "b", seed=2)
    with pytest.raises(MergeError, match="fine-tuned from different base models"):
        merge_checkpoints("uniform", [str(a), str(b)], tmp_path / "soup")
    assert not (tmp_path / "soup").exists()


def test_task_vectors_against_another_base_are_refused(tiny_model_dir, other_base, tmp_path):
    a = lora_checkpoint(tiny_model_dir, tmp_path / "a", seed=1)
    with pytest.raises(MergeError, match=r"was fine-tuned from .*, not from the base"):
        merge_checkpoints("lines", [str(a)], tmp_path / "m", base=str(other_base))


def test_different_architectures_are_refused(tiny_model_dir, deeper_base, tmp_path):
    a = full_checkpoint(tiny_model_dir, tmp_path / "a", seed=1)
    with pytest.raises(MergeError, match=r"a and .*deeper.* have different architectures \(num_hidden_layers: 2 vs 3\)"):
        merge_checkpoints("task_arithmetic", [str(a)], tmp_path / "m", base=str(deeper_base))


def test_bad_method_parameters_and_outputs_are_refused(tiny_model_dir, tmp_path):
    a = full_checkpoint(tiny_model_dir, tmp_path / "a", seed=1)
    with pytest.raises(MergeError, match="unknown merge method 'ties'"):
        merge_checkpoints("ties", [str(a)], tmp_path / "m", base=str(tiny_model_dir))
    with pytest.raises(MergeError, match=r"task_arithmetic: .*alpha.*\(its parameters: scale\)"):
        merge_checkpoints("task_arithmetic", [str(a)], tmp_path / "m", base=str(tiny_model_dir), alpha=0.3)
    with pytest.raises(MergeError, match="needs the base model"):
        merge_checkpoints("lines", [str(a)], tmp_path / "m")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(MergeError, match="not an earlier merge's output"):
        merge_checkpoints("uniform", [str(a)], tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
