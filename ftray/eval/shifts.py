"""Robustness of a vision-language checkpoint under image shifts (SURE-VQA's protocol, Kahl et al., 2411.19688).

`ftray eval RUN/final --shifts blur,noise,contrast,rotation,occlusion` answers the eval split four ways
with greedy decoding: as is (IID), with every image shifted (`ftray.data.images.shift_rows`, one row per
shift and severity), and with no image at all (`drop_images`, SURE-VQA's sanity baseline R3). Each
condition is scored by normalised exact match and by the rule-based judge below; each shift and the
no-image row also get the robustness ratio score / IID score, which is SURE-VQA's
RR = 1 - (IID - OOD) / IID written the other way (1 = no loss, None when the IID score is 0).

The judge (`judge_rule`) stands in for SURE-VQA's LLM judge (R2) where no judge model is available: a
reply is right when, after `judge_normalize`, it equals the reference or contains it as whole words,
except that a numeric reference needs the reply's numbers to be exactly that number (so "2 or 3" is not
"3"). The rules, with examples, are in docs/vision_language.md.

    python -c "from ftray.eval.shifts import judge_rule as j; print(j('There are three circles.', '3'))"
"""

from __future__ import annotations

import io
import re
import tempfile
import unicodedata
from pathlib import Path
from typing import Any

import ray
import torch

from ftray.data.images import SHIFTS, shift_rows
from ftray.eval.loading import task_of

_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
          "sixteen seventeen eighteen nineteen").split()
_TENS = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if w != "_"}
NUMBER_WORDS = {w: i for i, w in enumerate(_UNITS)} | _TENS
ARTICLES = {"a", "an", "the"}
# Sentence punctuation stripped from the ends of words; brackets, operators and backslashes stay, so a
# LaTeX answer ("\frac { x + 2 } { 3 }") keeps its meaning.
_PUNCT = ".,;:!?\"'`"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def judge_normalize(text: str) -> list[str]:
    """The judge's words of `text`: NFKC, lower case, end punctuation off, number words as digits, no articles."""
    # a hyphen between letters joins words ("top-left", "twenty-one"); a minus sign or LaTeX "x - 2" stays
    text = re.sub(r"(?<=[^\W\d_])-(?=[^\W\d_])", " ", unicodedata.normalize("NFKC", text).lower())
    words = [w.strip(_PUNCT) for w in text.split()]
    words = [w for w in words if w and w not in ARTICLES]
    out: list[str] = []
    tens_word = False
    for w in words:
        if w in NUMBER_WORDS:
            value = NUMBER_WORDS[w]
            # "twenty one" is one number (the previous word was a tens word, now its digits)
            if out and tens_word and 0 < value < 10:
                out[-1], tens_word = str(int(out[-1]) + value), False
                continue
            out.append(str(value))
            tens_word = w in _TENS
            continue
        tens_word = False
        if _NUMBER.fullmatch(w):
            out.append(_canonical_number(w))
        else:
            out.append(w)
    return out


def _canonical_number(word: str) -> str:
    """'3.0' and '03' → '3'; '2.50' → '2.5'."""
    value = float(word)
    return str(int(value)) if value == int(value) else repr(value)


def judge_rule(reply: str, reference: str) -> str:
    """Which rule decides `reply` against `reference`: 'equal', 'contains', 'wrong_number' or 'wrong'."""
    got, want = judge_normalize(reply), judge_normalize(reference)
    if not want:
        return "equal" if not got else "wrong"
    if got == want:
        return "equal"
    if len(want) == 1 and _NUMBER.fullmatch(want[0]):
        numbers = {w for w in got if _NUMBER.fullmatch(w)}
        return "contains" if numbers == {want[0]} else "wrong_number"
    n = len(want)
    return "contains" if any(got[i : i + n] == want for i in range(len(got) - n + 1)) else "wrong"


def judge(reply: str, reference: str) -> bool:
    """True when the rule-based judge accepts `reply` for `reference` (rule 'equal' or 'contains')."""
    return judge_rule(reply, reference) in ("equal", "contains")


def parse_shifts(text: str) -> list[str]:
    """'blur,noise' → ['blur', 'noise']; 'all' → every shift; an unknown name is a ValueError listing the known ones."""
    names = list(SHIFTS) if text.strip() == "all" else [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SHIFTS]
    if unknown or not names:
        raise ValueError(f"--shifts: unknown shift(s) {unknown or text!r}; choose from {', '.join(SHIFTS)} (or 'all')")
    return names


def check_vision_language(model_ref: str) -> None:
    """Raise a ValueError unless `model_ref` is a vision_language checkpoint (shifts need images)."""
    kind = task_of(model_ref)[0]
    if kind != "vision_language":
        raise ValueError(f"--shifts needs a vision_language checkpoint (one trained with task.type: vision_language); "
                         f"{model_ref} is a {kind} model, whose inputs have no images to shift")


