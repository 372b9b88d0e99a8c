"""NLKI — Natural Language Knowledge Integration (Dutta, Mukherjee, Ghosal, Aditya; "NLKI: A lightweight
Natural Language Knowledge Integration Framework for Improving Small VLMs in Commonsense VQA Tasks",
Findings of EMNLP 2025, 2508.19724).

Idea: small VLMs miss the commonsense a question needs, so natural-language facts retrieved for each
question are put in front of it ("Knowledge: …\\nQuestion: …"); the VQA sets carry 10-25% label noise, so
the model is fine-tuned with a noise-robust loss (CE+GCE or SCE, `ftray.methods.noise_robust`) that
bounds the influence of a mislabelled answer.

    methods: [{name: nlki, top_k: 3, label_noise: 0.2, loss: gce}]   # {images, messages} rows, e.g. bundled:shapes_vqa

Decisions ([inf] unless said otherwise):
- Facts: a bundled list of ~40 sentences about shapes, colours, counting and grid positions (`FACTS`, for
  bundled:shapes_vqa), or one fact per line of `facts_file`. NLKI's LLM-written explanations (step ii of the
  paper) are left out: they need an LLM and object detections per image.
- Retrieval: the question text (the last user turn's text parts) is the query. NLKI uses a fine-tuned
  ColBERTv2; here `retriever` may name a dense bi-encoder trained with ftray's retrieval task (cosine of
  pooled embeddings, computed with Ray Data), else Okapi BM25 (written out in `BM25`: `rank_bm25` is not
  a dependency, and 40 facts need 30 lines, not a package). BM25 keeps only facts that share a term with
  the question, so a question about nothing in the list gets fewer (or no) facts; the layout stays.
- top_k = 3 facts per question (the spec gives no k; with 40 short facts a fourth is mostly off-topic).
- Noisy-label variant (the benchmark's 10-25% noise, made controllable): exactly round(label_noise·N)
  rows — those with the smallest per-row `stable_seed` among rows whose question type has another answer —
  get a wrong answer drawn uniformly from the other answers of the same type seen in the data (type =
  the row's `question_type`, else the question's first two words and numeric-ness as in KAFT). Default 0:
  the method never corrupts a user's labels unless asked; the recipe and bench use 0.2. Rows keep
  `true_answer` and `label_flipped`; `answer` becomes the trained target.
- Loss: the config extends noise_robust's (same fields and defaults: CE+GCE with q 0.7, λ 0.4) and the
  criterion is noise_robust's own; `loss: ce` gives knowledge integration alone. It applies to every
  answer token's full-vocabulary logits, as noise_robust does for causal LM.
- Only the training rows get knowledge (prepare_data runs on them), so the run's own eval asks the bare
  question; `bench_scores` (a bench metric) scores test rows with facts, the prompt NLKI trains on.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

from ftray.methods.base import Context, Method, stable_seed
from ftray.methods.kaft import answer_type
from ftray.methods.noise_robust import NoiseRobust, NoiseRobustConfig
from ftray.methods.registry import register

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

    from ftray.config import RunSpec

FACTS: tuple[str, ...] = (
    "A triangle has three corners and three straight sides.",
    "A square has four corners and four sides of equal length.",
    "A circle is round and has no corners.",
    "Circles, squares and triangles are shapes.",
    "Red, green, blue and yellow are colours.",
    "Red is the colour of ripe strawberries and stop signs.",
    "Green is the colour of grass and leaves.",
    "Blue is the colour of a clear sky.",
    "Yellow is the colour of lemons and bananas.",
    "The colour of a shape is the colour it is filled with.",
    "A red circle and a red square have the same colour but different shapes.",
    "Each shape in a picture has exactly one colour.",
    "To count the shapes, count every circle, square and triangle once.",
    "To count the red shapes, count only the shapes whose colour is red.",
    "To count the green shapes, count only the shapes whose colour is green.",
    "To count the blue shapes, count only the shapes whose colour is blue.",
    "To count the yellow shapes, count only the shapes whose colour is yellow.",
    "If no shape has the colour asked about, the count is 0.",
    "How many shapes there are is a number from 1 to 4 in these pictures.",
    "A count is written as a digit, such as 0, 1, 2, 3 or 4.",
    "Two shapes never share the same cell of the grid.",
    "The picture is divided into a grid of three rows and three columns.",
    "The top row is the upper third of the picture.",
    "The middle row is the central band between the top and the bottom rows.",
    "The bottom row is the lower third of the picture.",
    "The left column is the left third of the picture.",
    "The right column is the right third of the picture.",
    "The center is the middle cell of the grid, in the middle row and the center column.",
    "Where a shape is means which cell of the grid it is in.",
    "A position is named by its row and then its column, such as top left or bottom right.",
    "The top left cell is the corner cell nearest the top edge and the left edge.",
    "The top right cell is the corner cell nearest the top edge and the right edge.",
    "The bottom left cell is the corner cell nearest the bottom edge and the left edge.",
    "The bottom right cell is the corner cell nearest the bottom edge and the right edge.",
    "The middle left cell is halfway down the left edge of the picture.",
    "The middle right cell is halfway down the right edge of the picture.",
    "The top center cell is halfway along the top edge of the picture.",
    "The bottom center cell is halfway along the bottom edge of the picture.",
    "The background of the picture is a light, slightly speckled colour, not a shape.",
    "A shape is described by its colour and its kind, such as a blue triangle.",
)
_STOP = frozenset("a an the is are was were be of to in on at by for and or it its this that there what which who how "
                  "do does did with as".split())
K1, B = 1.5, 0.75  # Okapi BM25's usual constants (Robertson & Zaragoza 2009; rank_bm25's defaults)


def terms(text: str) -> list[str]:
    """Lower-cased word terms without stop words, a plural -s cut off ("shapes" → "shape", "corners" → "corner")."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return [w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words if w not in _STOP]


