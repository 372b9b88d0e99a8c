"""GOT-D: with the target equal to a pool subset it selects that subset first; on a 99%/1% pool with a 50/50
target it selects the whole under-represented cluster first (nearest-to-target rows do not); the
calibrated gradient's ranking ignores a constant shift and its signs agree with finite differences."""

import json

import numpy as np
import ot
import pytest

from ftray.config import build_spec
from ftray.data import load_rows
from ftray.methods import build_methods
from ftray.methods.got_d import calibrated_gradient, ot_gradients, select_lowest
from tests.methods.helpers import prepare


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("relative,dense_max", [(True, 10**9), (False, 10**9), (True, 1)])  # dense_max=1: blockwise costs
def test_target_equal_to_a_pool_subset_is_selected_first(relative, dense_max):
    rng = np.random.default_rng(0)
    pool = unit(rng.normal(size=(200, 16)))
    subset = rng.choice(200, 25, replace=False)
    grad, _ = ot_gradients(pool[subset], pool, relative_epsilon=relative, dense_max_entries=dense_max)
    assert set(select_lowest(grad, 25).tolist()) == set(subset.tolist())


def test_selects_the_under_represented_target_cluster_not_the_nearest_rows():
    rng = np.random.default_rng(1)
    ca, cb = rng.normal(size=16), rng.normal(size=16)
    pool = unit(np.vstack([ca + 0.15 * rng.normal(size=(990, 16)), cb + 0.15 * rng.normal(size=(10, 16))]))
    target = unit(np.vstack([ca + 0.15 * rng.normal(size=(50, 16)), cb + 0.15 * rng.normal(size=(50, 16))]))
    is_b = np.arange(1000) >= 990
    grad, _ = ot_gradients(target, pool)
    nearest = np.argsort(((pool[:, None] - target[None]) ** 2).sum(-1).min(1))[:20]
    assert is_b[select_lowest(grad, 20)].sum() == 10 > is_b[nearest].sum()  # all of B (1% of the pool) first
    assert not is_b[select_lowest(grad, 20, contrast=True)].any()  # contrast moves away from the target


def test_calibration_shifts_rank_invariantly_and_signs_match_finite_differences():
    rng = np.random.default_rng(2)
    g = rng.normal(size=30)
    np.testing.assert_allclose(calibrated_gradient(g + 5.0), calibrated_gradient(g) + 5.0 / 30)
    pool, target = unit(rng.normal(size=(30, 8))), unit(rng.normal(size=(20, 8)))
    eps = 0.05
    grad, _ = ot_gradients(target, pool, eps, relative_epsilon=False, max_iter=100_000, threshold=1e-12)
    cost = ot.dist(target, pool)

    def reg_ot(b):
        return ot.sinkhorn2(ot.unif(20), b, cost, eps, method="sinkhorn_log", numItermax=100_000, stopThr=1e-12)

    base = reg_ot(ot.unif(30))
    clear = np.abs(grad) > 0.1 * np.abs(grad).max()  # signs of near-zero gradients are within solver error
    for j in np.flatnonzero(clear):
        b = ot.unif(30)
        b[j] += 1e-3
        assert np.sign(reg_ot(b / b.sum()) - base) == np.sign(grad[j])


def test_prepare_data_with_a_pool_subset_as_target_selects_it(tiny_model_dir, tiny_tokenizer, ray_local, tmp_path):
    rows = load_rows("bundled:arithmetic", max_samples=24).to_list()
    subset = [1, 4, 9, 13, 20, 22]
    target = tmp_path / "target.jsonl"
    target.write_text("".join(json.dumps(rows[i]) + "\n" for i in subset))
    spec = build_spec({"model": {"name": str(tiny_model_dir)}, "data": {"max_len": 128},
                       "methods": [{"name": "got_d", "target": str(target), "rows": len(subset)}]})
    out, report = prepare(build_methods(spec.methods)[0], rows, spec, tiny_tokenizer)
    assert [r["question"] for r in out] == [rows[i]["question"] for i in subset]  # pool order
    assert report["rows_selected"] == len(out) == 6 and report["target_rows"] == 6
    assert max(r["ot_gradient"] for r in out) == pytest.approx(report["gradient_selected_max"], abs=1e-6)
    assert report["gradient_selected_max"] < report["gradient_median"]
