"""`ftray bench fusion-overhead` end to end on the tiny model: every path is timed, the files are written."""

import json

from ftray.bench.fusion import main


def test_fusion_overhead_times_members_and_both_ensembles(ray_local, tiny_model_dir, tmp_path):
    report = main(tokens=3, out_dir=str(tmp_path), model=str(tiny_model_dir))
    rows = json.loads((tmp_path / "fusion_overhead.json").read_text())["rows"]
    assert set(rows) == set(report["rows"]) and {"fusion: static", "fusion: dynamic", "member: large (actor)"} <= set(rows)
    assert all(r["p50_ms"] > 0 for r in rows.values()) and rows["fusion: dynamic"]["vs_sum"] > 0
    assert "| fusion: dynamic |" in (tmp_path / "fusion_overhead.md").read_text()
