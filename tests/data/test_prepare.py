"""The prepare_data pipeline: Ray Data in and out, model inference through actor pools, cache and report."""

from __future__ import annotations

import json

import pytest

from ftray.config import build_spec
from ftray.data import load_rows
from ftray.data.inference import Answerer, ResponseScorer, TextEmbedder, map_model, pool_size, score_rows
from ftray.data.prepare import MANIFEST, REPORT, prepare_training_data
from ftray.methods import Context, Method, MethodConfig
from ftray.models import load_model, load_tokenizer


class KeepLowLoss(Method):
    """A test method (not registered): score every row and keep the lower-loss half."""

    name = "keep_low_loss"
    Config = MethodConfig

    def prepare_data(self, ds, ctx: Context):
        """Score with the run's model on Ray Data, keep the rows under the median loss."""
        scored = map_model(ds, ResponseScorer, ctx).materialize()
        losses = sorted(r["nll"] for r in scored.select_columns(["nll"]).take_all())
        cut = losses[len(losses) // 2]
        ctx.report.update({"median_nll": cut})
        return scored.filter(lambda r: r["nll"] < cut)


def _spec(tmp_path, model_dir, **data):
    return build_spec({"model": {"name": str(model_dir)}, "data": {"source": "bundled:arithmetic", "max_samples": 32, "max_len": 64, **data},
                       "output": {"dir": str(tmp_path)}})


def test_prepare_runs_on_ray_data_writes_manifest_and_report_and_reuses_its_cache(tmp_path, tiny_model_dir, ray_local):
    spec = _spec(tmp_path, tiny_model_dir)
    rows, tok, logs = load_rows("bundled:arithmetic", max_samples=32), load_tokenizer(str(tiny_model_dir)), []
    out, entry = prepare_training_data(spec, [KeepLowLoss(MethodConfig())], rows, tok, log=logs.append)
    assert 0 < len(out) < 32 and {"nll", "ppl", "entropy", "n_tokens"} <= set(out.column_names)
    manifest, report = json.loads((entry / MANIFEST).read_text()), json.loads((entry / REPORT).read_text())
    assert manifest["rows_in"] == 32 and manifest["rows_out"] == len(out) and manifest["methods"][0]["name"] == "keep_low_loss"
    assert report["keep_low_loss"]["rows_out"] == len(out) and "median_nll" in report["keep_low_loss"]
    # the same inputs: the cache, with identical rows; a training-field change keeps the key
    spec2 = _spec(tmp_path, tiny_model_dir)
    spec2.train.lr = 1e-3
    again, entry2 = prepare_training_data(spec2, [KeepLowLoss(MethodConfig())], rows, tok, log=logs.append)
    assert entry2 == entry and "reusing the cache" in logs[-1] and again.to_list() == out.to_list()
    # data.recompute redoes it (same result: scoring is deterministic); other input rows get a new entry
    spec2.data.recompute = True
    redo, entry3 = prepare_training_data(spec2, [KeepLowLoss(MethodConfig())], rows, tok, log=logs.append)
    assert entry3 == entry and "reusing" not in logs[-1] and redo["nll"] == pytest.approx(out["nll"], abs=1e-5)
    _, entry4 = prepare_training_data(spec, [KeepLowLoss(MethodConfig())], rows.select(range(31)), tok, log=logs.append)
    assert entry4 != entry


def test_scores_on_ray_data_equal_the_in_process_scores_in_row_order(tmp_path, tiny_model_dir, ray_local):
    import ray.data

    from ftray.tasks import get_task

    spec = _spec(tmp_path, tiny_model_dir, infer_batch_size=8)
    rows = load_rows("bundled:arithmetic", max_samples=20)
    ctx = Context(spec=spec, tokenizer=None)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    got = map_model(ray.data.from_items(rows.to_list()), ResponseScorer, ctx).take_all()
    assert [r["prompt"] if "prompt" in r else r["question"] for r in got] == [r.get("prompt") or r["question"] for r in rows]
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir)).eval()
    tokenized = get_task(spec).tokenize(rows, tok, "t")
    want = score_rows(model, tokenized, tok.pad_token_id, None)
    assert [r["nll"] for r in got] == pytest.approx(want["nll"], rel=2e-2)  # actors use the loop's autocast (bf16 on CPU)


def test_cpu_inference_pool_is_one_thread_actors_covering_the_clusters_cpus(tmp_path, tiny_model_dir, ray_local):
    import ray

    spec = _spec(tmp_path, tiny_model_dir)
    assert pool_size(spec) == (int(ray.cluster_resources()["CPU"]), 1, 0)
    spec.data.actors, spec.data.actor_threads = 1, 2
    assert pool_size(spec) == (1, 2, 0)


def test_answerer_and_embedder_add_their_columns(tmp_path, tiny_model_dir, ray_local):
    import ray.data

    spec = _spec(tmp_path, tiny_model_dir)
    ctx = Context(spec=spec, tokenizer=None)
    ds = ray.data.from_items(load_rows("bundled:arithmetic", max_samples=4).to_list())
    answered = map_model(ds, Answerer, ctx, num_samples=3, temperature=1.0, max_new_tokens=4).take_all()
    assert all(len(r["answers"]) == 3 and all(isinstance(a, str) for a in r["answers"]) for r in answered)
    again = map_model(ds, Answerer, ctx, num_samples=3, temperature=1.0, max_new_tokens=4).take_all()
    assert [r["answers"] for r in again] == [r["answers"] for r in answered]  # seeded per row
    emb = map_model(ds, TextEmbedder, ctx).take_all()
    assert all(abs(sum(x * x for x in r["embedding"]) - 1) < 1e-4 for r in emb)


def test_bad_input_rows_are_reported_by_number_before_any_model_runs(tmp_path, tiny_model_dir):
    import datasets

    from ftray.data import DataError

    spec = _spec(tmp_path, tiny_model_dir)
    rows = datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}])
    with pytest.raises(DataError, match="row 2"):
        prepare_training_data(spec, [KeepLowLoss(MethodConfig())], rows, None)