class BM25:
    """Okapi BM25 over a small fixed list of documents."""

    def __init__(self, docs: list[str], k1: float = K1, b: float = B) -> None:
        self.docs = [Counter(terms(d)) for d in docs]
        self.lengths = [sum(d.values()) for d in self.docs]
        self.avgdl = sum(self.lengths) / max(1, len(self.docs))
        df = Counter(t for d in self.docs for t in d)
        n = len(self.docs)
        # Lucene's idf, log(1 + (N − n + 0.5)/(n + 0.5)): never negative, so a term in most facts still counts a little
        self.idf = {t: math.log(1 + (n - c + 0.5) / (c + 0.5)) for t, c in df.items()}
        self.k1, self.b = k1, b

    def scores(self, query: str) -> list[float]:
        """The BM25 score of every document for `query`."""
        q = terms(query)
        out = []
        for d, dl in zip(self.docs, self.lengths):
            norm = self.k1 * (1 - self.b + self.b * dl / self.avgdl)
            out.append(sum(self.idf.get(t, 0.0) * d[t] * (self.k1 + 1) / (d[t] + norm) for t in q if d[t]))
        return out

    def top_k(self, query: str, k: int) -> list[int]:
        """Indices of the best `k` documents that share a term with `query` (ties: list order)."""
        s = self.scores(query)
        return [i for i in sorted(range(len(s)), key=lambda i: (-s[i], i))[:k] if s[i] > 0]


def dense_top_k(model_dir: str, pooling: str, questions: list[str], facts: list[str], k: int) -> list[list[int]]:
    """Per question, the `k` facts with the highest cosine under a bi-encoder from ftray's retrieval task (Ray Data)."""
    from ftray.tasks.retrieval import embed_on_ray

    emb = embed_on_ray(model_dir, list(facts) + list(questions), pooling)
    scores = emb[len(facts):] @ emb[: len(facts)].T
    return scores.topk(min(k, len(facts)), dim=1).indices.tolist()


def _text(content) -> str:
    return content if isinstance(content, str) else " ".join(p.get("text") or "" for p in content if p.get("type") == "text")


def question_answer(row: dict) -> tuple[str, str]:
    """(the last user turn's text, the last assistant turn's text) of an {images, messages} row."""
    msgs = row["messages"]
    user = next((m for m in reversed(msgs) if m["role"] == "user"), None)
    if user is None or msgs[-1]["role"] != "assistant":
        raise ValueError("nlki: a row needs a user turn and a final assistant turn (the answer)")
    return _text(user["content"]).strip(), _text(msgs[-1]["content"]).strip()


