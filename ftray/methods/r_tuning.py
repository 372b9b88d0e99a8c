"""R-Tuning — Teaching Large Language Models to Refuse Unknown Questions (Zhang, Diao, Lin et al., NAACL 2024, 2311.09677).

Refusal-aware instruction tuning: ask the *base* model every training question first; the questions it
answers correctly form the certain set D1, the rest the uncertain set D0. Every example keeps its gold
answer and is followed by the confidence question, answered "I am sure." (D1) or "I am unsure." (D0),
so the model learns the answers and a self-assessment at once. At test time p(sure) after the model's
own answer is its confidence, scored by average precision (`ftray.eval.confidence_bench.r_tuning`).

    methods: [{name: r_tuning}]                            # R-Tuning: split by the base model's correctness
    methods: [{name: r_tuning, variant: unsupervised}]     # R-Tuning-U: split by answer entropy over k samples
    methods: [{name: r_tuning, variant: refusal}]          # R-Tuning-R: D0's answers become refusals

Decisions:
- Rows of any format with a gold answer (prompt/completion [+answer], cot, chat); out come chat rows whose
  assistant turn is `{reply}. {confidence question} I am sure.` plus the columns `answer` (gold),
  `certain` and `prediction` (the base model's probe answer). The paper trains on every token (LMFlow
  text_only); here the question is masked like any prompt unless `data.train_on_prompt=true` [inf].
- The probe is the run's chat model on the row's own prompt, greedy, `max_new_tokens` (paper: 15), cut at
  the first sentence end; correct = the gold answer occurs in it as whole words (the paper's substring
  test, without "1" matching "100"; `ftray.eval.confidence.answer_correct`).
- R-Tuning-U: k samples at temperature T; the entropy of the distinct answers (compared after
  `answer_key`); exactly ⌊N/2⌋ lowest-entropy rows are "sure", ties broken by row order. This is the
  intended global split (the authors' ParaRel script resets its buffer inside the loop) [inf].
- R-Tuning-R's 16 refusal phrases are ftray's wording of the authors' list (not copied) [inf].
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ftray.data.formats import format_of_columns, reference_answer, to_messages
from ftray.eval.confidence import answer_correct, answer_key, cut_answer, entropy
from ftray.methods.base import Context, Method, MethodConfig, stable_seed
from ftray.methods.registry import register

if TYPE_CHECKING:
    import ray.data

    from ftray.config import RunSpec

CONFIDENCE_QUESTION = "Are you sure you accurately answered the question based on your internal knowledge?"
REFUSALS = (
    "I do not know the answer.", "The answer is unknown.", "I don't know.", "I am not sure about the answer.",
    "I cannot answer this question.", "That is beyond what I know.", "I have no idea.", "I am unable to answer that.",
    "I'm not able to answer this.", "I do not have that information.", "Sorry, I don't know the answer.",
    "I can't say for certain.", "The answer is not known to me.", "I would only be guessing.",
    "I lack the knowledge to answer this.", "I'm not certain of the answer.",
)


class RTuningConfig(MethodConfig):
    variant: Literal["supervised", "unsupervised", "refusal"] = Field(
        "supervised", description="R-Tuning (split by the base model's correctness), R-Tuning-U (split by answer "
        "entropy, no labels) or R-Tuning-R (uncertain answers replaced by a refusal, no confidence question).")
    max_new_tokens: int = Field(15, ge=1, description="Tokens the base model may generate when probed (paper: 15).")
    num_samples: int = Field(5, ge=2, description="R-Tuning-U: samples per question for the answer entropy (paper: k=5).")
    temperature: float = Field(0.7, gt=0, description="R-Tuning-U: sampling temperature (paper: 0.7).")
    confidence_question: str = Field(CONFIDENCE_QUESTION, description="The question appended after the answer (paper's wording).")
    sure: str = Field("sure", description="Word that ends a certain example: '... I am sure.'")
    unsure: str = Field("unsure", description="Word that ends an uncertain example: '... I am unsure.'")


def confident_reply(reply: str, question: str, word: str) -> str:
    """`reply` followed by the confidence question and "I am {word}." (the paper's template)."""
    return f"{reply.rstrip().rstrip('.')}. {question} I am {word}."


@register
class RTuning(Method):
    """Probe the base model, split certain / uncertain, append "I am sure/unsure." to every gold answer."""

    name = "r_tuning"
    paper = "Zhang, Diao, Lin et al. 2024, R-Tuning: Teaching Large Language Models to Refuse Unknown Questions (NAACL, 2311.09677)"
    Config = RTuningConfig
    bench = {"data": {"source": "bundled:factual_qa", "max_len": 512}, "train": {"lr": 1e-4}}
    bench_metrics = ("ftray.eval.confidence_bench:r_tuning",)

    def check(self, spec: RunSpec) -> None:
        """The rewritten rows are chat rows, which a fixed other data.format would misread."""
        if spec.data.format not in ("auto", "chat"):
            raise ValueError(f"{self.name} writes chat rows; set data.format=auto (got {spec.data.format!r})")

    def prepare_data(self, ds: ray.data.Dataset, ctx: Context) -> ray.data.Dataset:
        """Probe the base model (greedy, or k samples for -U), then write each row with its sure/unsure ending."""
        import ray.data

        from ftray.data.inference import Answerer, map_model

        c = self.config
        fmt = ctx.spec.data.format if ctx.spec.data.format != "auto" else format_of_columns(ds.columns())
        unsupervised = c.variant == "unsupervised"
        probe = {"num_samples": c.num_samples, "temperature": c.temperature} if unsupervised else {}
        rows = map_model(ds, Answerer, ctx, max_new_tokens=c.max_new_tokens, **probe).take_all()
        certain = self._split(rows, fmt)
        seed = ctx.spec.train.seed
        out = [self.row(r, fmt, sure, seed) for r, sure in zip(rows, certain)]
        random.Random(seed).shuffle(out)  # the paper shuffles; the training loop reshuffles per epoch anyway
        n_sure = sum(certain)
        right = sum(answer_correct(cut_answer(r["answers"][0]), reference_answer(r, fmt)) for r in rows)
        ctx.report.update({"variant": c.variant, "certain": n_sure, "uncertain": len(rows) - n_sure,
                           "probe_accuracy": round(right / max(1, len(rows)), 4),
                           "examples": [{"reply": o["messages"][-1]["content"][:160], "prediction": o["prediction"][:80]}
                                        for o in out[:4]]})
        return ray.data.from_items(out)

    def _split(self, rows: list[dict], fmt: str) -> list[bool]:
        """Which rows are certain: the greedy probe is right (R-Tuning, -R), or the ⌊N/2⌋ lowest entropies (-U)."""
        if self.config.variant != "unsupervised":
            return [answer_correct(cut_answer(r["answers"][0]), reference_answer(r, fmt)) for r in rows]
        ents = [entropy([answer_key(a) for a in r["answers"]]) for r in rows]
        order = sorted(range(len(rows)), key=lambda i: ents[i])  # stable: ties keep row order
        sure = set(order[: len(rows) // 2])
        return [i in sure for i in range(len(rows))]

    def row(self, r: dict, fmt: str, certain: bool, seed: int) -> dict:
        """One training row: the prompt, then the gold reply with its confidence ending (or a refusal for -R's D0)."""
        c = self.config
        messages = to_messages(r, fmt)[0]
        prompt, reply = messages[:-1], messages[-1]["content"]
        if c.variant == "refusal":
            text = reply if certain else random.Random(stable_seed(seed, reply, str(prompt))).choice(REFUSALS)
        else:
            text = confident_reply(reply, c.confidence_question, c.sure if certain else c.unsure)
        return {"messages": [*prompt, {"role": "assistant", "content": text}], "answer": reference_answer(r, fmt),
                "certain": certain, "prediction": cut_answer(r["answers"][0])}

