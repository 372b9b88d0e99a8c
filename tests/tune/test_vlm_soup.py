"""POINTS' model soup over VLM checkpoints: `ftray soup --greedy` scores image rows with the checkpoints'
processor, never falls below its best ingredient, rejects a bad one, and writes a soup that loads as a VLM."""

import json
import shutil

import torch
import yaml
from typer.testing import CliRunner

from ftray.cli import app
from ftray.eval.loading import load_checkpoint
from ftray.models import load_model, load_processor
from ftray.tune.heldout import VLMHeldOut, held_out_for


def _ingredient(src, dst, noise, seed):
    """A copy of the tiny LLaVA with seeded Gaussian noise on every weight, marked as a vision_language run."""
    shutil.copytree(src, dst)
    model = load_model(str(dst), task="vision_language")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p += noise * torch.randn(p.shape, generator=g)
    model.save_pretrained(dst)
    (dst / "ftray_spec.yaml").write_text(yaml.safe_dump({"model": {"name": str(src)}, "task": {"type": "vision_language"}}))
    return str(dst)


def test_greedy_vlm_soup_keeps_the_good_ingredients_and_loads_as_a_vlm(tiny_llava_dir, tmp_path):
    good = [_ingredient(tiny_llava_dir, tmp_path / f"good{i}", 0.01, i) for i in range(2)]
    bad = _ingredient(tiny_llava_dir, tmp_path / "bad", 1.0, 9)
    held = held_out_for(good[0], "bundled:shapes_vqa", "test", 8, "loss", 128)
    assert isinstance(held, VLMHeldOut)
    result = CliRunner().invoke(app, ["soup", *good, bad, "--out", str(tmp_path / "soup"), "--greedy", "--source", "bundled:shapes_vqa",
                                      "--split", "test", "--max-samples", "8", "--max-len", "128"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert bad not in summary["ingredients"] and summary["soup_score"] >= max(summary["scores"].values())
    model, _ = load_checkpoint(tmp_path / "soup")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert held.score(model) == summary["soup_score"] or abs(held.score(model) - summary["soup_score"]) < 1e-5
    load_processor(str(tmp_path / "soup"))