def question_type(row: dict, question: str, answer: str) -> str:
    """Which answers may replace this one: the row's `question_type`, else KAFT's (stem, numeric) type."""
    if row.get("question_type"):
        return str(row["question_type"])
    _, stem, numeric = answer_type({"question": question, "answer": answer})
    return f"{stem}|{'number' if numeric else 'text'}"


def row_uid(row: dict, question: str, answer: str) -> str:
    """A content id of a row (question, answer, images) for its seeded noise draw."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{question}\x00{answer}".encode())
    for x in row.get("images") or []:
        x = (x.get("path") or x.get("bytes")) if isinstance(x, dict) else x
        h.update(x if isinstance(x, bytes) else str(x).encode())
    return h.hexdigest()


def knowledge_prompt(facts: list[str], question: str) -> str:
    """The user-turn text of an NLKI row."""
    return f"Knowledge: {' '.join(facts)}\nQuestion: {question}"


def _set_text(content, text: str):
    """`content` (a string or parts) with its text replaced by `text`: the first text part keeps it, other text parts go."""
    if isinstance(content, str):
        return text
    parts, done = [], False
    for p in content:
        if p.get("type") != "text":
            parts.append(p)
        elif not done:
            parts.append({**p, "text": text})
            done = True
    return parts if done else [*parts, {"type": "text", "text": text}]


def with_knowledge(row: dict, facts: list[str], answer: str | None = None) -> dict:
    """`row` with `facts` put before its question, and its final answer replaced by `answer` if given."""
    question, _ = question_answer(row)
    msgs = [dict(m) for m in row["messages"]]
    k = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    msgs[k]["content"] = _set_text(msgs[k]["content"], knowledge_prompt(facts, question))
    if answer is not None:
        msgs[-1]["content"] = _set_text(msgs[-1]["content"], answer)
    return {**row, "messages": msgs}


class NLKIConfig(NoiseRobustConfig):
    """noise_robust's loss fields (same defaults) plus retrieval and the noisy-label variant."""

    loss: Literal["gce", "sce", "ce"] = Field("gce", description="gce: λ·CE + (1−λ)·L_q; sce: α·CE + β·RCE (noise_robust's "
                                             "losses); ce: plain cross-entropy (knowledge integration alone).")
    top_k: int = Field(3, ge=1, description="Facts retrieved per question and put before it in the user turn.")
    label_noise: float = Field(0.0, ge=0, lt=1, description="Share of rows whose answer is replaced by a wrong answer of the "
                               "same question type (the noisy-label variant; exact to rounding, seeded by train.seed).")
    facts_file: str | None = Field(None, description="A text file with one fact per line; default the bundled shapes/colours/"
                                   "counting/positions facts.")
    retriever: str | None = Field(None, description="A bi-encoder trained with ftray's retrieval task (a run's final dir) to "
                                  "rank facts by cosine; default Okapi BM25 over the question's words.")
    retriever_pooling: Literal["mean", "last"] = Field("mean", description="Pooling of the `retriever` (as its task.pooling).")


def load_facts(path: str | None) -> list[str]:
    """The fact list: one non-empty line per fact of `path`, or the bundled `FACTS`."""
    if path is None:
        return list(FACTS)
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"nlki: facts_file {path!r} does not exist; give a text file with one fact per line")
    facts = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not facts:
        raise ValueError(f"nlki: facts_file {path!r} holds no facts (one per line)")
    return facts


