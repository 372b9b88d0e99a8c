"""Sparse-diff composition: apply/revert are exact inverses, composition is commutative, `ftray merge sparse-diff` works."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from ftray.cli import app
from ftray.merge import MergeError, merge_checkpoints
from ftray.merge.checkpoints import resolve
from ftray.merge.sparse_diff import DIFF_FILE, apply_diff, extract_diff, load_diff, revert_diff, save_diff
from tests.conftest import build_tiny_model
from tests.merge.helpers import record_spec, state_of


def sparse_checkpoint(base, out, seed: int, share: float = 0.02):
    """A `base` copy with a random `share` of every tensor's entries moved (what LT-SFT leaves), plus its φ file."""
    g = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            hit = torch.rand(p.shape, generator=g) < share
            p.add_(hit * 0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    record_spec(out, base, ["lt_sft"])
    diff = extract_diff(dict(model.named_parameters()), reference)
    save_diff(diff, out / DIFF_FILE, {"base_model": resolve(str(base))})
    return out, diff


@pytest.fixture(scope="module")
def ckpts(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("sparse")
    return {name: sparse_checkpoint(tiny_model_dir, d / name, seed) for name, seed in (("a", 1), ("b", 2), ("c", 3))}


def test_apply_then_revert_is_exact(ckpts, tiny_model_dir):
    path, diff = ckpts["a"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    theta0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    applied = {n: p.detach().clone() for n, p in apply_diff(base, diff).named_parameters()}
    assert all(torch.equal(applied[n], t) for n, t in state_of(path).items() if n in applied)  # θ⁰ + φ = θ exactly
    revert_diff(base, diff)
    assert all(torch.equal(p, theta0[n]) for n, p in base.named_parameters())  # and θ − φ = θ⁰ exactly


def test_composition_is_commutative_and_adds_the_differences(ckpts, tiny_model_dir, tmp_path):
    (a, da), (b, db), (c, dc) = ckpts["a"], ckpts["b"], ckpts["c"]
    overlap = sum(len(set(da.indices[n].tolist()) & set(db.indices[n].tolist())) for n in da.indices if n in db.indices)
    assert overlap > 0  # the test covers entries both differences change
    ab = merge_checkpoints("sparse-diff", [str(a / DIFF_FILE), str(b)], tmp_path / "ab", base=str(tiny_model_dir))
    ba = merge_checkpoints("sparse-diff", [str(b), str(a / DIFF_FILE)], tmp_path / "ba", base=str(tiny_model_dir))
    sab, sba, base = state_of(ab), state_of(ba), state_of(tiny_model_dir)
    assert all(torch.equal(sab[k], sba[k]) for k in base)  # bit-identical in either order
    for name, t in base.items():
        phi = torch.zeros(t.numel(), dtype=torch.float64)  # θ⁰ + (φ_a + φ_b); overlapping entries add
        for d in (da, db):
            if name in d.indices:
                phi.index_add_(0, d.indices[name], d.values[name])
        assert torch.equal(sab[name].flatten(), (t.double().flatten() + phi).to(t.dtype)), name
    orders = [[a, b, c], [c, a, b], [b, c, a]]
    states = [state_of(merge_checkpoints("sparse_diff", [str(p) for p in o], tmp_path / f"o{i}", base=str(tiny_model_dir))) for i, o in enumerate(orders)]
    assert all(torch.equal(s[k], states[0][k]) for s in states[1:] for k in base)
    record = yaml.safe_load((ab / "merge.yaml").read_text())
    assert record["method"] == "sparse_diff" and record["nnz"] == [da.nnz(), db.nnz()]


def test_full_checkpoint_without_phi_gives_the_same_difference(ckpts, tiny_model_dir, tmp_path):
    a, da = ckpts["a"]
    plain = tmp_path / "plain"
    AutoModelForCausalLM.from_pretrained(a).save_pretrained(plain)
    AutoTokenizer.from_pretrained(a).save_pretrained(plain)
    record_spec(plain, tiny_model_dir, ["lt_sft"])
    out = merge_checkpoints("sparse_diff", [str(plain)], tmp_path / "out", base=str(tiny_model_dir))
    merged, tuned = state_of(out), state_of(a)
    assert all(torch.equal(merged[k], tuned[k]) for k in tuned)


def test_merge_command_and_refusals(ckpts, tiny_model_dir, tmp_path):
    runner = CliRunner()
    (a, _), (b, _) = ckpts["a"], ckpts["b"]
    result = runner.invoke(app, ["merge", "sparse-diff", str(tiny_model_dir), str(a / DIFF_FILE), str(b / DIFF_FILE), "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["method"] == "sparse-diff"
    AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # a normal checkpoint, loadable without ftray

    other = build_tiny_model(tmp_path / "other")
    result = runner.invoke(app, ["merge", "sparse-diff", str(other), str(a / DIFF_FILE), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "is a difference from" in result.output
    with pytest.raises(MergeError, match="needs the base"):
        merge_checkpoints("sparse_diff", [str(a)], tmp_path / "y")
    with pytest.raises(MergeError, match="its parameters: threshold"):
        merge_checkpoints("sparse_diff", [str(a)], tmp_path / "z", base=str(tiny_model_dir), scale=2.0)
    diff, _ = load_diff(a / DIFF_FILE)
    diff.shapes[next(iter(diff.shapes))] = [1, 2, 3]
    save_diff(diff, tmp_path / "bad.safetensors")
    with pytest.raises(MergeError, match="shape"):
        merge_checkpoints("sparse_diff", [str(tmp_path / "bad.safetensors")], tmp_path / "w", base=str(tiny_model_dir))
