"""Metacognition SFT — Improving Metacognition and Uncertainty Communication in Language Models
(Steyvers, Belem, Smyth, 2510.05126, 2025).

Plain SFT on confidence targets built from the model's own answer consistency: sample K answers per
question, take the modal answer â and its agreement c = #{samples = â}/K, bin the questions by c, and
train the model to state its modal answer with the bin's empirical accuracy (± a little noise) as its
confidence (single-question task). A second task pairs questions from different bins and trains the model
to name the one it is more confident about (pairwise task); the two are mixed (multitask).

    methods: [{name: metacognition}]                                   # K=10 at T=1, 10 bins, 500 pairs/domain
    methods: [{name: metacognition, num_samples: 5, n_bins: 5}]       # the spec's small-scale check

Decisions (the paper's code is not public; targets follow the third-party re-implementation [3rd]):
- Answers are compared after `ftray.eval.confidence.answer_key` (the first sentence's core, normalised):
  the paper's "normalised string" for open-ended answers; correctness of â is `answer_correct` (whole-word
  gold ⊂ answer) instead of the paper's GPT-4o judge [inf].
- Domains are the values of `domain_column` (a `data.sources` run's `source`); without it, one domain.
  Bin accuracies and pairs are per domain [inf].
- Over-represented bins are subsampled to at most `bin_cap` × (questions / non-empty bins) [inf: the
  re-implementation subsamples "so the targets are not dominated by c = 1"].
- Out come chat rows (system, user, assistant) with `task` ("single" | "pair") and `confidence` (the
  single target, or the pair's higher one), shuffled with the run's seed.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from typing import TYPE_CHECKING

from pydantic import Field

from ftray.data.formats import format_of_columns, format_prompt, reference_answer
from ftray.eval.confidence import answer_correct, answer_key, short_answer
from ftray.methods.base import Context, Method, MethodConfig
from ftray.methods.registry import register

if TYPE_CHECKING:
    import ray.data

    from ftray.config import RunSpec

SINGLE_SYSTEM = ("When answering a question, provide the answer and a confidence score between 0 and 1 for the answer.")
PAIR_SYSTEM = "Compare your confidence in answering two questions correctly."
PAIR_QUESTION = ("Determine for which of the two following questions, your confidence score is higher.\nQ1. {q1}\nQ2. {q2}\n"
                 "Is your confidence in answering correctly higher for question Q1 or question Q2?")


def single_target(answer: str, confidence: float) -> str:
    """The single-question reply: "The answer is â and my confidence score is 0.xx." """
    return f"The answer is {answer.rstrip('.')} and my confidence score is {confidence:.2f}."


class MetacognitionConfig(MethodConfig):
    num_samples: int = Field(10, ge=2, description="K answers sampled per training question (paper: 10).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (paper: 1.0).")
    max_new_tokens: int = Field(24, ge=1, description="Tokens per sampled answer (short answers; cut at the first sentence).")
    n_bins: int = Field(10, ge=2, description="Consistency bins over c ∈ [0, 1] whose accuracy becomes the target (paper: 10).")
    noise: float = Field(0.05, ge=0, lt=0.5, description="Targets are bin accuracy + U(−noise, noise), clipped to [0, 1] (paper: 0.05).")
    bin_cap: float | None = Field(2.0, gt=0, description="A bin keeps at most bin_cap × (questions / non-empty bins) "
                                  "questions of its domain (null: keep all).")
    pairs_per_domain: int = Field(500, ge=0, description="Pairwise examples per domain (paper: 500); 0 = single-question task only.")
    domain_column: str = Field("source", description="Column naming each row's domain (missing: one domain).")


@register
class Metacognition(Method):
    """Sample K answers, bin by agreement, train "The answer is â and my confidence score is t" + pairwise picks."""

    name = "metacognition"
    paper = "Steyvers, Belem, Smyth 2025, Improving Metacognition and Uncertainty Communication in Language Models (2510.05126)"
    Config = MetacognitionConfig
    # the spec's small-scale check (K=5, 5 bins) on 160 questions: sampling 10 answers for all 500 takes hours on 2 CPU cores
    bench = {"data": {"source": "bundled:factual_qa", "max_len": 512, "max_samples": 160}, "train": {"lr": 1e-4},
             "methods": [{"name": "metacognition", "num_samples": 5, "n_bins": 5, "max_new_tokens": 16}]}
    bench_metrics = ("ftray.eval.confidence_bench:metacognition",)

    def check(self, spec: RunSpec) -> None:
        """The rewritten rows are chat rows, which a fixed other data.format would misread."""
        if spec.data.format not in ("auto", "chat"):
            raise ValueError(f"{self.name} writes chat rows; set data.format=auto (got {spec.data.format!r})")

    def prepare_data(self, ds: ray.data.Dataset, ctx: Context) -> ray.data.Dataset:
        """Sample answers on Ray Data, then build calibrated single and pairwise rows on the driver."""
        import ray.data

        from ftray.data.inference import Answerer, map_model

        c = self.config
        fmt = ctx.spec.data.format if ctx.spec.data.format != "auto" else format_of_columns(ds.columns())
        rows = map_model(ds, Answerer, ctx, num_samples=c.num_samples, temperature=c.temperature,
                         max_new_tokens=c.max_new_tokens).take_all()
        rng = random.Random(ctx.spec.train.seed)
        scored = [self.score(r, fmt) for r in rows]
        by_domain: dict[str, list[dict]] = defaultdict(list)
        for s in scored:
            by_domain[s["domain"]].append(s)
        out, report = [], {}
        for domain, items in sorted(by_domain.items()):
            items = calibrate(items, c.n_bins, c.noise, c.bin_cap, rng)
            pairs = make_pairs(items, c.pairs_per_domain, rng)
            out += [single_row(s) for s in items] + [pair_row(a, b, rng) for a, b in pairs]
            report[domain] = {"questions": len(items), "pairs": len(pairs),
                              "bin_accuracy": {str(b): round(a, 3) for b, a in sorted(bin_accuracy(items).items())}}
        rng.shuffle(out)
        ctx.report.update({"domains": report, "single": sum(r["task"] == "single" for r in out),
                           "pair": sum(r["task"] == "pair" for r in out),
                           "examples": [r["messages"][-1]["content"][:120] for r in out[:4]]})
        return ray.data.from_items(out)

    def score(self, r: dict, fmt: str) -> dict:
        """Modal answer â, consistency c, correctness of â and the consistency bin of one question."""
        keys = [answer_key(a) for a in r["answers"]]
        modal, count = Counter(keys).most_common(1)[0]  # ties: the first sampled among the most frequent
        shown = short_answer(next(a for a, k in zip(r["answers"], keys) if k == modal))
        consistency = count / len(keys)
        return {"prompt": format_prompt(r, fmt), "answer": shown, "consistency": consistency,
                "correct": answer_correct(shown, reference_answer(r, fmt)),
                "bin": min(int(consistency * self.config.n_bins - 1e-9), self.config.n_bins - 1),
                "domain": str(r.get(self.config.domain_column) or "all")}


def bin_accuracy(items: list[dict]) -> dict[int, float]:
    """Empirical accuracy of each consistency bin."""
    hits: dict[int, list[bool]] = defaultdict(list)
    for s in items:
        hits[s["bin"]].append(s["correct"])
    return {b: sum(v) / len(v) for b, v in hits.items()}


def calibrate(items: list[dict], n_bins: int, noise: float, cap: float | None, rng: random.Random) -> list[dict]:
    """Subsample crowded bins, then set each question's target = its bin's accuracy ± U(noise), 2 decimals."""
    by_bin: dict[int, list[dict]] = defaultdict(list)
    for s in items:
        by_bin[s["bin"]].append(s)
    if cap is not None:
        limit = math.ceil(cap * len(items) / len(by_bin))
        by_bin = {b: (rng.sample(v, limit) if len(v) > limit else v) for b, v in by_bin.items()}
    kept = [s for b in sorted(by_bin) for s in by_bin[b]]
    acc = bin_accuracy(kept)  # after subsampling: the accuracy of the questions actually trained on
    for s in kept:
        s["target"] = round(min(1.0, max(0.0, acc[s["bin"]] + rng.uniform(-noise, noise))), 2)
    return kept


def make_pairs(items: list[dict], n: int, rng: random.Random) -> list[tuple[dict, dict]]:
    """Up to `n` pairs of questions from different bins with different targets, higher target first."""
    if len({s["bin"] for s in items}) < 2:
        return []
    pairs, tries = [], 0
    while len(pairs) < n and tries < 20 * n:
        tries += 1
        a, b = rng.sample(items, 2)
        if a["bin"] == b["bin"] or a["target"] == b["target"]:
            continue  # ties skipped: a pair needs a clear answer
        pairs.append((a, b) if a["target"] > b["target"] else (b, a))
    return pairs


def single_row(s: dict) -> dict:
    """The single-question example: system prompt, the question, "The answer is â and my confidence score is t." """
    user = next(m["content"] for m in reversed(s["prompt"]) if m["role"] == "user")
    return {"messages": [{"role": "system", "content": SINGLE_SYSTEM}, {"role": "user", "content": user},
                         {"role": "assistant", "content": single_target(s["answer"], s["target"])}],
            "task": "single", "confidence": s["target"]}


def pair_row(high: dict, low: dict, rng: random.Random) -> dict:
    """The pairwise example with the higher-target question at a random position (Q1 or Q2)."""
    q = {k: next(m["content"] for m in reversed(s["prompt"]) if m["role"] == "user") for k, s in (("h", high), ("l", low))}
    first_high = rng.random() < 0.5
    q1, q2 = (q["h"], q["l"]) if first_high else (q["l"], q["h"])
    return {"messages": [{"role": "system", "content": PAIR_SYSTEM},
                         {"role": "user", "content": PAIR_QUESTION.format(q1=q1, q2=q2)},
                         {"role": "assistant", "content": f"The answer is {'Q1' if first_high else 'Q2'}."}],
            "task": "pair", "confidence": high["target"]}
