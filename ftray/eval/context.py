"""Context-use evaluation: KAFT's controllability and robustness, ManyICL's k-shot accuracy.

The scoring functions are pure (model outputs and references in, numbers out). `kaft_metrics` and
`manyicl_metrics` are `ftray bench methods` measurements (a method's `bench_metrics`): they build the
prompts from the checkpoint's own data source (its test split), generate greedily with the checkpoint in a
Ray task and score the outputs; the bench runs them on the method's checkpoint and on its baseline's.

    kaft_metrics("runs/kaft/final", 30, Path("bench_out"))   # {"kaft_controllability": ..., ...}
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from ftray.methods.base import stable_seed
from ftray.methods.kaft import answer_key, answer_pool, context_prompt, counterfactual_case, irrelevant_context, item_of, short_answer

KSHOTS = (0, 1, 4, 16)  # ManyICL's prompts: zero-shot, few-shot and more shots than the bench's 256-token sequences hold


def matches(outputs: list[str], references: list[str]) -> list[bool]:
    """Per pair: does the output's answer equal the reference (ftray's exact-match rule on both sides)."""
    return [bool(r) and answer_key(o) == answer_key(r) for o, r in zip(outputs, references, strict=True)]


def accuracy(outputs: list[str], references: list[str]) -> float:
    """Share of outputs that match their reference (0 for no pairs)."""
    hits = matches(outputs, references)
    return sum(hits) / len(hits) if hits else 0.0


def controllability(outputs: list[str], context_answers: list[str]) -> float:
    """KAFT's controllability: accuracy against the counterfactual context's answer a′."""
    return accuracy(outputs, context_answers)


def robustness(outputs: list[str], closed_book: list[str]) -> float:
    """KAFT's robustness: agreement, under irrelevant contexts, with the pretrained model's closed-book answers
    (pairs whose closed-book answer is empty are left out)."""
    pairs = [(o, c) for o, c in zip(outputs, closed_book, strict=True) if c and c.strip()]
    return accuracy([o for o, _ in pairs], [c for _, c in pairs])


def kshot_accuracy(outputs_by_k: dict[int, list[str]], references: list[str]) -> dict[int, float]:
    """Accuracy of the k-shot outputs for every k."""
    return {k: accuracy(outs, references) for k, outs in sorted(outputs_by_k.items())}


def kaft_cases(rows: list[dict], fmt: str, n: int, seed: int = 0) -> list[dict]:
    """The first `n` test questions that have every context type: question, answer, the relevant context,
    the counterfactual context and its answer a′, and an irrelevant context with the answer it states."""
    items = [item_of(r, fmt) for r in rows]
    pool = answer_pool(items)
    rng = random.Random(stable_seed("kaft-eval", seed))
    cases = []
    for i, it in enumerate(items):
        cf = counterfactual_case(it, pool, rng)
        irr = irrelevant_context(i, items, rng)
        if cf is None or irr is None:
            continue
        irr_answer = next(o["answer"] for o in items if o["context"] == irr)
        cases.append({"question": it["question"], "answer": it["answer"], "relevant": it["context"],
                      "counterfactual": cf[0], "cf_answer": cf[1], "irrelevant": irr, "irrelevant_answer": irr_answer})
        if len(cases) == n:
            break
    return cases


def kaft_prompts(cases: list[dict], kind: str) -> list[list[dict]]:
    """Chat prompts of one context kind ("relevant", "counterfactual", "irrelevant" or "empty")."""
    return [[{"role": "user", "content": context_prompt("" if kind == "empty" else c[kind], c["question"])}] for c in cases]


def kaft_scores(cases: list[dict], outputs: dict[str, list[str]], base_closed_book: list[str]) -> dict[str, float]:
    """Every KAFT number from the outputs per context kind and the pretrained model's closed-book answers."""
    out = {k: [short_answer(o) for o in v] for k, v in outputs.items()}
    answers = [c["answer"] for c in cases]
    return {
        "kaft_relevant_acc": accuracy(out["relevant"], answers),
        "kaft_controllability": controllability(out["counterfactual"], [c["cf_answer"] for c in cases]),
        "kaft_cf_memorised": accuracy(out["counterfactual"], answers),  # kept its own answer despite the context
        "kaft_robustness": robustness(out["irrelevant"], base_closed_book),
        "kaft_irrelevant_acc": accuracy(out["irrelevant"], answers),
        "kaft_distracted": accuracy(out["irrelevant"], [c["irrelevant_answer"] for c in cases]),  # copied the irrelevant fact
        "kaft_irrelevant_vs_own_closed_book": accuracy(out["irrelevant"], out["empty"]),  # the model ignores it, by its own answer
        "kaft_closed_book_acc": accuracy(out["empty"], answers),
    }