def score(model: Any, processor: Any, rows: list[dict], max_new_tokens: int) -> dict[str, Any]:
    """Exact match and judge accuracy of greedy replies to `rows`, with a few examples."""
    from ftray.tasks.vision_language import generate_replies, normalize_answer, normalize_messages

    replies = generate_replies(model, processor, rows, max_new_tokens)
    refs = [" ".join(p.get("text") or "" for p in normalize_messages(r["messages"])[-1]["content"]) for r in rows]
    exact = [normalize_answer(a) == normalize_answer(b) for a, b in zip(replies, refs)]
    judged = [judge(a, b) for a, b in zip(replies, refs)]
    n = max(1, len(rows))
    return {"exact_match": sum(exact) / n, "judge": sum(judged) / n, "n": len(rows),
            "examples": [{"reference": b, "reply": a} for a, b in list(zip(replies, refs))[:3]]}


def evaluate_shifts(model_ref: str, shifts: list[str], severities: list[int] = (2,), source: str | None = None,
                    split: str = "test", max_samples: int | None = 200, max_new_tokens: int = 32,
                    threads: int | None = None, seed: int = 0) -> dict[str, Any]:
    """IID, every (shift, severity) and no-image scores of a vision_language checkpoint, with robustness ratios."""
    from ftray.data import load_rows
    from ftray.eval.loading import load_checkpoint
    from ftray.eval.tasks import spec_of
    from ftray.models import load_processor
    from ftray.tasks.vision_language import drop_images, image_bytes

    check_vision_language(model_ref)
    for s in severities:
        if s not in (1, 2, 3):
            raise ValueError(f"--severities: a severity is 1, 2 or 3, got {s}")
    if threads:
        torch.set_num_threads(threads)
    data = spec_of(model_ref).get("data") or {}
    source = source or data.get("eval_source") or data.get("source") or "bundled:shapes_vqa"
    base_dirs = [Path(source).expanduser().parent] if not source.startswith("bundled:") else []
    # Images as bytes: relative paths resolve once here, and shift_rows reads them as files.
    rows = [{**r, "images": [image_bytes(x, base_dirs) for x in r["images"]]} for r in load_rows(source, split, max_samples).to_list()]
    model, _ = load_checkpoint(model_ref)
    processor = load_processor(model_ref)
    conditions = [{"condition": "iid", "shift": None, "severity": None, **score(model, processor, rows, max_new_tokens)}]
    with tempfile.TemporaryDirectory(prefix="ftray-shifts-") as tmp:
        for kind in shifts:
            for severity in severities:
                as_files = [{**r, "images": [io.BytesIO(b) for b in r["images"]]} for r in rows]
                shifted = shift_rows(as_files, kind, severity, Path(tmp) / f"{kind}{severity}", seed=seed)
                conditions.append({"condition": f"{kind}@{severity}", "shift": kind, "severity": severity,
                                   **score(model, processor, shifted, max_new_tokens)})
    conditions.append({"condition": "no_image", "shift": None, "severity": None,
                       **score(model, processor, [drop_images(r) for r in rows], max_new_tokens)})
    iid = conditions[0]
    for c in conditions:
        for metric in ("exact_match", "judge"):
            c[f"ratio_{metric}"] = c[metric] / iid[metric] if iid[metric] > 0 else None
    return {"model": model_ref, "task": "vision_language", "source": source, "split": split, "seed": seed,
            "conditions": conditions}


def evaluate_shifts_on_ray(model_ref: str, num_cpus: int = 2, **kwargs: Any) -> dict[str, Any]:
    """Run `evaluate_shifts` as a Ray task, as `ftray.eval.evaluate_on_ray` runs plain eval."""
    check_vision_language(model_ref)  # fail before Ray schedules anything
    task = ray.remote(num_cpus=num_cpus)(evaluate_shifts)
    return ray.get(task.remote(model_ref, threads=num_cpus, **kwargs))


def shifts_table(report: dict[str, Any]) -> str:
    """The report as a markdown table: one row per condition, scores and ratios to IID."""
    def fmt(v: float | None) -> str:
        return "–" if v is None else f"{v:.3f}"

    lines = [f"Robustness of `{report['model']}` on {report['source']} [{report['split']}] (SURE-VQA protocol; "
             "ratio = score / IID score)", "",
             "| condition | n | exact match | judge | ratio (exact) | ratio (judge) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for c in report["conditions"]:
        lines.append(f"| {c['condition']} | {c['n']} | {fmt(c['exact_match'])} | {fmt(c['judge'])} | "
                     f"{fmt(c['ratio_exact_match'])} | {fmt(c['ratio_judge'])} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write `shifts.json` and `shifts.md` under `out_dir`; returns both paths."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shifts.json").write_text(json.dumps(report, indent=2))
    (out / "shifts.md").write_text(shifts_table(report))
    return out / "shifts.json", out / "shifts.md"
