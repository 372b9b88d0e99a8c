"""`ftray bench data-throughput` on the tiny model: both contenders score every row, identically."""

from ftray.bench.data_throughput import main


def test_ray_data_and_the_plain_loop_give_identical_scores_and_a_report(tiny_model_dir, tmp_path, ray_local):
    report = main(rows=48, tokens=48, batch_size=8, out_dir=str(tmp_path), model=str(tiny_model_dir), scaling_rows=16)
    assert report["identical_scores"], report["max_abs_nll_diff"]
    assert {c["contender"].split(" (")[0] for c in report["contenders"]} == {"plain loop", "Ray Data"}
    assert [c["actors"] for c in report["scaling"]["runs"]] == [1, 2]
    assert all(c["ms_per_row"] >= 0 and c["startup_s"] >= 0 for c in report["contenders"])
    assert (tmp_path / "data_throughput.md").read_text().startswith("# ftray bench data-throughput")
