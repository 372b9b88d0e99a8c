"""Write the bundled datasets (seeded, deterministic): `python -m ftray.data.bundled.generate [OUT_DIR]`.

Each dataset has one function returning its (train, test) rows; `build_all` writes
`<name>_<split>.jsonl` next to this file unless given another directory.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

from ftray.data.bundled import DIR
from ftray.data.bundled import arithmetic as _arithmetic
from ftray.data.bundled import arithmetic_dirty as _arithmetic_dirty
from ftray.data.bundled import classification as _classification
from ftray.data.bundled import factual_edits as _factual_edits
from ftray.data.bundled import factual_qa as _factual_qa
from ftray.data.bundled import noisy_pool as _noisy_pool
from ftray.data.bundled import ood_qa as _ood_qa
from ftray.data.bundled import retrieval as _retrieval

SEED = 1234


def arithmetic() -> tuple[list[dict], list[dict]]:
    """2-3 step word problems: question, rationale, answer (2000 train / 200 test)."""
    return _arithmetic.generate(SEED, n_train=2000, n_test=200)


def arithmetic_dirty() -> tuple[list[dict], list[dict]]:
    """The arithmetic train set with injected near-duplicates and looping rationales (2000 rows); clean test."""
    train, test = arithmetic()
    return _arithmetic_dirty.generate(train, test, SEED)


def factual_qa() -> tuple[list[dict], list[dict]]:
    """Short-answer facts: prompt, completion, answer, category (500 train / 200 test)."""
    return _factual_qa.generate(SEED, n_train=500, n_test=200)


def classification() -> tuple[list[dict], list[dict]]:
    """Four-topic sentences: text, label, label_name (1000 train / 200 test)."""
    return _classification.generate(SEED, n_train=1000, n_test=200)


def classification_lt() -> tuple[list[dict], list[dict]]:
    """The classification train set long-tailed (imbalance 100, exponential profile); balanced test."""
    train, test = classification()
    return _classification.long_tailed(train, 100.0, SEED), test


def _noisy(rate: float, kind: str):
    def make() -> tuple[list[dict], list[dict]]:
        train, test = classification()
        return _classification.noisy(train, rate, kind, SEED), test

    make.__doc__ = f"The classification train set with {rate:.0%} {kind} label noise (clean_label kept); clean test."
    return make


def factual_edits() -> tuple[list[dict], list[dict]]:
    """Counterfactual edits of the factual-QA facts: requests / two rephrasings of each (100 / 200)."""
    return _factual_edits.generate(SEED, n_edits=100)


def arithmetic_noisy() -> tuple[list[dict], list[dict]]:
    """Arithmetic train rows 1000-1999 with 30% injected noise rows (shuffled / mismatched), marked in `source`; clean test."""
    train, test = arithmetic()
    return _noisy_pool.generate(train, test, SEED)


def ood_qa() -> tuple[list[dict], list[dict]]:
    """Out-of-domain questions, half answerable, half about made-up entities (40 train / 200 test)."""
    return _ood_qa.generate(SEED, n_train=40, n_test=200)


DATASETS = {
    "arithmetic": arithmetic, "arithmetic_noisy": arithmetic_noisy, "factual_qa": factual_qa, "classification": classification, "factual_edits": factual_edits,
    "classification_lt": classification_lt, "ood_qa": ood_qa, "arithmetic_dirty": arithmetic_dirty,
    **{f"classification_{short}{round(r * 100)}": _noisy(r, kind)
       for kind, short in (("symmetric", "sym"), ("asymmetric", "asym")) for r in (0.2, 0.4)},
}


@functools.cache
def retrieval_rows() -> tuple[list[dict], list[dict], list[dict]]:
    """The retrieval (train, test, corpus) rows before teacher scores; teacher.py scores these train rows."""
    return _retrieval.generate(SEED, n_train=800, n_test=300, n_corpus=3000)


def retrieval() -> tuple[list[dict], list[dict]]:
    """Queries, positive, 7 hard negatives (800 train / 300 test); train rows carry the cached teacher_scores.

    The scores come from retrieval_teacher.jsonl (written once by `python -m ftray.data.bundled.teacher`,
    which needs the model), so regenerating stays model-free and byte-identical.
    """
    train, test, _ = retrieval_rows()
    return _retrieval.with_teacher_scores(train, DIR / "retrieval_teacher.jsonl"), test


DATASETS["retrieval"] = retrieval
CORPORA = {"retrieval": lambda: retrieval_rows()[2]}  # <name>_corpus.jsonl: rows {pid, text}


def write_jsonl(rows: list[dict], path: Path) -> None:
    """One JSON object per line, UTF-8, '\\n' line ends: the same bytes on every platform."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_all(out_dir: Path | str | None = None) -> dict[str, Path]:
    """Write every bundled split; returns {'<name>_<split>': path}."""
    out = Path(out_dir) if out_dir is not None else DIR
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, make in DATASETS.items():
        for split, rows in zip(("train", "test"), make()):
            written[f"{name}_{split}"] = out / f"{name}_{split}.jsonl"
            write_jsonl(rows, written[f"{name}_{split}"])
    for name, make_corpus in CORPORA.items():
        written[f"{name}_corpus"] = out / f"{name}_corpus.jsonl"
        write_jsonl(make_corpus(), written[f"{name}_corpus"])
    return written


if __name__ == "__main__":
    for key, p in build_all(sys.argv[1] if len(sys.argv) > 1 else None).items():
        print(f"{key}: {p} ({p.stat().st_size} bytes)")
