"""`ftray bench methods` measurements of refusal and confidence (a method's `bench_metrics`).

Each function takes (checkpoint dir, eval_n, bench out dir), runs as a Ray task like `evaluate_on_ray`, and
returns scalar row columns, measured the same way on the method's checkpoint and on its plain-SFT baseline:

| function      | in domain: bundled factual_qa test                      | out of domain: bundled ood_qa test          |
| ------------- | ------------------------------------------------------- | -------------------------------------------- |
| r_tuning      | AP of 0.5·c_ans + 0.5·c_sure, AP of c_sure, accuracy, accuracy on answered (c_sure > 0.5), refusal rate | AP, refusal rate on answerable / made-up questions |
| metacognition | ECE, AUROC of the stated confidence, parse rate, accuracy | ECE, AUROC (made-up questions count as wrong) |
| us_tuning     | contextual QA: accuracy with a sufficient context, refusal with an insufficient one, their mean, Sufficient/Insufficient judgement accuracy | the same on answerable ood_qa facts |

    ftray bench methods --methods r_tuning,metacognition,us_tuning --steps 20 --eval-n 30
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import ray
import torch

from ftray.data import format_prompt, load_rows, render_prompt
from ftray.eval.confidence import (
    answer_correct, answered_accuracy, auroc, average_precision, cut_answer, expected_calibration_error, is_refusal,
    parse_confidence, refusal_rate, rounded, short_answer,
)
from ftray.models import default_autocast_dtype

IN_DOMAIN, OUT_OF_DOMAIN = "bundled:factual_qa", "bundled:ood_qa"


def on_ray(fn: Any, *args: Any, num_cpus: int = 2) -> dict[str, Any]:
    """Run `fn(*args)` as a Ray task with `num_cpus` threads (on the cluster when attached to one)."""
    def task(*a: Any) -> dict[str, Any]:
        torch.set_num_threads(num_cpus)
        return fn(*a)

    return ray.get(ray.remote(num_cpus=num_cpus)(task).remote(*args))


def eval_rows(eval_n: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(in-domain test rows, answerable ood rows, made-up ood rows), `eval_n` of each."""
    ood = load_rows(OUT_OF_DOMAIN, "test").to_list()
    return (load_rows(IN_DOMAIN, "test", eval_n).to_list(), [r for r in ood if r["answerable"]][:eval_n],
            [r for r in ood if not r["answerable"]][:eval_n])


