"""KAFT — Knowledge Aware FineTuning (Li, Rawat, Zaheer, Wang, Lukasik, Veit, Yu, Kumar; "Large Language
Models with Controllable Working Memory", Findings of ACL 2023, 2211.05110).

Idea: plain SFT on question/answer rows into which contexts are injected — a relevant context (target: the
gold answer), a counterfactual one that states another answer (target: the context's answer), an
irrelevant one and an empty one (target: what the pretrained model answers with no context) — so the model
follows a context that bears on the question (controllability) and falls back on its own knowledge when
the context does not (robustness). Nothing but the data changes.

    methods: [{name: kaft}]      # rows: prompt/completion (+ answer, category), e.g. bundled:factual_qa

Decisions ([inf] in the spec unless said otherwise):
- Relevant context: a row's own `context` column when it has one (span QA), else one sentence stating the
  fact, made from the question and its answer (`fact_sentence`: "What is the capital of France?" + Paris →
  "The capital of France is Paris.").
- Counterfactual: every whole-word occurrence of a in c replaced with a′, the answer of another row of the
  same type (category, question stem, numeric or not) that occurs in neither the question nor c.
- Irrelevant: the context of another row (of another category when possible) that does not mention a.
- Irrelevant / empty targets: the pretrained model's greedy closed-book answer a_cb on the empty-context
  prompt (the spec's label [3rd]: irrelevant contexts then teach no new facts), generated on Ray Data
  (`Answerer`) and cut to its first line and sentence (max_new_tokens cuts a chat model's elaboration
  mid-sentence). `irrelevant_target: answer` labels them with the gold answer instead (no model pass).
- Mixture: each type's ratio is rows per base question (1:1:1:0.5 → 3.5 rows per question), the questions
  of a type drawn without repetition (whole passes for ratios above 1); all rows shuffled together.
- Layout: user turn "Context: {x}\\nQuestion: {q}" (the empty context keeps the layout), reply = the
  target, optionally after the relevance rationale ("The context is relevant to the question. The answer
  is …", off by default as in the spec).
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ftray.data.answers import extract_answer, normalize_answer
from ftray.data.formats import format_of_columns, format_prompt, reference_answer
from ftray.methods.base import Context, Method, MethodConfig, stable_seed
from ftray.methods.registry import register

if TYPE_CHECKING:
    import ray.data

    from ftray.config import RunSpec

TYPES = ("relevant", "counterfactual", "irrelevant", "empty")
_RATIONALE = {"relevant": "The context is relevant to the question.", "counterfactual": "The context is relevant to the question.",
              "irrelevant": "The context is irrelevant to the question.", "empty": "There is no context."}


def context_prompt(context: str, question: str) -> str:
    """The user turn of a KAFT row (training and evaluation alike)."""
    return f"Context: {context}\nQuestion: {question}"


def mentions(text: str, phrase: str) -> bool:
    """Whether `phrase` occurs in `text` as whole words (case-insensitive): "1" is not in "1000"."""
    return bool(phrase) and re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text, re.IGNORECASE) is not None


def replace_answer(context: str, answer: str, new: str) -> str:
    """`context` with every whole-word occurrence of `answer` replaced by `new`."""
    return re.sub(rf"(?<!\w){re.escape(answer)}(?!\w)", lambda _: new, context, flags=re.IGNORECASE)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


# question shapes of short factual QA → a declarative sentence with the answer in it, tried in order
_SENTENCES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^how many (?P<x>.+?) (?:are|is) (?:there )?in (?P<y>.+?)\?$", re.I), "There are {a} {x} in {y}."),
    (re.compile(r"^(?P<pre>.+?, )?what (?:is|was) (?P<x>.+?)\?$", re.I), "{pre}{x} is {a}."),
    (re.compile(r"^(?:which|what) (?P<n>\w+) (?:do|does|did) (?P<x>.+?)\?$", re.I), "The {n} {x} is {a}."),
    (re.compile(r"^(?:which|what) (?P<n>.+?) (?P<v>is|was|has|have|comes|came|contains|lies) (?P<x>.+?)\?$", re.I),
     "The {n} that {v} {x} is {a}."),
]


def fact_sentence(question: str, answer: str) -> str:
    """One sentence stating the fact that answers `question` ("What is the capital of France?", "Paris" →
    "The capital of France is Paris."); a generic statement for question shapes it does not know."""
    q = " ".join(question.split())
    for pattern, template in _SENTENCES:
        m = pattern.match(q)
        if m:
            g = {k: v or "" for k, v in m.groupdict().items()}
            text = template.format(a=answer, **g)
            return text if g.get("pre") else _cap(text)
    return f'The answer to "{q}" is {answer}.'


def short_answer(text: str) -> str:
    """A generated answer's first line, up to its first sentence end (a decimal point does not end it)."""
    line = next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")
    m = re.search(r"[.!?](?=\s|$)", line)
    return line[: m.end()].strip() if m else line


def answer_key(text: str) -> str:
    """The compare-ready form of an answer or a model output (ftray's exact-match rule)."""
    return normalize_answer(extract_answer(text) or text)