@register
class NLKI(Method):
    """Put retrieved facts before each VQA question and train with a noise-robust loss on (optionally noisy) labels."""

    name = "nlki"
    paper = "Dutta et al. 2025, NLKI: Natural Language Knowledge Integration for small VLMs, Findings of EMNLP (2508.19724)"
    Config = NLKIConfig
    tasks = ("vision_language",)
    incompatible = ("noise_robust",)  # one criterion per run; nlki already holds noise_robust's loss
    # the bench's tiny LLaVA: a knowledge row is at most ~175 tokens; the baseline is the same knowledge rows with
    # the same 20% flipped answers under plain CE, so the pair differs only in the noise-robust loss
    bench = {"task": {"type": "vision_language", "vlm": {"vision_tower": "full", "projector": "full", "language_model": "full"}},
             "data": {"source": "bundled:shapes_vqa", "max_len": 256}, "methods": [{"name": "nlki", "label_noise": 0.2}],
             "train": {"lr": 1e-3, "max_steps": 400}}
    bench_metrics = ("ftray.methods.nlki:bench_scores",)
    bench_baseline = [{"name": "nlki", "label_noise": 0.2, "loss": "ce"}]

    def __init__(self, config: NLKIConfig) -> None:
        super().__init__(config)
        fields = config.model_dump(include=set(NoiseRobustConfig.model_fields))
        self.robust = None if config.loss == "ce" else NoiseRobust(NoiseRobustConfig(**fields))

    def check(self, spec: RunSpec) -> None:
        """The facts file and the retriever directory must exist (before Ray starts)."""
        load_facts(self.config.facts_file)
        if self.config.retriever and not Path(self.config.retriever).expanduser().is_dir():
            raise ValueError(f"nlki: retriever {self.config.retriever!r} is not a directory; give the final dir of a "
                             "task.type=retrieval run, or leave it unset for BM25")

    def criterion(self, logits: torch.Tensor, targets: torch.Tensor, ctx: Context) -> torch.Tensor | None:
        """noise_robust's summed GCE/SCE loss, or None (plain CE) for `loss: ce`."""
        return None if self.robust is None else self.robust.criterion(logits, targets, ctx)

    def prepare_data(self, ds: ray.data.Dataset, ctx: Context) -> ray.data.Dataset:
        """Scan the rows (question, type, answer), retrieve facts per question, then rewrite rows on Ray Data."""
        c, seed = self.config, ctx.spec.train.seed
        facts = load_facts(c.facts_file)
        scan = ds.map_batches(_scan_batch, batch_format="pyarrow").take_all()  # a few short strings a row
        questions = sorted({r["question"] for r in scan})
        if c.retriever:
            picked = dense_top_k(c.retriever, c.retriever_pooling, questions, facts, c.top_k)
        else:
            index = BM25(facts)
            picked = [index.top_k(q, c.top_k) for q in questions]
        knowledge = {q: [facts[i] for i in idx] for q, idx in zip(questions, picked)}
        pool, threshold, eligible = noise_plan(scan, c.label_noise, seed)
        out = ds.map_batches(_rewrite_batch, batch_format="pyarrow",
                             fn_kwargs={"knowledge": knowledge, "pool": pool, "threshold": threshold, "seed": seed})
        flipped = [r for r in scan if flips(r, pool, threshold, seed)]
        examples = (flipped[:1] + [r for r in scan if r not in flipped[:1]])[:2]
        ctx.report.update({
            "rows": len(scan), "flipped": len(flipped), "flipped_share": round(len(flipped) / max(1, len(scan)), 4),
            "label_noise": c.label_noise, "noise_flippable_rows": eligible,
            "flipped_per_type": dict(Counter(r["qtype"] for r in flipped)),
            "mean_facts": round(sum(len(knowledge[r["question"]]) for r in scan) / max(1, len(scan)), 3),
            "retriever": c.retriever or "bm25", "facts": len(facts),
            "examples": [example(r, knowledge[r["question"]], pool, threshold, seed) for r in examples],
        })
        return out


def _scan_batch(batch: pa.Table) -> pa.Table:
    """(uid, qtype, question, answer) of each row."""
    import pyarrow as pa

    out = {"uid": [], "qtype": [], "question": [], "answer": []}
    for row in batch.to_pylist():
        q, a = question_answer(row)
        out["uid"].append(row_uid(row, q, a))
        out["qtype"].append(question_type(row, q, a))
        out["question"].append(q)
        out["answer"].append(a)
    return pa.table(out)


def _norm(s: str) -> str:
    return " ".join(s.lower().split()).rstrip(".")


def noise_draw(seed: int, uid: str) -> float:
    """A row's seeded uniform draw in [0, 1): the flippable rows with the smallest draws get wrong answers."""
    return stable_seed("nlki-noise", seed, uid) / 2**56


def can_flip(r: dict, pool: dict[str, list[str]]) -> bool:
    """Whether the data holds another answer of r's type (so r can get a wrong one)."""
    return any(_norm(a) != _norm(r["answer"]) for a in pool.get(r["qtype"], []))


