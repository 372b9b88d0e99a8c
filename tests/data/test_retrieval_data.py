"""The bundled retrieval set: a consistent corpus, disjoint splits, hard negatives, cached teacher scores, the scorer."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from ftray.data import load_rows
from ftray.data import bundled
from ftray.data.bundled import retrieval
from ftray.data.bundled.generate import CORPORA, write_jsonl
from ftray.data.bundled.generate import retrieval as make_retrieval


def read(p: Path) -> list[dict]:
    with open(p, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def shipped() -> dict[str, list[dict]]:
    return {"train": read(bundled.path("retrieval", "train")), "test": read(bundled.path("retrieval", "test")),
            "corpus": read(bundled.corpus_path("retrieval"))}


def test_shipped_files_regenerate_byte_for_byte(tmp_path: Path) -> None:
    train, test = make_retrieval()
    for name, rows, shipped_path in (("train", train, bundled.path("retrieval", "train")),
                                     ("test", test, bundled.path("retrieval", "test")),
                                     ("corpus", CORPORA["retrieval"](), bundled.corpus_path("retrieval"))):
        write_jsonl(rows, tmp_path / f"{name}.jsonl")
        assert (tmp_path / f"{name}.jsonl").read_bytes() == shipped_path.read_bytes(), f"retrieval {name} differs"


def test_sizes_schema_and_corpus(shipped: dict) -> None:
    assert (len(shipped["train"]), len(shipped["test"])) == (800, 300)
    corpus = {r["pid"]: r["text"] for r in shipped["corpus"]}
    assert len(corpus) == len(shipped["corpus"]) == 3000
    assert len(set(corpus.values())) == len(corpus)  # a text appears once, so a query has one positive passage
    for split in ("train", "test"):
        for row in shipped[split]:
            assert {"qid", "query", "positive", "positive_id", "negatives", "negative_ids"} <= set(row)
            assert corpus[row["positive_id"]] == row["positive"]
            assert [corpus[p] for p in row["negative_ids"]] == row["negatives"]
            ids = [row["positive_id"], *row["negative_ids"]]
            assert len(row["negatives"]) == retrieval.N_NEGATIVES == 7 and len(set(ids)) == 8


def test_queries_are_disjoint_between_splits(shipped: dict) -> None:
    train, test = shipped["train"], shipped["test"]
    assert not {r["query"] for r in train} & {r["query"] for r in test}
    assert not {r["positive_id"] for r in train} & {r["positive_id"] for r in test}  # facts, not just wordings
    qids = [r["qid"] for r in train + test]
    assert len(set(qids)) == len(qids)
    assert len({r["query"] for r in train}) == len(train)


def test_negatives_are_hard(shipped: dict) -> None:
    """Most rows have a negative sharing a content word with the query beyond the positive's."""
    rows = shipped["train"]
    overlap = sum(any(set(retrieval._words(n)) & set(retrieval._words(r["query"])) for n in r["negatives"]) for r in rows)
    assert overlap / len(rows) > 0.95
    capital_rows = [(m.group(1), r) for r in rows if (m := re.match(r"(?:What|Which city) is the capital of (.+)\?$", r["query"]))]
    assert capital_rows
    for country, row in capital_rows:  # same entity without the fact, and the same attribute of another country
        assert any(country in n for n in row["negatives"]) and any("capital" in n for n in row["negatives"])


def test_generation_is_deterministic() -> None:
    a = retrieval.generate(7, n_train=60, n_test=30, n_corpus=800)
    b = retrieval.generate(7, n_train=60, n_test=30, n_corpus=800)
    assert a == b
    assert (len(a[0]), len(a[1]), len(a[2])) == (60, 30, 800)
    assert retrieval.generate(8, n_train=60, n_test=30, n_corpus=800)[0] != a[0]


def test_teacher_scores_are_merged_into_train() -> None:
    train = load_rows("bundled:retrieval", "train")
    assert "teacher_scores" in train.column_names and len(train) == 800
    for scores in train["teacher_scores"]:
        assert len(scores) == 8 and all(isinstance(s, float) and math.isfinite(s) for s in scores)
    test = load_rows("bundled:retrieval", "test")
    assert len(test) == 300 and "teacher_scores" not in test.column_names


def test_stale_teacher_cache_is_refused(tmp_path: Path) -> None:
    rows = retrieval.generate(7, n_train=6, n_test=3, n_corpus=600)[0]
    cache = tmp_path / "teacher.jsonl"
    write_jsonl([{"qid": r["qid"], "teacher_scores": [0.0] * 8, "fingerprint": retrieval.fingerprint(r)} for r in rows], cache)
    assert retrieval.with_teacher_scores(rows, cache)[0]["teacher_scores"] == [0.0] * 8
    rows[2] = {**rows[2], "negatives": rows[2]["negatives"][::-1]}
    with pytest.raises(ValueError, match="stale for 1 train rows"):
        retrieval.with_teacher_scores(rows, cache)


def test_scorer_runs_on_ray_data(tiny_model_dir: Path, ray_local) -> None:
    from ftray.data.bundled.teacher import CrossEncoderScorer, score_pairs

    pairs = [("What is the capital of France?", "Paris is the capital of France."),
             ("What is the capital of France?", "The capital of Germany is Berlin. It comes up in trivia games."),
             ("Convert 3 meters to centimeters.", "3 meters equal 300 centimeters."),
             ("Convert 3 meters to centimeters.", "Both meters and centimeters are units people use every day.")]
    scores = score_pairs(pairs, model=str(tiny_model_dir), concurrency=1, batch_size=2)
    assert len(scores) == 4 and all(math.isfinite(s) for s in scores)
    # one pair at a time (no padding) gives the same scores as the padded Ray batches, in the same order
    scorer = CrossEncoderScorer(str(tiny_model_dir))
    alone = [float(scorer({"query": [q], "passage": [p]})["score"][0]) for q, p in pairs]
    assert alone == pytest.approx(scores, abs=0.05)