def _is_number(s: str) -> bool:
    return re.fullmatch(r"-?\d[\d,]*(?:\.\d+)?", s.strip()) is not None


def answer_type(item: dict) -> tuple:
    """Which answers may stand in for this one: same category, question stem and numeric-ness."""
    stem = " ".join(item["question"].lower().split()[:2])
    return item.get("category"), stem, _is_number(item["answer"])


def counterfactual_answer(item: dict, pool: dict[tuple, list[str]], rng: random.Random) -> str | None:
    """a′: another answer of the item's type (else of its category and numeric-ness) that occurs in neither
    its question nor its context and differs from a; None when there is none."""
    key = answer_type(item)
    for candidates in (pool.get(key, []), pool.get((key[0], None, key[2]), [])):
        ok = [c for c in candidates if answer_key(c) != answer_key(item["answer"])
              and not mentions(item["question"], c) and not mentions(item["context"], c) and not mentions(c, item["answer"])]
        if ok:
            return rng.choice(sorted(set(ok)))
    return None


def answer_pool(items: list[dict]) -> dict[tuple, list[str]]:
    """Answers grouped by `answer_type`, and by (category, None, numeric) as the fallback."""
    pool: dict[tuple, list[str]] = {}
    for it in items:
        key = answer_type(it)
        pool.setdefault(key, []).append(it["answer"])
        pool.setdefault((key[0], None, key[2]), []).append(it["answer"])
    return pool


def irrelevant_context(i: int, items: list[dict], rng: random.Random, tries: int = 50) -> str | None:
    """The context of another item (of another category when possible) that does not mention item i's answer."""
    me = items[i]
    others = [j for j in range(len(items)) if j != i]
    rng.shuffle(others)
    fallback = None
    for j in others[:tries]:
        ctx = items[j]["context"]
        if mentions(ctx, me["answer"]) or ctx == me["context"]:
            continue
        if items[j].get("category") != me.get("category") or me.get("category") is None:
            return ctx
        fallback = fallback or ctx
    return fallback


def counterfactual_case(item: dict, pool: dict[tuple, list[str]], rng: random.Random) -> tuple[str, str] | None:
    """(c′, a′) for an item, or None when no substitute answer fits."""
    new = counterfactual_answer(item, pool, rng)
    if new is None or not mentions(item["context"], item["answer"]):
        return None
    ctx = replace_answer(item["context"], item["answer"], new)
    return (ctx, new) if not mentions(ctx, item["answer"]) and mentions(ctx, new) else None


def type_counts(ratios: dict[str, float], n: int) -> dict[str, int]:
    """Rows of each context type for n base questions (ratio = rows per question)."""
    return {t: round(r * n) for t, r in ratios.items()}


