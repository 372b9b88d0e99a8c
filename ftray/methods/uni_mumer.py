"""Uni-MuMER (Li et al., "Unified Multi-Task Fine-Tuning of Vision-Language Model for Handwritten
Mathematical Expression Recognition", NeurIPS 2025, 2505.23566).

Idea: no architecture change; plain full fine-tuning of a VLM on one training set that mixes four
prompt-distinguished tasks built from the same (image, LaTeX) pairs:
- vanilla: image → LaTeX;
- Tree-CoT: image → the expression's tree (serialised), then the LaTeX;
- error-driven learning (EDL): image + an erroneous LaTeX reading → its errors, then the corrected LaTeX;
- symbol counting (SC): image → how often each symbol occurs, then the LaTeX.
Loss is plain CE on the reply; at test time the model is asked the vanilla prompt.

    methods: [{name: uni_mumer}]      # rows: bundled:math_images ({images, messages, latex, tree, symbols})

Decisions ([inf] in the spec unless said otherwise):
- Each task's ratio is rows per source image (default 1 each: every image appears once in every task, the
  paper's "unified" set); fractions draw that share of the images without repetition (seeded).
- Tree and symbol counts come from the row's `tree` / `symbols` columns (the bundled generator keeps them);
  rows without them get no Tree-CoT / SC rows (counted in the report).
- EDL's wrong readings: the paper uses models trained on the other folds (cross-fold inference). Training
  fold models inside data preparation is out of budget on CPU, so `error_model` takes such a model (a
  checkpoint of an earlier run on another fold) and its greedy readings are used through Ray Data
  (`VLMAnswerer`); a reading that is already right, or no `error_model`, falls back to a synthetic near
  miss: 1..`max_edits` seeded token edits (substitute / delete / insert a token from the row's own
  vocabulary of symbols), the kind of error an out-of-fold model makes.
- The error description is the token alignment (difflib) of reading vs truth: "'x' should be 'y'",
  "missing '+'", "extra '2'"; the reply ends with "LaTeX: <truth>" in every CoT task, and `final_latex`
  takes that line back out for scoring.
- Metrics (`hmer_scores`): ExpRate (exact match of space-tokenised LaTeX), ExpRate with ≤1 and ≤2 token
  edits, and CER (character edit distance / reference length), as in the authors' metrics script.
"""

from __future__ import annotations

import difflib
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from ftray.methods.base import Context, Method, MethodConfig, stable_seed
from ftray.methods.registry import register

if TYPE_CHECKING:
    import ray.data

TASKS = ("vanilla", "tree_cot", "edl", "symbol_counting")
PROMPTS = {
    "vanilla": "Write the LaTeX of the expression in the image.",
    "tree_cot": "Parse the expression in the image into its tree, then write its LaTeX.",
    "edl": "A reader transcribed this image as: {reading}\nFind its errors, then write the correct LaTeX.",
    "symbol_counting": "Count the symbols in the image, then write its LaTeX.",
}


class UniMuMERConfig(MethodConfig):
    """Task mixture and EDL error source of Uni-MuMER (the paper's four tasks, one row each per image)."""

    vanilla: float = Field(1.0, ge=0, description="Vanilla HMER rows (image → LaTeX) per source image.")
    tree_cot: float = Field(1.0, ge=0, description="Tree-CoT rows (image → tree, then LaTeX) per source image.")
    edl: float = Field(1.0, ge=0, description="Error-driven-learning rows (image + wrong reading → errors, then LaTeX) per source image.")
    symbol_counting: float = Field(1.0, ge=0, description="Symbol-counting rows (image → symbol counts, then LaTeX) per source image.")
    error_model: str | None = Field(None, description="EDL readings from this model (a run on another data fold, the paper's "
                                    "cross-fold inference), greedy on Ray Data; None = synthetic near misses only.")
    max_edits: int = Field(2, ge=1, description="Synthetic wrong readings: 1..max_edits seeded token edits of the truth.")


