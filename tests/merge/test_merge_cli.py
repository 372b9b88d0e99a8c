"""`ftray soup` and `ftray merge` write loadable checkpoints and fail with the reason, exit code 2."""

import json

import torch
import yaml
from typer.testing import CliRunner

from ftray.cli import app
from tests.conftest import build_tiny_model
from tests.merge.helpers import full_checkpoint, lora_checkpoint, state_of

runner = CliRunner()


def test_soup_and_merge_commands(tiny_model_dir, tmp_path):
    a = str(full_checkpoint(tiny_model_dir, tmp_path / "a", seed=1))
    b = str(lora_checkpoint(tiny_model_dir, tmp_path / "b", seed=2))
    result = runner.invoke(app, ["soup", a, b, "--out", str(tmp_path / "uniform")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ingredients"] == [a, b]

    result = runner.invoke(app, ["soup", a, b, "--out", str(tmp_path / "greedy"), "--greedy", "--max-samples", "8", "--max-len", "192"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["kind"] == "greedy" and out["soup_score"] >= max(out["scores"].values())

    result = runner.invoke(app, ["merge", "lines", str(tiny_model_dir), a, "--out", str(tmp_path / "lines"), "--alpha", "0", "--beta", "0"])
    assert result.exit_code == 0, result.output
    merged, base = state_of(tmp_path / "lines"), state_of(tiny_model_dir)
    assert all(torch.equal(merged[k], base[k]) for k in base)
    assert yaml.safe_load((tmp_path / "lines" / "merge.yaml").read_text())["params"] == {"alpha": 0.0, "beta": 0.0}

    result = runner.invoke(app, ["merge", "task-arithmetic", str(tiny_model_dir), a, b, "--out", str(tmp_path / "ta"), "--scale", "0.5"])
    assert result.exit_code == 0, result.output


def test_commands_explain_refusals(tiny_model_dir, tmp_path):
    other = build_tiny_model(tmp_path / "other")
    a = str(full_checkpoint(tiny_model_dir, tmp_path / "a", seed=1))
    b = str(full_checkpoint(other, tmp_path / "b", seed=2))
    result = runner.invoke(app, ["soup", a, b, "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "fine-tuned from different base models" in result.output
    result = runner.invoke(app, ["merge", "lines", str(tiny_model_dir), a, "--out", str(tmp_path / "m"), "--scale", "2"])
    assert result.exit_code == 2 and "lines:" in result.output and "(its parameters: alpha, beta)" in result.output