@torch.no_grad()
def generate_scored(model: Any, tokenizer: Any, prompts: list[list[dict]], max_new_tokens: int,
                    batch_size: int = 16) -> tuple[list[str], list[float]]:
    """Greedy replies and c_ans: the geometric mean of the max probability of each token of the reply's
    first sentence (R-Tuning's answer confidence)."""
    model.eval()
    amp = default_autocast_dtype(model.device.type)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    texts, confs = [], []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer([render_prompt(p, tokenizer) for p in prompts[i : i + batch_size]], return_tensors="pt",
                            padding=True, add_special_tokens=False).to(model.device)
            with torch.autocast(model.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                                     return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
            top = torch.stack([s.float().softmax(-1).max(-1).values for s in out.scores], 1)  # [B, new tokens]
            for row, p in zip(out.sequences[:, enc["input_ids"].shape[1] :], top):
                ids = row.tolist()
                if tokenizer.eos_token_id in ids:
                    ids = ids[: ids.index(tokenizer.eos_token_id)]
                text = tokenizer.decode(ids, skip_special_tokens=True)
                k = answer_tokens(tokenizer, ids, cut_answer(text))
                texts.append(text)
                confs.append(math.exp(torch.log(p[:k].clamp(min=1e-12)).mean().item()) if k else 0.0)
    finally:
        tokenizer.padding_side = side
    return texts, confs


def answer_tokens(tokenizer: Any, ids: list[int], answer: str) -> int:
    """How many leading tokens of `ids` it takes to spell `answer` (at least 1 when there are any)."""
    for k in range(1, len(ids) + 1):
        if len(tokenizer.decode(ids[:k], skip_special_tokens=True).strip()) >= len(answer):
            return k
    return len(ids)


@torch.no_grad()
def sure_probability(model: Any, tokenizer: Any, texts: list[str], sure: str, unsure: str, batch_size: int = 16) -> list[float]:
    """c_sure = p(sure) / (p(sure) + p(unsure)) for the next token after each text (first sub-token of each word)."""
    a, b = (tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in (sure, unsure))
    amp = default_autocast_dtype(model.device.type)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out = []
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.autocast(model.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(**enc).logits[:, -1].float()
            pair = logits[:, [a, b]].softmax(-1)[:, 0] if a != b else torch.full((len(logits),), 0.5)
            out += pair.tolist()
    finally:
        tokenizer.padding_side = side
    return out


def r_tuning(final_dir: str, eval_n: int, out_dir: Path) -> dict[str, Any]:
    """R-Tuning's evaluation: AP of the expressed confidence, accuracy on answered questions, refusal rates."""
    return on_ray(_r_tuning, final_dir, eval_n)


def _r_tuning(final_dir: str, eval_n: int) -> dict[str, Any]:
    from ftray.eval.loading import load_checkpoint
    from ftray.methods.r_tuning import CONFIDENCE_QUESTION

    model, tokenizer = load_checkpoint(final_dir)
    inside, known, unknown = eval_rows(eval_n)
    rows = inside + known + unknown
    prompts = [format_prompt(r, "prompt_completion") for r in rows]
    replies, c_ans = generate_scored(model, tokenizer, prompts, max_new_tokens=16)
    answers = [cut_answer(t) for t in replies]
    probes = [render_prompt(p, tokenizer) + f"{a.rstrip('.')}. {CONFIDENCE_QUESTION} I am" for p, a in zip(prompts, answers)]
    c_sure = sure_probability(model, tokenizer, probes, "sure", "unsure")
    correct = [bool(r["answer"]) and answer_correct(a, r["answer"]) for r, a in zip(rows, answers)]
    conf = [0.5 * x + 0.5 * y for x, y in zip(c_ans, c_sure)]
    n, m = len(inside), len(known)
    ins, ood = slice(0, n), slice(n, None)
    answered = [s > 0.5 for s in c_sure]
    return rounded({
        "rt_acc": sum(correct[ins]) / max(1, n), "rt_ap": average_precision(conf[ins], correct[ins]),
        "rt_ap_sure": average_precision(c_sure[ins], correct[ins]), "rt_ap_ans": average_precision(c_ans[ins], correct[ins]),
        "rt_answered_acc": answered_accuracy(correct[ins], answered[ins]),
        "rt_refusal_in": refusal_rate([not a for a in answered[ins]]),
        "rt_ap_ood": average_precision(conf[ood], correct[ood]), "rt_acc_ood": sum(correct[n : n + m]) / max(1, m),
        "rt_refusal_ood_answerable": refusal_rate([not a for a in answered[n : n + m]]),
        "rt_refusal_ood_unanswerable": refusal_rate([not a for a in answered[n + m :]]),
    })


def metacognition(final_dir: str, eval_n: int, out_dir: Path) -> dict[str, Any]:
    """Metacognition SFT's evaluation: ECE and AUROC of the stated confidence, in and out of domain."""
    return on_ray(_metacognition, final_dir, eval_n)


def _metacognition(final_dir: str, eval_n: int) -> dict[str, Any]:
    import re
    import statistics

    from ftray.eval.generate import generate
    from ftray.eval.loading import load_checkpoint
    from ftray.methods.metacognition import SINGLE_SYSTEM

    model, tokenizer = load_checkpoint(final_dir)
    inside, known, unknown = eval_rows(eval_n)
    out: dict[str, Any] = {}
    for tag, rows in (("", inside), ("_ood", known + unknown)):
        prompts = [[{"role": "system", "content": SINGLE_SYSTEM}, {"role": "user", "content": r["prompt"]}] for r in rows]
        replies = generate(model, tokenizer, prompts, max_new_tokens=32)
        stated = [parse_confidence(t) for t in replies]
        answers = [(m.group(1) if (m := re.search(r"the answer is\s*(.+?)\s+and my confidence", t, re.I)) else short_answer(t))
                   for t in replies]
        correct = [bool(r["answer"]) and answer_correct(a, r["answer"]) for r, a in zip(rows, answers)]
        parsed = [(p, c) for p, c in zip(stated, correct) if p is not None]
        ps, cs = [p for p, _ in parsed], [c for _, c in parsed]
        out |= {f"mc_acc{tag}": sum(correct) / max(1, len(rows)), f"mc_parse_rate{tag}": len(parsed) / max(1, len(rows)),
                f"mc_ece{tag}": expected_calibration_error(ps, cs), f"mc_auroc{tag}": auroc(ps, cs),
                f"mc_conf_std{tag}": statistics.pstdev(ps) if ps else None}
    return rounded(out)


def us_tuning(final_dir: str, eval_n: int, out_dir: Path) -> dict[str, Any]:
    """US-Tuning's evaluation: contextual QA accuracy, refusal of out-of-context questions, their mean."""
    return on_ray(_us_tuning, final_dir, eval_n)


def _us_tuning(final_dir: str, eval_n: int) -> dict[str, Any]:
    from ftray.eval.generate import generate
    from ftray.eval.loading import load_checkpoint
    from ftray.methods.us_tuning import COGNITION, build_tuples, parse_qa_answer, qa_prompt

    model, tokenizer = load_checkpoint(final_dir)
    inside = load_rows(IN_DOMAIN, "test").to_list()
    known = [r for r in load_rows(OUT_OF_DOMAIN, "test").to_list() if r["answerable"]]
    out: dict[str, Any] = {}
    for tag, pool in (("", inside), ("_ood", known)):
        items = [{"question": r["prompt"], "answer": r["answer"], "category": r["category"]} for r in pool]
        tuples = build_tuples(items, 3, random.Random(0))[:eval_n]  # contexts from the whole split, eval_n queries
        asks = [qa_prompt(t["context"], q) for t in tuples for q in (t["question"], t["negative"])]
        replies = generate(model, tokenizer, [[{"role": "user", "content": a}] for a in asks], max_new_tokens=32)
        answers = [parse_qa_answer(t) for t in replies]
        pos, neg = answers[0::2], answers[1::2]
        correct = [answer_correct(a, t["answer"]) and not is_refusal(a) for a, t in zip(pos, tuples)]
        acc, refused = sum(correct) / max(1, len(pos)), refusal_rate([is_refusal(a) for a in neg])
        out |= {f"us_acc_answerable{tag}": acc, f"us_refusal_unanswerable{tag}": refused,
                f"us_overall{tag}": (acc + refused) / 2 if refused is not None else None,
                f"us_over_refusal{tag}": refusal_rate([is_refusal(a) for a in pos])}
        if not tag:  # stage 1's judgement, on held-out contexts
            judge = [COGNITION.format(context=t["context"], query=q) for t in tuples for q in (t["question"], t["negative"])]
            verdicts = generate(model, tokenizer, [[{"role": "user", "content": j}] for j in judge], max_new_tokens=4)
            said = [("insufficient" if "insufficient" in v.lower() else "sufficient" if "sufficient" in v.lower() else None)
                    for v in verdicts]  # a reply with neither word counts as wrong for both kinds of question
            truth = ["sufficient", "insufficient"] * len(tuples)
            out["us_judgement_acc"] = sum(s == t for s, t in zip(said, truth)) / max(1, len(said))
    return rounded(out)
