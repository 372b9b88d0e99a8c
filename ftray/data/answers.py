"""Answer extraction and normalisation for exact-match evaluation."""

from __future__ import annotations

import re

# "The answer is 13." / "the answer is: New Delhi" -> the text up to the sentence end; a period
# followed by a digit ("3.5") does not end the sentence.
_ANSWER_IS = re.compile(r"the answer is\s*:?\s*(.+?)\s*(?:\.(?=\s|$)|\n|$)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def extract_answer(text: str) -> str | None:
    """The answer after the last "The answer is", else the last number in `text`, else None."""
    found = _ANSWER_IS.findall(text)
    if found:
        return found[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1].rstrip(",") if numbers else None


def normalize_answer(s: str) -> str:
    """Compare-ready form: stripped, lower-cased, no trailing period, no thousands commas, single spaces."""
    s = " ".join(str(s).strip().lower().split())
    s = s.rstrip(".").rstrip()
    return _THOUSANDS.sub("", s)
