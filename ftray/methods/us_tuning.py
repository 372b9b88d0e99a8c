"""US-Tuning — Know the Unknown: An Uncertainty-Sensitive Method for LLM Instruction Tuning
(Li, Tang, Yang, Findings of ACL 2025, 2406.10099).

Two SFT stages for contextual QA. Stage 1 (uncertainty recognition) trains a binary judgement: is the
context Sufficient or Insufficient for the question? That makes the model over-refuse, so stage 2
(prompt-sensitive tuning) replays the stage-1 rows mixed with QA rows whose prompt carries an extra
"causal" instruction at a random place in its instruction block; the target answers, then reviews every
instruction under CHECKING (`<fulfilled>` / `<not fulfilled>`) and revises the answer when one was missed.

    methods: [{name: us_tuning}]     # one run: phase "recognition", then phase "prompt_sensitive"

Decisions:
- One run, two phases (`phases()`): stage 2 continues from the stage-1 weights, as the paper's second
  adapter does. The prepared rows carry `task_type` 0 (stage-1 judgement) or 1 (prompt-sensitive QA);
  during "recognition" `corrupt_batch` masks the labels of type-1 rows, so stage 1 learns from stage-1
  rows only and stage 2 from the whole mix (the paper's Cognition_PSQA = stage-1 rows + QA rows).
  `recognition_fraction` splits the steps like one epoch per stage: 2T stage-1 rows, then 3T rows [inf].
- Full fine-tuning: the paper trains a LoRA adapter per stage (the second on the merged first); ftray's
  lora would wrap the model again at the phase switch and its export could not hold both, so us_tuning
  refuses lora (and loramoe, which gives task_type another meaning).
- Data from any question/answer rows (bundled factual QA in the bench) instead of ASQA/HotpotQA: a
  context is `notes` short Q/A notes; the positive query's own note is in it, the negative query is
  another question (of the same `category` when rows have one, like ASQA's sibling questions) whose gold
  answer occurs nowhere in the context [inf, the spec's small-scale check].
- Targets are scripted, not written by GPT-4-Turbo: every causal instruction is a checkable formatting
  rule with a function that applies it, so the review's verdicts are true by construction. A share
  `draft_miss` of rows first drafts the plain answer, marks the rule `<not fulfilled>` and revises [inf].
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING, Callable

import torch
from pydantic import Field

from ftray.data.formats import format_of_columns, format_prompt, reference_answer
from ftray.data.tokenize import IGNORE_INDEX, TASK_TYPE
from ftray.methods.base import Context, Method, MethodConfig, Phase
from ftray.methods.registry import register

if TYPE_CHECKING:
    import ray.data

    from ftray.config import RunSpec

STAGE1, STAGE2 = 0, 1  # task_type of a recognition row / a prompt-sensitive QA row
SUFFICIENT, INSUFFICIENT = "Sufficient", "Insufficient"
NOT_PROVIDED = "Not Provided"
COGNITION = (
    "Judge whether the context is sufficient to answer the question. You must not use additional knowledge: only "
    "the context counts. Reply with 'Sufficient' if the context contains the answer, otherwise 'Insufficient'.\n\n"
    "Example:\nContext: This is a passage of reference notes:\nQ: What colour is a ripe banana? A: Yellow.\n"
    "Question: What colour is a ripe lemon?\nJudgement: Insufficient\n\n"
    "Context: {context}\nQuestion: {query}\nJudgement:"
)
REQUIREMENTS = (  # the QA instruction block: 5 sentences, the last one the refusal rule
    "Answer the question using only the information in the context.",
    "Do not use any knowledge that is not in the context.",
    "Give a short answer, not a full sentence.",
    "Write the final answer after 'ANSWER:'.",
    f"If the context is not sufficient to answer the question, answer it with '{NOT_PROVIDED}'.",
)
REVIEW = ("After the answer, write 'CHECKING:' and repeat each requirement above followed by <fulfilled> or "
          "<not fulfilled>; if any is not fulfilled, write a revised 'ANSWER:'.")
CAUSAL: dict[str, Callable[[str], str]] = {  # a causal instruction and how an answer fulfils it
    "Write the answer in capital letters.": str.upper,
    "Write the answer in lower case letters.": str.lower,
    "Put the answer in double quotes.": lambda a: f'"{a}"',
    "End the answer with an exclamation mark.": lambda a: f"{a}!",
    "Put the answer in square brackets.": lambda a: f"[{a}]",
}


class USTuningConfig(MethodConfig):
    recognition_fraction: float = Field(0.4, gt=0, lt=1, description="Share of the steps in stage 1 (uncertainty "
                                        "recognition); the rest is stage 2 (paper: 1 epoch per stage over 2T and 3T rows → 0.4).")
    notes: int = Field(3, ge=1, description="Q/A notes per context: the positive question's own note plus distractors [inf].")
    draft_miss: float = Field(0.5, ge=0, le=1, description="Share of prompt-sensitive targets whose first draft misses "
                              "the causal instruction and is revised after CHECKING [inf].")
    qa_per_tuple: int = Field(1, ge=0, le=1, description="Prompt-sensitive QA rows per (positive, negative) tuple "
                              "(paper: one per tuple in the interleaved stage-2 set).")


def note(question: str, answer: str) -> str:
    """One line of a context: the fact as a question and its answer."""
    return f"Q: {question} A: {answer.rstrip('.')}."


def mentions(text: str, answer: str) -> bool:
    """Whether `answer` occurs in `text` as whole words, case-insensitively (the paper's lower-cased substring test)."""
    return bool(answer.strip()) and re.search(rf"(?<!\w){re.escape(answer.strip().lower())}(?!\w)", text.lower()) is not None


def context_text(facts: list[tuple[str, str]]) -> str:
    """A context: a header (the paper's "This is a passage about …:") and one note per fact."""
    return "This is a passage of reference notes:\n" + "\n".join(note(q, a) for q, a in facts)


def build_tuples(items: list[dict], notes: int, rng: random.Random) -> list[dict]:
    """For each item {question, answer, category}: a context holding its note and `notes`-1 distractors, the
    positive query (its question) and a negative query whose answer occurs nowhere in that context."""
    tuples = []
    for i, it in enumerate(items):
        others = [j for j in range(len(items)) if j != i and items[j]["question"] != it["question"]]
        distractors = rng.sample(others, min(notes - 1, len(others)))
        facts = [(items[j]["question"], items[j]["answer"]) for j in [i, *distractors]]
        rng.shuffle(facts)
        ctx = context_text(facts)
        free = [j for j in others if j not in distractors and not mentions(ctx, items[j]["answer"])]
        siblings = [j for j in free if items[j]["category"] == it["category"]]  # a related question, like ASQA's
        if not free:
            continue
        neg = items[rng.choice(siblings or free)]
        tuples.append({"context": ctx, "question": it["question"], "answer": it["answer"],
                       "negative": neg["question"], "negative_answer": neg["answer"]})
    return tuples


def qa_prompt(context: str, question: str, causal: str | None = None, slot: int = 5, review: bool = False) -> str:
    """The QA prompt: the requirement block (with `causal` inserted after sentence `slot`), optionally the
    CHECKING request, then the context and the question. Without `causal` and `review`: the plain prompt."""
    block = list(REQUIREMENTS)
    if causal:
        block.insert(slot, causal)
    text = "\n".join(block) + (f"\n{REVIEW}" if review else "")
    return f"{text}\n\nContext: {context}\nQuestion: {question}"


def checked_target(answer: str, causal: str, slot: int, miss: bool) -> str:
    """The scripted prompt-sensitive reply: ANSWER, CHECKING with one verdict per requirement, revised ANSWER if missed."""
    final = CAUSAL[causal](answer)
    draft = answer if miss and answer != final else final
    block = list(REQUIREMENTS)
    block.insert(slot, causal)
    verdicts = [f"{s} <not fulfilled>" if s == causal and draft != final else f"{s} <fulfilled>" for s in block]
    revised = f"\nANSWER: {final}" if draft != final else ""
    return f"ANSWER: {draft}\nCHECKING:\n" + "\n".join(verdicts) + revised


def parse_qa_answer(text: str) -> str:
    """The answer of a QA reply: after its last line-initial 'ANSWER:', without the CHECKING part (else its first line)."""
    found = re.findall(r"(?:^|\n)\s*ANSWER:[ \t]*([^\n]*)", text)  # line-initial: a requirement quoting 'ANSWER:' is not one
    text = found[-1] if found else text
    return text.split("CHECKING", 1)[0].strip().split("\n", 1)[0].strip()


@register
class USTuning(Method):
    """Stage 1: Sufficient/Insufficient judgements; stage 2: those replayed with prompt-sensitive QA (scripted CHECKING)."""

    name = "us_tuning"
    paper = "Li, Tang, Yang 2025, Know the Unknown: An Uncertainty-Sensitive Method for LLM Instruction Tuning (Findings of ACL, 2406.10099)"
    Config = USTuningConfig
    incompatible = ("lora", "loramoe")
    bench = {"data": {"source": "bundled:factual_qa", "max_len": 512}, "train": {"lr": 1e-4}}
    bench_metrics = ("ftray.eval.confidence_bench:us_tuning",)

    def check(self, spec: RunSpec) -> None:
        """Stage 1 tells its rows apart by task_type, which packed rows do not carry; the rows are prompt/completion."""
        if spec.data.format not in ("auto", "prompt_completion"):
            raise ValueError(f"us_tuning writes prompt_completion rows; set data.format=auto (got {spec.data.format!r})")
        if spec.data.packing:
            raise ValueError("us_tuning marks stage-1 and stage-2 rows with task_type, which packing drops; set data.packing=false")

    def phases(self) -> list[Phase]:
        """Uncertainty recognition, then prompt-sensitive tuning from its weights."""
        f = self.config.recognition_fraction
        return [Phase("recognition", f), Phase("prompt_sensitive", 1 - f)]

    def prepare_data(self, ds: ray.data.Dataset, ctx: Context) -> ray.data.Dataset:
        """Build (context, positive, negative) tuples and their stage-1 and prompt-sensitive rows, interleaved."""
        import ray.data

        c = self.config
        fmt = ctx.spec.data.format if ctx.spec.data.format != "auto" else format_of_columns(ds.columns())
        items = [question_item(r, fmt) for r in ds.take_all()]  # no model inference: the rows are small
        rng = random.Random(ctx.spec.train.seed)
        tuples = build_tuples(items, c.notes, rng)
        out: list[dict] = []
        for t in tuples:  # per tuple: positive judgement, negative judgement, one QA row (the paper's interleaving)
            out.append(row(COGNITION.format(context=t["context"], query=t["question"]), SUFFICIENT, STAGE1))
            out.append(row(COGNITION.format(context=t["context"], query=t["negative"]), INSUFFICIENT, STAGE1))
            if c.qa_per_tuple:
                causal, slot = rng.choice(sorted(CAUSAL)), rng.randint(1, len(REQUIREMENTS))
                target = checked_target(t["answer"], causal, slot, rng.random() < c.draft_miss)
                out.append(row(qa_prompt(t["context"], t["question"], causal, slot, review=True), target, STAGE2))
        ctx.report.update({"tuples": len(tuples), "dropped": len(items) - len(tuples),
                           "stage1_rows": 2 * len(tuples), "stage2_qa_rows": len(out) - 2 * len(tuples),
                           "examples": [o["completion"][:160] for o in out[:3]]})
        return ray.data.from_items(out)

    def corrupt_batch(self, batch: dict[str, torch.Tensor], ctx: Context) -> dict[str, torch.Tensor]:
        """During "recognition", take the prompt-sensitive rows out of the loss (stage 1 sees stage-1 rows only)."""
        if ctx.phase != "recognition" or TASK_TYPE not in batch:
            return batch
        qa = (batch[TASK_TYPE] == STAGE2).view(-1, 1)
        return {**batch, "labels": batch["labels"].masked_fill(qa, IGNORE_INDEX)}


def question_item(r: dict, fmt: str) -> dict:
    """{question, answer, category} of one training row (its last user turn and gold answer)."""
    user = next(m["content"] for m in reversed(format_prompt(r, fmt)) if m["role"] == "user")
    return {"question": user, "answer": str(reference_answer(r, fmt)).strip(), "category": r.get("category")}


def row(prompt: str, completion: str, stage: int) -> dict:
    """A prompt/completion training row tagged with its stage."""
    return {"prompt": prompt, "completion": completion, TASK_TYPE: stage}
