"""`ftray tune` end to end on a real local Ray: 4 trials of the tiny model, ASHA, reports, soup, resume."""

import csv
import json

import pytest
import ray
import yaml
from typer.testing import CliRunner

from ftray.cli import app
from ftray.config import SpecError, load_spec
from ftray.tune.run import tune_recipe
from ftray.tune.sweep import plan_sweep

runner = CliRunner()

SPACE = {
    "metric": "eval_loss",
    "mode": "min",
    "num_samples": 1,
    "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2},
    # two useful learning rates first (they run together), then two that cannot learn in 2 steps
    "space": {"train.lr": {"grid": [3.0e-3, 2.0e-3, 1.0e-6, 1.0e-7]}, "method.r": {"choice": [2, 4]}},
}


def write_inputs(tmp_path, model_dir, space=SPACE):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": str(model_dir)},
        "data": {"source": "bundled:arithmetic", "max_len": 192, "max_samples": 64, "eval_max_samples": 16},
        "methods": [{"name": "lora", "r": 4, "target_modules": "all-linear"}],
        "train": {"max_steps": 6, "lr": 2e-3, "batch_size": 4, "log_every": 1, "warmup_ratio": 0.0},
        "output": {"dir": str(tmp_path / "sweeps"), "name": "tiny"},
    }))
    space_file = tmp_path / "lora.yaml"  # the file stem names the method that `method.` refers to
    space_file.write_text(yaml.safe_dump(space))
    return str(recipe), str(space_file)


def test_a_space_naming_a_missing_field_fails_before_any_ray_work(tiny_model_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append("ray.init"))
    monkeypatch.setattr("ftray.tune.sweep.prepare_rows", lambda *a, **k: calls.append("prepare_rows"))
    recipe, space = write_inputs(tmp_path, tiny_model_dir, {**SPACE, "space": {"train.lrr": {"choice": [1e-3]}}})
    result = runner.invoke(app, ["tune", recipe, "--space", space])
    assert result.exit_code == 2
    assert "tune space: 'train.lrr' is not a field of the run spec" in result.output
    _, space = write_inputs(tmp_path, tiny_model_dir, {**SPACE, "space": {"method.rank": {"choice": [4]}}})
    result = runner.invoke(app, ["tune", recipe, "--space", space])
    assert result.exit_code == 2 and "'methods.0.rank' is not a field of the run spec" in result.output
    assert calls == []


def test_sweep_plan_refuses_what_trials_cannot_share(tiny_model_dir, tmp_path):
    recipe, _ = write_inputs(tmp_path, tiny_model_dir)
    _, space = write_inputs(tmp_path, tiny_model_dir, {**SPACE, "space": {"data.max_len": {"choice": [64, 128]}}})
    with pytest.raises(SpecError, match="data.max_len.*tokenized once"):
        plan_sweep(recipe, space)
    with pytest.raises(SpecError, match="checkpoint_every=3 must be a multiple of train.eval_every=2"):
        plan_sweep(recipe, write_inputs(tmp_path, tiny_model_dir)[1], ["train.checkpoint_every=3"])
    plan = plan_sweep(recipe, write_inputs(tmp_path, tiny_model_dir)[1])
    assert (plan.spec.train.eval_every, plan.spec.train.checkpoint_every) == (2, 2)  # ASHA's grace period
    assert set(plan.params) == {"train.lr", "methods.0.r"}


def test_four_trial_sweep_with_asha_reports_and_greedy_soup(ray_local, tiny_model_dir, tmp_path):
    recipe, space = write_inputs(tmp_path, tiny_model_dir)
    result = runner.invoke(app, ["tune", recipe, "--space", space, "--soup", "greedy"])
    assert result.exit_code == 0, result.output
    summary, _ = json.JSONDecoder().raw_decode(result.stdout, result.stdout.index("{\n"))  # Ray's log lines may follow
    exp = tmp_path / "sweeps" / "tiny"
    assert summary["experiment"] == str(exp) and summary["trials"] == 4

    rows = list(csv.DictReader(open(exp / "results.csv")))
    assert len(rows) == 4 and {float(r["train.lr"]) for r in rows} == {3e-3, 2e-3, 1e-6, 1e-7}
    status = {float(r["train.lr"]): r["status"] for r in rows}
    assert status[1e-6] == status[1e-7] == "stopped early"  # ASHA: worse than the rung's cutoff at step 2
    assert "completed" in (status[3e-3], status[2e-3])
    for r in rows:
        assert int(r["steps"]) >= 2 and float(r["best"]) > 0 and (exp / "runs").exists()
        assert r["checkpoint"].startswith(str(exp / "runs")) and (tmp_path / r["checkpoint"]).is_dir()
    first, second = sorted(rows, key=lambda r: float(r["start"]))[:2]
    assert float(second["start"]) < float(first["end"])  # 2 CPUs, 1-CPU trials: two run at once

    best = min(rows, key=lambda r: float(r["best"]))
    assert rows[0]["trial"] == best["trial"]  # best first
    config = load_spec(exp / "best_config.yaml")
    assert config.train.lr == float(best["train.lr"]) and config.methods[0]["r"] == int(best["methods.0.r"])
    assert (exp / "metric.png").stat().st_size > 0
    assert "## Timeline" in (exp / "results.md").read_text()

    soup = json.loads((exp / "soup.json").read_text())
    assert soup["soup"]["select"] >= soup["best_single"]["select"]  # greedy: never below its best ingredient
    assert (exp / "soup_greedy" / "model.safetensors").exists() and "## Soup vs single trials" in (exp / "results.md").read_text()

    # Tuner.restore of the finished sweep: nothing reruns, the reports come back the same
    again = tune_recipe(recipe, space, resume=True)
    assert again["best"] == summary["best"] and again["trials"] == 4
    with pytest.raises(SpecError, match="already holds a sweep"):
        tune_recipe(recipe, space)
    with pytest.raises(SpecError, match="no sweep to resume"):
        tune_recipe(recipe, space, ["output.name=other"], resume=True)