def _spec_of(final_dir: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((Path(final_dir) / "ftray_spec.yaml").read_text())


def _generate(model_ref: str, prompts: list[list[dict]], max_new_tokens: int, chat_template: str) -> list[str]:
    """Greedy completions of `prompts` by a checkpoint or model name, rendered with `chat_template`."""
    import torch

    from ftray.data.templates import use_chat_template
    from ftray.eval.generate import generate
    from ftray.eval.loading import load_checkpoint

    # one thread, as the task reserves one CPU: two OpenMP threads on CPUs that other processes share
    # spin-wait (measured ~10x slower than one thread on a loaded 2-core machine)
    torch.set_num_threads(1)
    model, tokenizer = load_checkpoint(model_ref)
    use_chat_template(tokenizer, chat_template)
    return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=16)


def _on_ray(fn: Any, *args: Any) -> Any:
    import ray

    from ftray.train.trainer import ensure_ray

    ensure_ray()
    return ray.get(ray.remote(num_cpus=1)(fn).remote(*args))


def kaft_metrics(final_dir: str, eval_n: int, out_dir: Path) -> dict[str, float]:
    """Bench measurement: KAFT's numbers for a checkpoint on its data source's test split (`eval_n` questions).

    The pretrained model's closed-book answers (the robustness reference) are generated once and cached
    under `out_dir/kaft/`.
    """
    from ftray.data import detect_format, load_rows
    from ftray.eval.loading import base_model_of, chat_template_of

    spec = _spec_of(final_dir)
    source = spec["data"]["source"]
    ds = load_rows(source, "test")
    cases = kaft_cases(ds.to_list(), detect_format(ds), eval_n, spec["train"].get("seed", 0))
    template = chat_template_of(final_dir)
    base = base_model_of(Path(final_dir))[0]
    key = hashlib.blake2b(json.dumps([base, source, template, cases]).encode(), digest_size=6).hexdigest()
    cache = Path(out_dir) / "kaft" / f"closed_book_{key}.json"
    if cache.exists():
        base_cb = json.loads(cache.read_text())
    else:
        base_cb = [short_answer(o) for o in _on_ray(_generate, base, kaft_prompts(cases, "empty"), 24, template)]
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(base_cb))
    kinds = ("relevant", "counterfactual", "irrelevant", "empty")
    flat = _on_ray(_generate, final_dir, [p for k in kinds for p in kaft_prompts(cases, k)], 24, template)
    outputs = {k: flat[j * len(cases):(j + 1) * len(cases)] for j, k in enumerate(kinds)}
    return {**{k: round(v, 4) for k, v in kaft_scores(cases, outputs, base_cb).items()}, "kaft_eval_n": len(cases)}


def kshot_prompts(queries: list[dict], demos: list[dict], fmt: str, k: int, group_field: str = "category",
                  seed: int = 0) -> list[list[dict]]:
    """For each query, k demonstrations from `demos` (of the query's `group_field` value first) as alternating
    user/assistant turns, then the query's prompt; a query's demos for a smaller k are a prefix of its larger ones."""
    from ftray.data.formats import format_prompt
    from ftray.methods.manyicl import example_messages

    prompts = []
    for i, q in enumerate(queries):
        rng = random.Random(stable_seed("manyicl-eval", seed, i))
        same = [d for d in demos if d.get(group_field) == q.get(group_field)]
        rest = [d for d in demos if d.get(group_field) != q.get(group_field)]
        rng.shuffle(same)
        rng.shuffle(rest)
        shots = (same + rest)[:k]
        turns = [m for j, d in enumerate(shots) for m in example_messages(d, fmt, j == 0)]
        query = format_prompt(q, fmt)
        prompts.append(turns + ([m for m in query if m["role"] != "system"] if shots else query))
    return prompts


def manyicl_metrics(final_dir: str, eval_n: int, out_dir: Path) -> dict[str, float]:
    """Bench measurement: exact match of a checkpoint on its data source's test split with k-shot prompts
    (demonstrations from the train split, the query's category first) for every k in KSHOTS."""
    from ftray.data import detect_format, load_rows, reference_answer
    from ftray.eval.loading import chat_template_of

    spec = _spec_of(final_dir)
    source = spec["data"]["source"]
    test = load_rows(source, "test", eval_n)
    fmt = detect_format(test)
    queries, demos = test.to_list(), load_rows(source, "train").to_list()
    prompts = [p for k in KSHOTS for p in kshot_prompts(queries, demos, fmt, k, seed=spec["train"].get("seed", 0))]
    flat = _on_ray(_generate, final_dir, prompts, 128 if fmt == "cot" else 24, chat_template_of(final_dir))
    by_k = {k: flat[j * len(queries):(j + 1) * len(queries)] for j, k in enumerate(KSHOTS)}
    acc = kshot_accuracy(by_k, [reference_answer(q, fmt) for q in queries])
    return {f"manyicl_acc_k{k}": round(v, 4) for k, v in acc.items()}
