"""`ftray bench train-throughput` end to end on the tiny model: every contender measured and reported."""

import json

from ftray.bench.throughput import main

CONTENDERS = {"plain", "hf-trainer", "ftray-1w", "ftray-2w", "ftray-1w-packed", "ftray-2w-packed"}


def test_train_throughput_reports_every_contender(tiny_model_dir, tmp_path, ray_local):
    # threads=2 matches the fixture's 2 Ray CPUs on any machine (ftray-2w: 2 workers × 1 CPU).
    main(steps=2, warmup=1, out_dir=str(tmp_path), model=str(tiny_model_dir), batch_size=4, max_samples=64, threads=2)

    report = json.loads((tmp_path / "train_throughput.json").read_text())
    assert set(report["contenders"]) == CONTENDERS
    for name, row in report["contenders"].items():
        for key in ("tokens_per_s", "vs_plain", "vs_hf_trainer", "mfu", "peak_rss_mb"):
            assert row[key] > 0, (name, key, row)
    assert report["contenders"]["plain"]["vs_plain"] == 1.0
    assert report["flops"]["per_token"] > 0 and report["flops"]["params"]["trainable"] > 0
    assert {t["target"].split()[0] for t in report["targets"]} >= {"ftray-1w", "ftray-2w", "best"}
    md = (tmp_path / "train_throughput.md").read_text()
    assert all(name in md for name in CONTENDERS)
    assert md.count("PASS") + md.count("FAIL") == len(report["targets"])
