"""`ftray eval --shifts` (SURE-VQA protocol): IID vs shifted images vs no image, ratios, and the rule-based judge.

The checkpoint is the tiny random LLaVA overfitted on 8 one-shape scenes whose answer is the shape's
colour, so its IID exact match is 1 and its no-image score is bounded by a constant guess (2 of 8).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ftray.cli import app
from ftray.config import build_spec
from ftray.data.bundled.shapes_vqa import COLOURS, draw
from ftray.eval.shifts import evaluate_shifts, judge, judge_rule, parse_shifts, shifts_table
from ftray.tasks import get_task
from tests.tasks.vlm_helpers import overfit

runner = CliRunner()


def write_colour_rows(out: Path) -> Path:
    """8 scenes (4 colours x circle/square) as PNGs and a jsonl with relative image paths."""
    rng = random.Random(0)
    (out / "images").mkdir(parents=True)
    lines = []
    for colour in COLOURS:
        for kind in ("circle", "square"):
            name = f"images/{colour}_{kind}.png"
            draw([{"kind": kind, "colour": colour, "cell": 4, "box": [28, 28, 68, 68]}], rng).save(out / name)
            lines.append(json.dumps({"images": [name], "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": colour}]}]}))
    (out / "colours.jsonl").write_text("\n".join(lines) + "\n")
    return out / "colours.jsonl"


@pytest.fixture(scope="module")
def colour_checkpoint(tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full vision_language checkpoint (weights, processor, ftray_spec.yaml) that answers the colour rows."""
    root = tmp_path_factory.mktemp("shifts")
    data = write_colour_rows(root / "data")
    raw = {"model": {"name": str(tiny_llava_dir)}, "task": {"type": "vision_language"},
           "data": {"source": str(data), "max_len": 128}}
    task = get_task(build_spec(raw))
    import datasets

    rows = task.tokenize(datasets.load_dataset("json", data_files=str(data), split="train"), None, "colours")
    batch = task.collate(rows, task.processor.tokenizer.pad_token_id)
    model, _ = overfit(task, batch)
    final = root / "run" / "final"
    model.save_pretrained(final)
    task.processor.save_pretrained(final)
    (final / "ftray_spec.yaml").write_text(yaml.safe_dump(raw))
    return final


def test_report_has_iid_each_shift_ratio_and_no_image(colour_checkpoint):
    report = evaluate_shifts(str(colour_checkpoint), ["contrast", "occlusion"], severities=[1, 3])
    by = {c["condition"]: c for c in report["conditions"]}
    assert list(by) == ["iid", "contrast@1", "contrast@3", "occlusion@1", "occlusion@3", "no_image"]
    assert report["source"].endswith("colours.jsonl")  # the checkpoint's own data by default
    iid = by["iid"]
    assert iid["n"] == 8 and iid["exact_match"] == 1.0 and iid["judge"] == 1.0
    assert iid["ratio_exact_match"] == 1.0
    for name, c in by.items():
        assert c["n"] == 8 and 0 <= c["exact_match"] <= c["judge"] <= 1
        assert c["ratio_exact_match"] == pytest.approx(c["exact_match"] / iid["exact_match"])
        assert c["ratio_judge"] == pytest.approx(c["judge"] / iid["judge"])
    # without the image every prompt is the same, so greedy decoding gives one answer: at most 2 of 8 right
    assert by["no_image"]["exact_match"] <= 0.25
    assert by["contrast@3"]["shift"] == "contrast" and by["contrast@3"]["severity"] == 3
    table = shifts_table(report)
    assert table.count("\n| ") == 2 + 6  # header, separator, one row per condition
    assert "| iid | 8 | 1.000 | 1.000 | 1.000 | 1.000 |" in table


def test_cli_runs_on_ray_and_writes_json_and_markdown(ray_local, colour_checkpoint, tmp_path):
    result = runner.invoke(app, ["eval", str(colour_checkpoint), "--shifts", "blur", "--max-samples", "4",
                                 "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "rep" / "shifts.json").read_text())
    assert [c["condition"] for c in saved["conditions"]] == ["iid", "blur@2", "no_image"]
    assert saved["conditions"][0]["n"] == 4
    assert "| blur@2 | 4 |" in (tmp_path / "rep" / "shifts.md").read_text()


def test_text_only_checkpoint_is_a_clear_error(tiny_model_dir):
    result = runner.invoke(app, ["eval", str(tiny_model_dir), "--shifts", "blur"])
    assert result.exit_code == 2
    assert "needs a vision_language checkpoint" in result.output and "causal_lm" in result.output


def test_unknown_shift_is_refused():
    with pytest.raises(ValueError, match="choose from blur, noise, contrast, rotation, occlusion"):
        parse_shifts("blur,fog")
    assert parse_shifts("all") == ["blur", "noise", "contrast", "rotation", "occlusion"]


@pytest.mark.parametrize("reply, reference, rule", [
    ("red", "red", "equal"),
    ("Red.", "red", "equal"),                                   # case and end punctuation
    ("The answer: top-left", "top left", "contains"),           # hyphenated words, whole-word containment
    ("It is a red circle", "red", "contains"),
    ("reddish", "red", "wrong"),                                # whole words only
    ("There are three shapes.", "3", "contains"),               # number words become digits
    ("twenty-one", "21", "equal"),
    ("3.0", "3", "equal"),
    ("2 or 3", "3", "wrong_number"),                            # a numeric answer must be the only number
    ("3 red and 1 blue", "3", "wrong_number"),
    ("the circle", "circle", "equal"),                          # articles are dropped
    ("\\frac { x + 2 } { 3 }", "\\frac { x + 2 } { 3 }", "equal"),  # LaTeX keeps brackets and operators
    ("x - 2", "x + 2", "wrong"),
])
def test_judge_rules(reply, reference, rule):
    assert judge_rule(reply, reference) == rule
    assert judge(reply, reference) == (rule in ("equal", "contains"))
