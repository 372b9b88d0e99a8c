"""curate (Yi's SFT curation rules): the repetition filter drops a response repeating one sentence ten times,
near-duplicates go (one of each group stays), length/format/tag-balance filters do what their fields say,
and the clean bundled sets lose nothing."""

import json
from collections import Counter

import numpy as np
import pytest

from ftray.config import SpecError, build_spec
from ftray.data import bundled, load_rows
from ftray.data.selection import prompt_and_response
from ftray.methods import build_methods
from ftray.methods.curate import CurateConfig, balance, hash_params, minhash, near_duplicates, repeated_ngram_share, words
from tests.methods.helpers import prepare

SENTENCE = "Sam starts with 23 eggs."


def curate(entry: dict | None = None):
    spec = build_spec({"methods": [{"name": "curate", **(entry or {})}]})
    return build_methods(spec.methods)[0], spec


def test_repetition_share_flags_one_sentence_ten_times_and_not_a_normal_rationale():
    assert repeated_ngram_share(" ".join([SENTENCE] * 10), 3) > 0.8
    rationale = "Sam starts with 23 eggs. 2 hens each lay 3 eggs: 2 * 3 = 6, and 23 + 6 = 29."
    assert repeated_ngram_share(rationale, 3) < 0.1 and repeated_ngram_share("", 3) == 0.0


def test_minhash_estimates_jaccard_of_word_shingles():
    a, b = hash_params(256)
    x = "the quick brown fox jumps over the lazy dog near the old river bank today"
    for y in (x.upper() + "!!", x.replace("lazy", "sleepy"), "a completely different sentence about numbers and cats"):
        sx, sy = ({" ".join(w[i:i + 3]) for i in range(len(w) - 2)} for w in (words(x), words(y)))
        truth = len(sx & sy) / len(sx | sy)
        estimate = (minhash(x, 3, a, b) == minhash(y, 3, a, b)).mean()
        assert abs(estimate - truth) < 0.1, (y, truth, estimate)


def test_greedy_near_duplicates_compare_with_kept_rows_only():
    sig = np.zeros((3, 8), dtype=np.uint32)
    sig[1, :2] = 1  # B agrees with A on 6/8 and with C on 6/8; A and C agree on 4/8
    sig[2, :4] = [1, 1, 2, 2]
    assert near_duplicates(sig, [0, 1, 2], 0.7) == {1: 0}  # B goes (≈A); C stays (≈B, but B was not kept)


def test_dirty_pool_loses_every_looping_rationale_and_near_duplicates_but_no_problem(ray_local):
    m, spec = curate()
    rows = load_rows("bundled:arithmetic_dirty").to_list()
    out, report = prepare(m, rows, spec)
    kinds = Counter(r["injected"] for r in out)
    assert kinds["repetition"] == 0 and report["dropped_repetition"] == 300
    assert report["dropped_near_duplicate"] >= 440  # 50 problems × 10 copies: ~one copy of each stays
    problems = {r["rationale"] for r in rows if r["injected"] != "repetition"}  # a near-duplicate keeps its base's rationale
    assert {r["rationale"] for r in out} == problems  # every problem keeps one copy
    position = {json.dumps(r, sort_keys=True): i for i, r in enumerate(rows)}
    order = [position[json.dumps(r, sort_keys=True)] for r in out]
    assert order == sorted(order)  # the pool's order is kept
    assert len(out) == report["rows_in"] - sum(v for k, v in report.items() if k.startswith("dropped_"))
    assert len(report["examples"]) == 5 and report["examples"][0].startswith("[")


def test_length_and_format_filters_and_exact_copies(ray_local):
    rows = load_rows("bundled:arithmetic", max_samples=12).to_list()
    short = {**rows[0], "question": "Unique short one?", "rationale": "Ok"}
    no_equation = {**rows[1], "question": "Another unique one about pears and plums?", "rationale": "I just know it."}
    pool = rows + [dict(rows[3]), short, no_equation]
    m, spec = curate({"min_response_chars": 20, "response_pattern": r"\d+ [-+*] \d+ = \d+"})
    out, report = prepare(m, pool, spec)
    assert out == rows  # the copy, the short and the equation-less rows go
    assert (report["dropped_length"], report["dropped_format"], report["dropped_near_duplicate"]) == (1, 1, 1)


def test_tag_balance_caps_each_tag_at_the_median_and_applies_rates():
    tags = ["a"] * 10 + ["b"] * 4 + ["c"] * 2
    kept, caps = balance(tags, list(range(16)), CurateConfig(balance_by="t"), seed=0)
    assert caps == {"a": 4, "b": 4, "c": 2} and Counter(tags[i] for i in kept) == {"a": 4, "b": 4, "c": 2}
    kept, caps = balance(tags, list(range(16)), CurateConfig(balance_by="t", tag_rates={"b": 0.5}, max_per_tag=8), seed=0)
    assert caps == {"a": 8, "b": 2, "c": 2} and kept == sorted(kept)


def test_the_clean_bundled_sets_lose_nothing_to_the_default_filters():
    cfg = CurateConfig()
    a, b = hash_params(cfg.num_perm)
    for name in ("arithmetic", "factual_qa"):
        with open(bundled.path(name, "train"), encoding="utf-8") as f:
            pairs = [prompt_and_response(json.loads(line)) for line in f]
        assert max(repeated_ngram_share(r, cfg.repetition_ngram) for _, r in pairs) <= cfg.max_repeated_ngram_share
        sig = np.array([minhash(f"{p}\n{r}", cfg.shingle_words, a, b) for p, r in pairs])
        assert near_duplicates(sig, list(range(len(pairs))), cfg.dedup_threshold) == {}


def test_spec_errors_name_the_field():
    with pytest.raises(SpecError, match="tag_rates needs balance_by"):
        curate({"tag_rates": {"x": 0.5}})
    with pytest.raises(SpecError, match="response_pattern is not a regular expression"):
        curate({"response_pattern": "(unclosed"})
