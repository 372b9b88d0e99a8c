"""`ftray merge depth-upscale` (and the issue's `--depth-upscale` spelling) writes the deeper model."""

import json

import torch
import yaml
from typer.testing import CliRunner

from ftray.cli import app
from ftray.merge.depth_upscale import decoder_layers
from tests.merge.helpers import state_of

runner = CliRunner()


def test_merge_depth_upscale_writes_the_passthrough_layout(tiny_model_dir, tmp_path):
    out = tmp_path / "deep"
    result = runner.invoke(app, ["merge", "depth-upscale", str(tiny_model_dir), "--out", str(out), "--block", "0,2", "--zero-copies"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["block"] == [0, 2]
    deep, base = state_of(out), state_of(tiny_model_dir)
    for new, old in enumerate([0, 1, 0, 1]):
        for key in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"):
            assert torch.equal(deep[f"model.layers.{new}.{key}"], base[f"model.layers.{old}.{key}"])
    assert not deep["model.layers.2.self_attn.o_proj.weight"].any() and deep["model.layers.1.self_attn.o_proj.weight"].any()
    record = yaml.safe_load((out / "merge.yaml").read_text())
    assert record["layers"] == {"before": 2, "after": 4} and record["params"]["block"] == [0, 2]


def test_issue_spelling_chooses_the_block_by_cosine(tiny_model_dir, tmp_path):
    out = tmp_path / "deep"
    result = runner.invoke(app, ["merge", "--depth-upscale", str(tiny_model_dir), "--out", str(out), "--n-layers", "1", "--calibration-rows", "4"])
    assert result.exit_code == 0, result.output
    record = yaml.safe_load((out / "merge.yaml").read_text())
    cos = record["layer_cosines"]
    assert len(cos) == 2 and record["params"]["block"] == [cos.index(max(cos)), cos.index(max(cos)) + 1]
    from ftray.merge.run import load_weights

    assert len(decoder_layers(load_weights(str(out))[0])) == 3


def test_refusals_say_what_to_do(tiny_model_dir, tmp_path):
    result = runner.invoke(app, ["merge", "depth-upscale", str(tiny_model_dir), "--out", str(tmp_path / "a"), "--block", "1,5"])
    assert result.exit_code == 2 and "the model has 2 layers" in result.output
    result = runner.invoke(app, ["merge", "depth-upscale", str(tiny_model_dir), "--out", str(tmp_path / "b"), "--block", "1"])
    assert result.exit_code == 2 and "s < e" in result.output
    result = runner.invoke(app, ["merge", "depth-upscale", str(tiny_model_dir), str(tiny_model_dir), "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "exactly one model" in result.output
    result = runner.invoke(app, ["merge", "lines", "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and "BASE CHECKPOINT" in result.output
