"""Classification as a task type: rows → batches → CE on a sequence-classification head, through Ray Train, and its metrics."""

from __future__ import annotations

import pytest
import torch

from ftray.config import SpecError, build_spec
from ftray.data import DataError, load_rows
from ftray.eval import evaluate
from ftray.tasks import get_task
from ftray.tasks.classification import metrics
from tests.train.helpers import train_tiny


def test_metrics_by_hand():
    # 3 classes; class 2 is the tail (5 training rows), class 0 the head (500), class 1 medium (50)
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8], [0.7, 0.2, 0.1]])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    m = metrics(probs, labels, train_counts=[500, 50, 5], bins=10)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class_accuracy"] == [1.0, 0.5, 0.5] and m["worst_class_accuracy"] == 0.5
    assert (m["head_accuracy"], m["medium_accuracy"], m["tail_accuracy"]) == (1.0, 0.5, 0.5)
    # F1: class 0 p=2/4 r=1 → 2/3; class 1 p=1 r=.5 → 2/3; class 2 p=1 r=.5 → 2/3
    assert m["macro_f1"] == pytest.approx(2 / 3)
    # ECE with 10 bins: confidences .9,.6,.7,.5,.8,.7 → |.9-1|/6 + |.6-1|/6 + |.7-.5|·2/6 + |.5-0|/6 + |.8-1|/6
    assert m["ece"] == pytest.approx((0.1 + 0.4 + 0.4 + 0.5 + 0.2) / 6)


def test_bad_rows_are_named(tiny_model_dir, tiny_tokenizer):
    import datasets

    spec = build_spec({"model": {"name": str(tiny_model_dir)}, "task": {"type": "classification", "num_labels": 4}})
    ds = datasets.Dataset.from_list([{"text": "fine", "label": 1}, {"text": "bad", "label": 7}])
    with pytest.raises(DataError, match=r"row 2.*label"):
        get_task(spec).tokenize(ds, tiny_tokenizer, "mine")


def test_methods_declare_their_tasks_and_packing_is_refused():
    with pytest.raises(SpecError, match="masked_thought.*causal_lm"):
        build_spec({"task": {"type": "classification"}, "methods": ["masked_thought"]})
    with pytest.raises(SpecError, match="packing"):
        build_spec({"task": {"type": "classification"}, "data": {"packing": True}})


def test_long_tailed_and_noisy_bundled_sets():
    lt = load_rows("bundled:classification_lt", "train")["label"]
    counts = [lt.count(k) for k in range(4)]
    assert counts[0] / counts[3] >= 100 - 25 and counts == sorted(counts, reverse=True)  # imbalance 100 (rounded tail)
    for name, rate in (("sym20", 0.2), ("asym40", 0.4)):
        rows = load_rows(f"bundled:classification_{name}", "train").to_list()
        assert sum(r["label"] != r["clean_label"] for r in rows) == round(rate * len(rows))
    asym = load_rows("bundled:classification_asym20", "train").to_list()
    assert all(r["label"] == (r["clean_label"] + 1) % 4 for r in asym if r["label"] != r["clean_label"])
    assert load_rows("bundled:classification_sym40", "test").to_list() == load_rows("bundled:classification", "test").to_list()


def test_trains_on_ray_and_eval_reports_classification_metrics(ray_local, tiny_model_dir, tmp_path):
    result = train_tiny(
        tiny_model_dir, tmp_path, "cls",
        task={"type": "classification"},
        data={"source": "bundled:classification_lt", "max_len": 64, "max_samples": None, "eval_max_samples": 40},
        methods=["full"], train={"max_steps": 6, "lr": 1e-3},
    )
    assert result.final_dir and (result.final_dir / "config.json").exists()
    assert "ForSequenceClassification" in (result.final_dir / "config.json").read_text()
    m = evaluate(str(result.final_dir), max_samples=40)
    assert m["task"] == "classification" and m["source"] == "bundled:classification_lt" and m["n"] == 40
    assert {"accuracy", "macro_f1", "worst_class_accuracy", "head_accuracy", "tail_accuracy", "ece"} <= set(m)
    assert len(m["per_class_accuracy"]) == 4  # num_labels came from the data
