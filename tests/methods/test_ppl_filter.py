"""Perplexity filter: exactly ⌈r·N⌉ rows survive and every kept perplexity ≤ every dropped one."""

import math

from ftray.config import build_spec
from ftray.data import load_rows
from ftray.data.inference import ResponseScorer, map_model
from ftray.methods import Context, build_methods
from ftray.methods.ppl_filter import lowest
from tests.methods.helpers import prepare


def test_lowest_keeps_exactly_k_with_ties_broken_by_position():
    values = [3.0, 1.0, 2.0, 1.0, 5.0, 2.0, 2.0]
    keep = lowest(values, 4)
    assert keep == [False, True, True, True, False, True, False]  # the third 2.0 (index 6) is cut by position
    kept = [v for v, k in zip(values, keep) if k]
    assert max(kept) <= min(v for v, k in zip(values, keep) if not k)


def test_keeps_ceil_r_n_lowest_perplexity_rows(tiny_model_dir, tiny_tokenizer, ray_local):
    import ray.data

    rows = load_rows("bundled:arithmetic_noisy", max_samples=23).to_list()
    spec = build_spec({"model": {"name": str(tiny_model_dir)}, "data": {"max_len": 128},
                       "methods": [{"name": "ppl_filter", "keep_ratio": 0.3}]})
    out, report = prepare(build_methods(spec.methods)[0], rows, spec, tiny_tokenizer)
    assert len(out) == report["rows_kept"] == math.ceil(0.3 * 23) == 7

    ctx = Context(spec=spec, tokenizer=tiny_tokenizer)  # score the same rows independently
    scored = map_model(ray.data.from_items(rows), ResponseScorer, ctx).take_all()
    by_question = {r["question"]: r["ppl"] for r in scored}
    kept = {r["question"] for r in out}
    assert all(math.isclose(r["ppl"], by_question[r["question"]], rel_tol=1e-5) for r in out)
    assert max(by_question[q] for q in kept) <= min(p for q, p in by_question.items() if q not in kept)
    assert report["max_kept_ppl"] <= report["min_dropped_ppl"]
    assert sum(report["kept_by_source"].values()) == 7 and sum(report["in_by_source"].values()) == 23
    assert [r["question"] for r in out] == [r["question"] for r in rows if r["question"] in kept]  # pool order kept


def test_on_image_rows_the_vlm_scores_the_reply_given_the_image_and_keeps_the_lowest(tiny_llava_dir, ray_local):
    """POINTS' own setting: the VLM's perplexity of each reply given its image; exactly ⌈r·N⌉ rows, all below the dropped."""
    import ray.data

    from ftray.data.vlm_inference import VLMScorer
    from ftray.tasks import get_task

    rows = load_rows("bundled:shapes_vqa", max_samples=10).to_list()
    spec = build_spec({"model": {"name": str(tiny_llava_dir)}, "task": {"type": "vision_language"},
                       "methods": [{"name": "ppl_filter", "keep_ratio": 0.4}]})
    tokenizer = get_task(spec).processor.tokenizer
    out, report = prepare(build_methods(spec.methods)[0], rows, spec, tokenizer)
    assert len(out) == report["rows_kept"] == 4
    scored = map_model(ray.data.from_items(rows), VLMScorer, Context(spec=spec, tokenizer=tokenizer)).take_all()
    ppl = {r["images"][0]: r["ppl"] for r in scored}
    kept = {r["images"][0] for r in out}
    assert max(ppl[k] for k in kept) <= min(p for k, p in ppl.items() if k not in kept)
