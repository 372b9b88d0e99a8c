"""`ftray bench methods` end to end on the tiny model: every method gets a row, the files are written."""

import json

from ftray.bench.methods import main


def test_bench_methods_writes_a_row_per_method(ray_local, tiny_model_dir, tmp_path):
    report = main(["masked_thought"], steps=2, out_dir=str(tmp_path), model=str(tiny_model_dir), eval_n=4, workers=1)
    assert [r["method"] for r in report["rows"]] == ["full", "masked_thought"]
    saved = json.loads((tmp_path / "methods.json").read_text())
    for row in saved["rows"]:
        assert 0 <= row["arith_em"] <= 1 and row["arith_ppl"] > 1 and row["trainable"] > 0 and row["peak_rss_mb_rank0"] > 0
    assert "| masked_thought |" in (tmp_path / "methods.md").read_text()
    assert (tmp_path / "methods.png").stat().st_size > 0


def test_a_classification_method_is_paired_with_the_same_run_without_it(ray_local, tiny_model_dir, tmp_path):
    report = main(["noise_robust"], steps=2, out_dir=str(tmp_path), model=str(tiny_model_dir), eval_n=4, workers=1)
    runs = {r["run"]: r for r in report["rows"]}
    row = next(r for r in report["rows"] if r["method"] == "noise_robust")
    base = runs[row["baseline_run"]]
    assert base["method"] == "full" and base["task"] == row["task"] == "classification"
    assert base["spec"]["data"] == row["spec"]["data"] and base["spec"]["methods"] == [{"name": "full"}]
    assert 0 <= row["accuracy"] <= 1 and row["forwards_per_batch"] == 1 and row["s_per_step"] is None or row["s_per_step"] > 0
    assert "## classification" in (tmp_path / "methods.md").read_text()