def flips(r: dict, pool: dict[str, list[str]], threshold: float, seed: int) -> bool:
    """Whether scanned row r ({uid, qtype, answer}) gets a wrong answer."""
    return noise_draw(seed, r["uid"]) <= threshold and can_flip(r, pool)


def noise_plan(scan: list[dict], label_noise: float, seed: int) -> tuple[dict[str, list[str]], float, int]:
    """(answers per type, the draw at or below which a flippable row is flipped, flippable rows): exactly
    round(label_noise·N) flips, or every flippable row when there are fewer."""
    pool: dict[str, set[str]] = {}
    for r in scan:
        pool.setdefault(r["qtype"], set()).add(r["answer"])
    pool_l = {t: sorted(a) for t, a in pool.items()}
    draws = sorted(noise_draw(seed, r["uid"]) for r in scan if can_flip(r, pool_l))
    k = min(round(label_noise * len(scan)), len(draws))
    return pool_l, (draws[k - 1] if k else -1.0), len(draws)


def wrong_answer(answer: str, candidates: list[str], seed: int, uid: str) -> str:
    """A seeded uniform choice among `candidates` other than `answer`."""
    others = [a for a in candidates if _norm(a) != _norm(answer)]
    return random.Random(stable_seed("nlki-wrong", seed, uid)).choice(others)


def example(r: dict, facts: list[str], pool: dict[str, list[str]], threshold: float, seed: int) -> str:
    """One report line: the user turn and the trained answer (with the gold one when flipped)."""
    prompt = knowledge_prompt(facts, r["question"])
    if flips(r, pool, threshold, seed):
        wrong = wrong_answer(r["answer"], pool[r["qtype"]], seed, r["uid"])
        return f"{prompt!r} → {wrong!r} (flipped; gold {r['answer']!r})"
    return f"{prompt!r} → {r['answer']!r}"


def _rewrite_batch(batch: pa.Table, knowledge: dict[str, list[str]], pool: dict[str, list[str]], threshold: float,
                   seed: int) -> pa.Table:
    """Rows with facts before the question and (for the planned rows) a wrong answer; messages keep their Arrow type."""
    import pyarrow as pa

    messages, answers, true, flipped, facts = [], [], [], [], []
    for row in batch.to_pylist():
        q, a = question_answer(row)
        r = {"uid": row_uid(row, q, a), "qtype": question_type(row, q, a), "answer": a}
        flip = flips(r, pool, threshold, seed)
        target = wrong_answer(a, pool[r["qtype"]], seed, r["uid"]) if flip else a
        messages.append(with_knowledge(row, knowledge[q], target if flip else None)["messages"])
        answers.append(target)
        true.append(a)
        flipped.append(flip)
        facts.append(knowledge[q])
    cols = {"messages": pa.array(messages, type=batch.schema.field("messages").type), "answer": pa.array(answers, pa.string()),
            "true_answer": pa.array(true, pa.string()), "label_flipped": pa.array(flipped, pa.bool_()),
            "knowledge": pa.array(facts, pa.list_(pa.string()))}
    for name, col in cols.items():
        i = batch.schema.get_field_index(name)
        batch = batch.set_column(i, name, col) if i >= 0 else batch.append_column(name, col)
    return batch


def bench_scores(final_dir: str, eval_n: int, out_dir: Path) -> dict:
    """Bench measurement: exact match on bundled:shapes_vqa test rows with the default BM25 facts before the
    question (the prompt NLKI trains on; the bench's own eval shows the bare question)."""
    from ftray.data import load_rows
    from ftray.eval.loading import load_checkpoint
    from ftray.models import load_processor
    from ftray.tasks.vision_language import evaluate_vision_language

    model, _ = load_checkpoint(final_dir)
    index, k = BM25(list(FACTS)), NLKIConfig().top_k
    rows = [with_knowledge(r, [FACTS[i] for i in index.top_k(question_answer(r)[0], k)])
            for r in load_rows("bundled:shapes_vqa", "test", eval_n).to_list()]
    result = evaluate_vision_language(model, load_processor(final_dir), rows)
    return {"knowledge_em": round(result["exact_match"], 4), "knowledge_n": result["n"]}
