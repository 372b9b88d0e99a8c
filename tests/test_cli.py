"""The CLI: bad recipes, bad data rows and unknown methods fail with clear messages before Ray starts."""

import json
import subprocess
import sys

import yaml
from typer.testing import CliRunner

from ftray.cli import app

runner = CliRunner()


def train(*args):
    """`ftray train ... --no-eval` in a fresh process (this one may already hold the session's Ray)."""
    result = subprocess.run([sys.executable, "-m", "ftray.cli", "train", *args, "--no-eval"], capture_output=True, text=True)
    result.exit_code, result.output = result.returncode, result.stdout + result.stderr
    assert "Ray instance" not in result.output, "the error must come before any Ray work"
    return result


def test_bad_recipe_names_the_field(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({"train": {"lr": -1, "epochs": 0}, "scaling": {"num_workers": 0}}))
    result = train(str(recipe))
    assert result.exit_code == 2
    for expected in ("train.lr: Input should be greater than 0", "train.epochs", "scaling.num_workers"):
        assert expected in result.output


def test_unknown_method_lists_known_ones():
    result = train("quickstart", "--set", "methods.1.name=masked_thoughts")
    assert result.exit_code == 2
    assert "methods.1.name: unknown method 'masked_thoughts'; known: car, cofitune, corda, core_tuning" in result.output


def test_bad_data_row_reports_file_and_row(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    rows = [{"question": f"q{i}", "rationale": "r", "answer": "1"} for i in range(4)]
    rows[2] = {"question": "q2", "rationale": "r"}
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = train("quickstart", "--set", f"model.name={tiny_model_dir}", "--set", f"data.source={data}")
    assert result.exit_code == 2
    assert f"{data} row 3" in result.output and "answer" in result.output


def test_methods_lists_papers_hooks_and_defaults():
    result = runner.invoke(app, ["methods", "--json"])
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["masked_thought"]["hooks"] == ["corrupt_batch"]
    assert rows["masked_thought"]["config"]["p"]["default"] == 0.4
    assert "2404.18466" in rows["hft"]["paper"]
    assert rows["lora"]["hooks"] == ["prepare_model"]
    assert rows["car"]["tasks"] == ["classification"] and "retrieval" in rows["lora"]["tasks"]


def test_eval_and_soup_of_a_missing_checkpoint_fail_with_a_one_line_error(tmp_path):
    for args in (["eval", str(tmp_path / "nope")], ["soup", str(tmp_path / "a"), str(tmp_path / "b"), "--greedy", "--out", str(tmp_path / "s")]):
        result = runner.invoke(app, args)
        assert result.exit_code != 0 and "does not exist" in result.output and "Traceback" not in result.output
