"""`ftray analyze shift BASE TUNED`: how instruction tuning shifted what a model attends to and stores.

Runs the behaviour-shift paper's analyses (arXiv 2310.00492; spec: methods/instruction_tuning.md items
6-8) on a base model and its tuned version, on CPU:

1. Each model answers every prompt greedily (its own response, capped at `max_response_tokens`), as
   the authors' `input_explain` explains the generating model's own output; the prompt is rendered
   with the model's chat template (`data.chat_template` rules: its own, else ChatML).
2. Gradient × input attribution of every response token to every prompt token, sparsified, the
   per-token density, and the instruction-following score IFA over the hand-marked instruction span
   (`ftray.analyze.attribution`).
3. A one-sided Welch t-test of IFA(base) < IFA(tuned), over all prompts and per task group.
4. FFN concepts per layer (top principal directions of the down-projections read as words) and the
   overlap of the two models' word lists (`ftray.analyze.ffn`).

The paper's attention word-pair analysis is not implemented: it filters pairs by GloVe similarity,
and GloVe vectors are not available offline here.

    ftray analyze shift smollm2-135m runs/<run>/final --out shift_report --n 20 --max-response-tokens 32

Writes report.md, heatmap.png (attribution density per prompt token) and results.json to `out`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ftray.analyze.attribution import density, ifa, saliency, sparsify
from ftray.analyze.ffn import concepts, overlap
from ftray.analyze.stats import welch_greater

PROMPTS = Path(__file__).with_name("prompts.jsonl")


@dataclass
class Case:
    """A prompt with its instruction span(s) marked as character ranges."""

    id: str
    group: str
    prompt: str
    spans: list[tuple[int, int]]


@dataclass
class CaseResult:
    """One model on one prompt: its response, the density over the prompt's own tokens, IFA."""

    id: str
    group: str
    ifa: float
    response: str
    tokens: list[str] = field(default_factory=list)  # the user prompt's tokens (template tokens left out)
    density: list[float] = field(default_factory=list)  # d_i on those tokens (normalised over the whole prompt)
    instruction: list[int] = field(default_factory=list)  # M_i on those tokens


def load_cases(path: str | Path | None = None, n: int | None = None) -> list[Case]:
    """Prompts with hand-marked instruction spans: jsonl rows {id, group, prompt, instruction: [substrings]}."""
    path = Path(path) if path else PROMPTS
    cases = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        spans = []
        for text in row.get("instruction") or []:
            start = row["prompt"].find(text)
            if start < 0:
                raise ValueError(f"{path} row {i}: instruction {text!r} is not a substring of the prompt")
            spans.append((start, start + len(text)))
        if not spans:
            raise ValueError(f"{path} row {i}: 'instruction' must list at least one substring of the prompt")
        cases.append(Case(str(row.get("id", i)), str(row.get("group", "all")), row["prompt"], spans))
    return cases[:n] if n else cases


def _show(token: str) -> str:
    return token.replace("\n", "\\n") or "␣"