def token_edits(a: list[str], b: list[str]) -> int:
    """Levenshtein distance between two token (or character) sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def final_latex(reply: str) -> str:
    """The LaTeX of a reply: the text after its last "LaTeX:" (CoT tasks), else the whole reply, space-normalised."""
    text = reply.rsplit("LaTeX:", 1)[-1] if "LaTeX:" in reply else reply
    return " ".join(text.split())


def hmer_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """ExpRate, ExpRate ≤1 / ≤2 token edits (in %), and CER, of replies against reference LaTeX."""
    dist, chars, ref_chars = [], 0, 0
    for p, r in zip(predictions, references):
        p, r = final_latex(p), " ".join(r.split())
        dist.append(token_edits(p.split(), r.split()))
        chars += token_edits(list(p.replace(" ", "")), list(r.replace(" ", "")))
        ref_chars += len(r.replace(" ", ""))
    n = max(1, len(dist))
    return {"exprate": 100 * sum(d == 0 for d in dist) / n, "exprate_le1": 100 * sum(d <= 1 for d in dist) / n,
            "exprate_le2": 100 * sum(d <= 2 for d in dist) / n, "cer": chars / max(1, ref_chars)}


def synthetic_error(latex: str, rng: random.Random, max_edits: int, vocab: list[str]) -> str:
    """`latex` with 1..max_edits token edits (substitute, delete or insert a token of `vocab`); never the truth."""
    truth = latex.split()
    for _ in range(20):
        toks = list(truth)
        for _ in range(rng.randint(1, max_edits)):
            op = rng.choice(("sub", "del", "ins") if len(toks) > 1 else ("sub", "ins"))
            i = rng.randrange(len(toks))
            if op == "sub":
                toks[i] = rng.choice([v for v in vocab if v != toks[i]] or ["?"])
            elif op == "del":
                del toks[i]
            else:
                toks.insert(i, rng.choice(vocab))
        if toks != truth:
            return " ".join(toks)
    return " ".join(truth + ["?"])


def describe_errors(reading: str, truth: str) -> str:
    """The token-level differences of `reading` from `truth`, as short sentences ("no errors" if equal)."""
    a, b = reading.split(), truth.split()
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        got, want = " ".join(a[i1:i2]), " ".join(b[j1:j2])
        if op == "replace":
            out.append(f"'{got}' should be '{want}'")
        elif op == "delete":
            out.append(f"extra '{got}'")
        elif op == "insert":
            out.append(f"missing '{want}'")
    return "; ".join(out) or "no errors"


def symbol_line(symbols: list[dict]) -> str:
    """"Symbols: 9×1, x×2, ..." from the row's per-symbol counts."""
    return "Symbols: " + ", ".join(f"{s['symbol']}×{s['count']}" for s in symbols)


def task_row(row: dict, task: str, reading: str | None = None) -> dict:
    """One {images, messages} row of `task` for a math image row (`reading`: EDL's wrong transcription)."""
    latex = row["latex"]
    if task == "vanilla":
        prompt, reply = PROMPTS[task], latex
    elif task == "tree_cot":
        prompt, reply = PROMPTS[task], f"Tree: {row['tree']}\nLaTeX: {latex}"
    elif task == "edl":
        prompt, reply = PROMPTS[task].format(reading=reading), f"Errors: {describe_errors(reading, latex)}\nLaTeX: {latex}"
    else:
        prompt, reply = PROMPTS[task], f"{symbol_line(row['symbols'])}\nLaTeX: {latex}"
    return {"images": list(row["images"]), "latex": latex, "task": task,
            "messages": [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": prompt}]},
                         {"role": "assistant", "content": [{"type": "text", "text": reply}]}]}


def draw(n: int, ratio: float, rng: random.Random) -> list[int]:
    """Indices for `ratio` rows per item: whole passes for the integer part, a seeded sample without repetition for the rest."""
    whole, frac = int(ratio), ratio - int(ratio)
    return [i for _ in range(whole) for i in range(n)] + sorted(rng.sample(range(n), round(frac * n)))