def pick(n_rows: int, n: int, rng: random.Random) -> list[int]:
    """`n_rows` question indices out of n: whole passes, then a sample without repetition."""
    return list(range(n)) * (n_rows // n) + rng.sample(range(n), n_rows % n) if n else []


def item_of(row: dict, fmt: str, probed: bool = False) -> dict:
    """{question, answer, context, category, closed_book} of a base row; the context is the row's own or a fact
    sentence; closed_book is the first of the `answers` the closed-book probe added (when `probed`)."""
    question = next(m["content"] for m in reversed(format_prompt(row, fmt)) if m["role"] == "user")
    answer = str(reference_answer(row, fmt)).strip()
    context = row.get("context") or fact_sentence(question, answer)
    return {"question": question, "answer": answer, "context": context, "category": row.get("category"),
            "closed_book": short_answer(row["answers"][0]) if probed else None}


def closed_book_prompt(row: dict) -> list[dict]:
    """The empty-context prompt of a base row (the pretrained model's closed-book probe)."""
    fmt = format_of_columns(row.keys())
    question = next(m["content"] for m in reversed(format_prompt(row, fmt)) if m["role"] == "user")
    return [{"role": "user", "content": context_prompt("", question)}]


class KAFTConfig(MethodConfig):
    relevant: float = Field(1.0, ge=0, description="Relevant-context rows per base question (target: the gold answer).")
    counterfactual: float = Field(1.0, ge=0, description="Counterfactual-context rows per base question: the context states "
                                  "another answer a′ of the same type and the target is a′.")
    irrelevant: float = Field(1.0, ge=0, description="Irrelevant-context rows per base question: another question's context; "
                              "target per irrelevant_target.")
    empty: float = Field(0.5, ge=0, description="Empty-context rows per base question; target per irrelevant_target.")
    irrelevant_target: Literal["closed_book", "answer"] = Field(
        "closed_book", description="Target of irrelevant and empty contexts: the pretrained model's greedy closed-book "
        "answer (the paper's label; teaches no new facts) or the gold answer (no model pass).")
    known_only: bool = Field(False, description="Keep only questions whose closed-book answer mentions the gold answer "
                             "(needs irrelevant_target=closed_book).")
    rationale: bool = Field(False, description="Start each target with a relevance statement ('The context is relevant "
                            "to the question. The answer is …').")
    max_new_tokens: int = Field(24, ge=1, description="Tokens generated for a closed-book answer (cut to its first sentence).")


@register
class KAFT(Method):
    """Inject relevant, counterfactual, irrelevant and empty contexts into QA rows with the target each calls for."""

    name = "kaft"
    paper = "Li et al. 2023, Large Language Models with Controllable Working Memory (KAFT), Findings of ACL (2211.05110)"
    Config = KAFTConfig
    tasks = ("causal_lm",)
    # 200 questions (700 KAFT rows; a 20-step bench sees 160 rows); one-thread inference actors for the
    # closed-book probe (two OpenMP threads per actor spin-wait on shared CPUs)
    bench = {"data": {"source": "bundled:factual_qa", "max_len": 192, "max_samples": 200, "actor_threads": 1}}
    bench_metrics = ("ftray.eval.context:kaft_metrics",)

    def check(self, spec: RunSpec) -> None:
        """known_only needs the closed-book answers."""
        if self.config.known_only and self.config.irrelevant_target != "closed_book":
            raise ValueError("kaft: known_only=true needs irrelevant_target=closed_book (it compares the closed-book answer)")
        if not any((self.config.relevant, self.config.counterfactual, self.config.irrelevant, self.config.empty)):
            raise ValueError("kaft: every context-type ratio is 0, so no rows would be built; set at least one above 0")

    def prepare_data(self, ds: ray.data.Dataset, ctx: Context) -> ray.data.Dataset:
        """Closed-book answers of the pretrained model (Ray Data), then the context rows of every type, shuffled."""
        import ray.data

        from ftray.data.inference import Answerer, map_model

        c = self.config
        fmt = ctx.spec.data.format if ctx.spec.data.format != "auto" else format_of_columns(ds.columns())
        probed = c.irrelevant_target == "closed_book" and bool(c.irrelevant or c.empty or c.known_only)
        if probed:
            ds = map_model(ds, Answerer, ctx, max_new_tokens=c.max_new_tokens, prompt_of=closed_book_prompt)
        items = [item_of(r, fmt, probed) for r in ds.take_all()]  # small text rows: the pairing below is global
        rows, report = build_rows(items, c, ctx.spec.train.seed)
        ctx.report.update(report)
        return ray.data.from_items(rows)


def build_rows(items: list[dict], c: KAFTConfig, seed: int) -> tuple[list[dict], dict]:
    """The KAFT rows for base items ({question, answer, context, category, closed_book}) and a report."""
    rng = random.Random(stable_seed("kaft", seed))
    report: dict = {"questions_in": len(items)}
    if c.irrelevant_target == "closed_book":
        report["closed_book_mentions_answer"] = round(sum(bool(it["closed_book"]) and mentions(it["closed_book"], it["answer"])
                                                          for it in items) / max(1, len(items)), 3)
        if c.known_only:
            items = [it for it in items if it["closed_book"] and mentions(it["closed_book"], it["answer"])]
    pool = answer_pool(items)
    wanted = type_counts({t: getattr(c, t) for t in TYPES}, len(items))
    rows: list[dict] = []
    skipped = dict.fromkeys(TYPES, 0)
    for t in TYPES:
        for i in pick(wanted[t], len(items), rng):
            built = build_one(t, i, items, pool, c, rng)
            if built is None:
                skipped[t] += 1
            else:
                rows.append(built)
    rng.shuffle(rows)
    counts = {t: sum(r["context_type"] == t for r in rows) for t in TYPES}
    first = {r["context_type"]: r for r in reversed(rows)}  # one example per type
    report.update({"questions": len(items), "rows_per_type": counts, "wanted_per_type": wanted,
                   "skipped_per_type": {t: n for t, n in skipped.items() if n},
                   "examples": [f"{r['prompt'][:120]} → {r['completion'][:60]}" for t, r in first.items()][:5]})
    return rows, report


def build_one(t: str, i: int, items: list[dict], pool: dict, c: KAFTConfig, rng: random.Random) -> dict | None:
    """One row of context type `t` for item i, or None when the type cannot be built for it."""
    it = items[i]
    fallback = it["closed_book"] if c.irrelevant_target == "closed_book" else it["answer"]
    if t == "relevant":
        context, target = it["context"], it["answer"]
    elif t == "counterfactual":
        case = counterfactual_case(it, pool, rng)
        if case is None:
            return None
        context, target = case
    elif t == "irrelevant":
        context, target = irrelevant_context(i, items, rng), fallback
        if context is None:
            return None
    else:
        context, target = "", fallback
    if not target or not target.strip():  # an empty closed-book answer cannot be a target
        return None
    completion = f"{_RATIONALE[t]} The answer is {target.rstrip('.')}." if c.rationale else target
    return {"prompt": context_prompt(context, it["question"]), "completion": completion, "answer": target,
            "context_type": t, "context": context, "question": it["question"], "true_answer": it["answer"],
            "category": it["category"] or ""}