@torch.no_grad()
def _respond(model: Any, tokenizer: Any, prompt_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    out = model.generate(prompt_ids[None], attention_mask=torch.ones_like(prompt_ids)[None], do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)[0, prompt_ids.numel():]
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    end = next((k for k, t in enumerate(out.tolist()) if t in stop), out.numel())
    return out[:end]


def analyze_case(model: Any, tokenizer: Any, case: Case, max_response_tokens: int) -> CaseResult:
    """Generate the model's response to `case` and score how much of it the instruction explains."""
    from ftray.data import render_prompt

    text = render_prompt([{"role": "user", "content": case.prompt}], tokenizer)
    offset = text.rfind(case.prompt)  # the user content inside the template
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    prompt_ids = torch.tensor(enc["input_ids"])
    in_user = [offset <= a < offset + len(case.prompt) for a, _ in enc["offset_mapping"]]
    mask = torch.tensor([any(a < offset + e and b > offset + s for s, e in case.spans)  # token overlaps a span
                         for a, b in enc["offset_mapping"]], dtype=torch.float)
    response = _respond(model, tokenizer, prompt_ids, max_response_tokens)
    d = density(sparsify(saliency(model, torch.cat([prompt_ids, response]), prompt_ids.numel())))
    shown = [k for k, u in enumerate(in_user) if u]
    return CaseResult(case.id, case.group, ifa(d, mask), tokenizer.decode(response, skip_special_tokens=True),
                      [_show(tokenizer.decode(prompt_ids[k : k + 1])) for k in shown],
                      [round(float(d[k]), 4) for k in shown], [int(mask[k]) for k in shown])


def analyze_model(ref: str, cases: list[Case], max_response_tokens: int, chat_template: str,
                  ffn_directions: int, ffn_top_k: int) -> tuple[list[CaseResult], dict[int, list[list[str]]], float]:
    """(per-prompt results, FFN concepts per layer, seconds) for one model (alias, directory or checkpoint)."""
    from ftray.data.templates import use_chat_template
    from ftray.eval.loading import load_checkpoint

    t0 = time.perf_counter()
    model, tokenizer = load_checkpoint(ref)
    use_chat_template(tokenizer, chat_template)
    model.eval()
    results = []
    for k, case in enumerate(cases, 1):
        results.append(analyze_case(model, tokenizer, case, max_response_tokens))
        print(f"[ftray] analyze shift: {ref} {k}/{len(cases)} {case.id}: IFA {results[-1].ifa:.3f}", file=sys.stderr)
    ffn = concepts(model, tokenizer, directions=ffn_directions, top_k=ffn_top_k)
    del model
    return results, ffn, time.perf_counter() - t0


def shift(base: str, tuned: str, out: str | Path, n: int | None = 20, max_response_tokens: int = 32,
          prompts: str | None = None, chat_template: str = "auto", ffn_directions: int = 5, ffn_top_k: int = 10,
          threads: int | None = None) -> dict[str, Any]:
    """Compare `base` with `tuned` on `n` prompts; write report.md, heatmap.png and results.json to `out`."""
    from ftray.analyze.report import plot_heatmap, write_report

    if threads:
        torch.set_num_threads(threads)
    cases = load_cases(prompts, n)
    if len(cases) < 2:
        raise ValueError(f"need at least 2 prompts for the t-test, got {len(cases)}")
    b, b_ffn, b_s = analyze_model(base, cases, max_response_tokens, chat_template, ffn_directions, ffn_top_k)
    # the same model on both sides (a smoke test of the tool) is deterministic: analyse it once
    t, t_ffn, t_s = (b, b_ffn, b_s) if tuned == base else analyze_model(
        tuned, cases, max_response_tokens, chat_template, ffn_directions, ffn_top_k)
    tests = {"all": welch_greater([r.ifa for r in b], [r.ifa for r in t])}
    for group in dict.fromkeys(c.group for c in cases):
        ib, it = [r.ifa for r in b if r.group == group], [r.ifa for r in t if r.group == group]
        if len(ib) >= 2:
            tests[group] = welch_greater(ib, it)
    summary = {
        "base": base, "tuned": tuned, "n": len(cases), "max_response_tokens": max_response_tokens,
        "chat_template": chat_template, "seconds": {"base": round(b_s, 1), "tuned": round(t_s, 1)},
        "tests": {g: asdict(w) for g, w in tests.items()},
        "ffn_overlap": {layer: overlap(b_ffn[layer], t_ffn.get(layer, [])) for layer in b_ffn},
        "cases": {"base": [asdict(r) for r in b], "tuned": [asdict(r) for r in t]},
        "ffn": {"base": b_ffn, "tuned": t_ffn},
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    write_report(summary, out / "report.md")
    plot_heatmap(b, t, out / "heatmap.png")
    return {k: summary[k] for k in ("base", "tuned", "n", "seconds")} | {
        "mean_ifa_base": tests["all"].mean_a, "mean_ifa_tuned": tests["all"].mean_b, "t": tests["all"].t,
        "p": tests["all"].p, "out": str(out)}