@register
class UniMuMER(Method):
    """One SFT set mixing vanilla, Tree-CoT, error-driven and symbol-counting tasks on the same images."""

    name = "uni_mumer"
    paper = "Li et al. 2025, Uni-MuMER: Unified Multi-Task Fine-Tuning of VLMs for HMER (2505.23566, NeurIPS 2025)"
    Config = UniMuMERConfig
    tasks = ("vision_language",)
    # the tiny random LLaVA where no real VLM is reachable (see `ftray bench methods --vlm-model`); the
    # baseline is vanilla SFT on the same images, same steps
    bench = {"task": {"type": "vision_language", "vlm": {"vision_tower": "full", "projector": "full", "language_model": "full"}},
             "data": {"source": "bundled:math_images", "max_len": 160}, "train": {"lr": 1e-3, "max_steps": 400}}
    bench_metrics = ("ftray.methods.uni_mumer:bench_scores",)

    def check(self, spec: Any) -> None:
        """The four ratios cannot all be zero."""
        c = self.config
        if not any(getattr(c, t) for t in TASKS):
            raise ValueError("methods.uni_mumer: every task ratio is 0; set at least one of " + ", ".join(TASKS))

    def prepare_data(self, ds: ray.data.Dataset, ctx: Context) -> ray.data.Dataset:
        """Build the four tasks' rows from the math image rows (EDL readings from `error_model` on Ray Data if set)."""
        import ray.data

        c = self.config
        if c.error_model and c.edl:
            from ftray.data.inference import map_model
            from ftray.data.vlm_inference import VLMAnswerer

            ds = map_model(ds, VLMAnswerer, ctx, model=c.error_model, max_new_tokens=64)
        rows = ds.take_all()
        missing = [i for i, r in enumerate(rows, 1) if not r.get("latex")]
        if missing:
            raise ValueError(f"uni_mumer: rows {missing[:5]} have no `latex` column (use bundled:math_images or add it)")
        rng = random.Random(stable_seed(ctx.spec.train.seed, "uni_mumer"))
        vocab = sorted({t for r in rows for t in r["latex"].split()})
        out, counts, from_model, skipped = [], dict.fromkeys(TASKS, 0), 0, 0
        for task in TASKS:
            for i in draw(len(rows), getattr(c, task), rng):
                r = rows[i]
                if task in ("tree_cot", "symbol_counting") and not r.get("tree" if task == "tree_cot" else "symbols"):
                    skipped += 1
                    continue
                reading = None
                if task == "edl":
                    model_reading = final_latex((r.get("answers") or [""])[0])
                    if model_reading and model_reading != " ".join(r["latex"].split()):
                        reading, from_model = model_reading, from_model + 1
                    else:
                        reading = synthetic_error(r["latex"], rng, c.max_edits, vocab)
                out.append(task_row(r, task, reading))
                counts[task] += 1
        rng.shuffle(out)
        ctx.report.update({"rows_in": len(rows), "rows_out": len(out), "rows_per_task": counts, "edl_from_model": from_model,
                           "edl_synthetic": counts["edl"] - from_model, "skipped_no_tree_or_symbols": skipped,
                           "examples": [{"task": r["task"], "reply": r["messages"][1]["content"][0]["text"][:120]} for r in out[:3]]})
        return ray.data.from_items(out)


def bench_scores(final_dir: str, eval_n: int, out_dir: Path) -> dict[str, Any]:
    """Bench measurement: ExpRate / ≤1 / ≤2 and CER of greedy vanilla-prompt replies on bundled:math_images test."""
    from ftray.data import load_rows
    from ftray.tasks.vision_language import checkpoint_replies

    rows = load_rows("bundled:math_images", "test", eval_n).to_list()
    replies = checkpoint_replies(final_dir, rows, max_new_tokens=64)
    return {k: round(v, 4) for k, v in hmer_scores(replies, [r["latex"] for r in rows]).items()}
