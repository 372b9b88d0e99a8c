"""Confidence and refusal metrics (R-Tuning, Metacognition SFT, US-Tuning) and the answer checks they share.

Pure functions on plain lists, so each is testable on hand-made inputs:

    average_precision(scores, correct)          # R-Tuning's AP (sklearn's `average_precision_score`)
    auroc(scores, correct)                      # AUC_c of Metacognition SFT
    expected_calibration_error(conf, correct)   # ECE, 10 equal-width bins
    refusal_rate(refused), answered_accuracy(correct, answered)

`answer_correct` is the correctness test the methods' data building and these evaluations share (R-Tuning's
"gold ⊂ prediction", on word boundaries); `cut_answer` keeps the first sentence of a free-form reply.
The model-side measurements that produce these inputs for `ftray bench methods` are in
`ftray.eval.confidence_bench`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from ftray.data.answers import extract_answer, normalize_answer

# A sentence ends at '.', '!' or '?' not followed by a digit ("3.5" stays whole), or at a line break.
_SENTENCE_END = re.compile(r"[.!?](?!\d)|\n")
# phrases that make a reply a refusal (US-Tuning's detector [code], plus the R-Tuning-R refusals' words)
REFUSAL_PHRASES = ("not provided", "not mentioned", "insufficient", "i don't know", "i do not know", "i'm not sure",
                   "i am not sure", "unknown", "cannot be determined", "can't be determined", "no information",
                   "not enough information", "unable to answer", "cannot answer")
_CONFIDENCE = re.compile(r"confidence(?:\s+score)?(?:\s+is|\s*:|\s+of)?\s*(\d+(?:\.\d+)?|\.\d+)\s*(%?)", re.IGNORECASE)


def cut_answer(text: str) -> str:
    """The reply up to its first sentence end (R-Tuning's "cut the output at the first '.'"), stripped."""
    text = text.strip()
    m = _SENTENCE_END.search(text)
    return (text[: m.start()] if m else text).strip()


def answer_correct(text: str, gold: str | None) -> bool:
    """True when the gold answer occurs in `text` as whole words, or equals its extracted answer.

    R-Tuning's test is "gold is a substring of the prediction"; whole words keep "1" from matching "100".
    """
    g = normalize_answer(gold or "")
    if not g:
        return False
    t = normalize_answer(text)
    if normalize_answer(extract_answer(text) or t) == g:
        return True
    return re.search(rf"(?<!\w){re.escape(g)}(?!\w)", t) is not None


def is_refusal(text: str) -> bool:
    """Whether a reply declines to answer (any of REFUSAL_PHRASES, case-insensitive)."""
    t = " ".join(text.lower().replace("’", "'").split())
    return any(p in t for p in REFUSAL_PHRASES)


def parse_confidence(text: str) -> float | None:
    """The stated confidence in [0, 1] ("my confidence score is 0.85", "confidence: 85%"), or None."""
    m = _CONFIDENCE.search(text)
    if not m:
        return None
    value = float(m.group(1))
    if m.group(2) or 1 < value <= 100:  # a percentage
        value /= 100
    return value if 0 <= value <= 1 else None


def average_precision(scores: Sequence[float], correct: Sequence[bool]) -> float | None:
    """AP = Σₙ (Rₙ − Rₙ₋₁)·Pₙ over the distinct score thresholds, highest first; None without positives.

    The same value as sklearn's `average_precision_score` (tied scores form one threshold); written
    here because scikit-learn is not a dependency of ftray.
    """
    pos = sum(bool(c) for c in correct)
    if pos == 0:
        return None
    pairs = sorted(zip(scores, correct), key=lambda p: -p[0])
    ap, tp, seen, last_recall = 0.0, 0, 0, 0.0
    for i, (s, c) in enumerate(pairs):
        tp, seen = tp + bool(c), seen + 1
        if i + 1 < len(pairs) and pairs[i + 1][0] == s:
            continue  # a threshold takes every row with this score at once
        recall = tp / pos
        ap += (recall - last_recall) * tp / seen
        last_recall = recall
    return ap


def auroc(scores: Sequence[float], correct: Sequence[bool]) -> float | None:
    """Area under the ROC curve of `scores` separating correct from wrong (ties count ½); None with one class."""
    pos = [s for s, c in zip(scores, correct) if c]
    neg = [s for s, c in zip(scores, correct) if not c]
    if not pos or not neg:
        return None
    # Mann–Whitney U from mid-ranks: O(n log n) instead of comparing every pair
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, c in zip(ranks, correct) if c)
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> float | None:
    """ECE = Σ_b (n_b/N)·|acc_b − conf_b| over `n_bins` equal-width bins of [0, 1]; None for no rows."""
    if not confidence:
        return None
    bins: dict[int, list[tuple[float, bool]]] = {}
    for p, c in zip(confidence, correct):
        bins.setdefault(min(int(p * n_bins), n_bins - 1), []).append((p, bool(c)))
    n = len(confidence)
    return sum(len(b) / n * abs(sum(c for _, c in b) / len(b) - sum(p for p, _ in b) / len(b)) for b in bins.values())


def refusal_rate(refused: Sequence[bool]) -> float | None:
    """Share of questions refused (None for no questions)."""
    return sum(map(bool, refused)) / len(refused) if refused else None


def answered_accuracy(correct: Sequence[bool], answered: Sequence[bool]) -> float | None:
    """Accuracy over the questions the model chose to answer (None when it answered none)."""
    kept = [c for c, a in zip(correct, answered) if a]
    return sum(map(bool, kept)) / len(kept) if kept else None


def entropy(values: Sequence[str]) -> float:
    """Shannon entropy (nats) of the empirical distribution of `values` (R-Tuning-U's uncertainty)."""
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    n = len(values)
    return -sum(k / n * math.log(k / n) for k in counts.values()) if n else 0.0


def rounded(metrics: dict[str, float | None], digits: int = 4) -> dict[str, float | None]:
    """Metrics rounded for a table row (None stays None)."""
    return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in metrics.items()}


def short_answer(text: str) -> str:
    """The core of a free-form reply: its first sentence, then what follows "The answer is" or its last
    " is " / " are " ("The capital of Senegal is Dakar." → "Dakar"), so that samples can be compared."""
    s = cut_answer(text)
    m = re.search(r"the answer is\s*:?\s*(.+)$", s, re.IGNORECASE)
    if m:
        return m.group(1).strip()
    parts = re.split(r"\s(?:is|are|was|were)\s", s)
    return parts[-1].strip() if len(parts) > 1 and parts[-1].strip() else s


def answer_key(text: str) -> str:
    """`short_answer` normalised: two samples give the same answer when their keys are equal."""
    return normalize_answer(short_answer(text))
