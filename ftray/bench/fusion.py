"""`ftray bench fusion-overhead`: per-token latency of a logit-fusion ensemble against its members alone.

The ensemble's members run as Ray actors (`serving.fusion.FusionMember`): one holds the large model,
one the small base and its expert. Timed, with the same prompts and greedy tokens:
- each member actor decoding alone (its per-token call latency, Ray call included);
- the large model decoding in this process without Ray (what an actor call adds);
- static fusion (proxy tuning) and dynamic fusion (DLF) through `FusionDecoder`, members called at once.
The target (issue 9) is fusion ≤ 1.2× the slowest member; the sum is what calling them one after another
would cost. Writes `<out>/fusion_overhead.json` and `.md`.

    ftray bench fusion-overhead --tokens 64
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import ray
import torch

from ftray.models import DEFAULT_MODEL

PROMPT = "Question: A baker has 12 trays with 7 rolls each. How many rolls are there?\nAnswer:"


def random_adapter(base: str, out: Path) -> str:
    """A LoRA adapter with random non-zero weights on `base`: an expert with a trained one's cost."""
    from peft import LoraConfig, get_peft_model

    from ftray.models import load_model, load_tokenizer

    torch.manual_seed(0)
    model = get_peft_model(load_model(base), LoraConfig(r=16, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(out)
    load_tokenizer(base).save_pretrained(out)
    return str(out)


def per_token(step, tokens: int) -> list[float]:
    """Seconds of each decoding step after the prefill; `step(None)` prefills, `step(ids)` feeds one token."""
    logits = step(None)
    times = []
    for _ in range(tokens):
        ids = logits.argmax(-1).tolist()
        t0 = time.perf_counter()
        logits = step(ids)
        times.append(time.perf_counter() - t0)
    return times


def summary(times: list[float]) -> dict[str, float]:
    """p50/p95/mean in milliseconds."""
    ms = sorted(t * 1000 for t in times)
    return {"p50_ms": round(statistics.median(ms), 2), "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 2),
            "mean_ms": round(statistics.fmean(ms), 2)}


def member_alone(actor, prompts: list[list[int]], pad: int, tokens: int, weights=None) -> list[float]:
    """Per-token latency of one member actor decoding by itself."""
    session = f"alone-{time.time_ns()}"

    def step(ids):
        ref = actor.start.remote(session, prompts, pad, weights) if ids is None else actor.step.remote(session, ids)
        out = ray.get(ref)
        return out if out.dim() == 2 else out[0]

    try:
        return per_token(step, tokens)
    finally:
        actor.end.remote(session)


def main(tokens: int = 64, batch: int = 1, out_dir: str = "bench_results", model: str = DEFAULT_MODEL,
         expert: str | None = None, threads: int = 1) -> dict[str, Any]:
    """Time members alone and the ensembles; write JSON + markdown; returns the report."""
    from serving.config import EnsembleConfig
    from serving.fusion import FusionDecoder, start_members
    from serving.generation import BatchDecoder

    from ftray.eval.loading import load_checkpoint_tokenizer
    from ftray.models import load_model
    from ftray.train.trainer import ensure_ray

    ensure_ray()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    expert = expert or random_adapter(model, out / "random_expert")
    tok = load_checkpoint_tokenizer(model)
    prompts = [tok(PROMPT).input_ids] * batch
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows: dict[str, dict[str, float]] = {}

    torch.set_num_threads(threads)
    local = load_model(model).eval()
    decoder = BatchDecoder(local, prompts, pad, autocast=None)
    rows["large in-process (no Ray)"] = summary(per_token(decoder.step, tokens))
    del local, decoder

    cfgs = {kind: EnsembleConfig(name=kind, large=model, small_base=model, experts=[{"path": expert}], fusion=kind,
                                 dtype="float32", large_num_cpus=threads, small_num_cpus=threads)
            for kind in ("static", "dynamic")}
    large, small = start_members(cfgs["static"])
    info = ray.get(large.info.remote())
    rows["member: large (actor)"] = summary(member_alone(large, prompts, pad, tokens))
    weights = torch.tensor([-1.0, 1.0])
    rows["member: small base + expert (actor, weighted delta)"] = summary(member_alone(small, prompts, pad, tokens, weights))
    for kind, cfg in cfgs.items():
        fusion = FusionDecoder(large, small, prompts, pad, cfg, min(info["vocab"], len(tok)))
        try:
            rows[f"fusion: {kind}"] = summary(per_token(fusion.step, tokens))
        finally:
            fusion.close()
    slowest = max(rows["member: large (actor)"]["p50_ms"], rows["member: small base + expert (actor, weighted delta)"]["p50_ms"])
    total = rows["member: large (actor)"]["p50_ms"] + rows["member: small base + expert (actor, weighted delta)"]["p50_ms"]
    for kind in cfgs:
        r = rows[f"fusion: {kind}"]
        r["vs_max"], r["vs_sum"] = round(r["p50_ms"] / slowest, 3), round(r["p50_ms"] / total, 3)
    report = {"model": model, "expert": expert, "tokens": tokens, "batch": batch, "threads_per_member": threads,
              "cpus": torch.get_num_threads(), "rows": rows, "max_members_p50_ms": slowest, "sum_members_p50_ms": total,
              "target": "fusion p50 <= 1.2 x slowest member"}
    (out / "fusion_overhead.json").write_text(json.dumps(report, indent=2))
    (out / "fusion_overhead.md").write_text(markdown(report))
    print(markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    """The latency table with the ensemble's ratios to the slowest member and to the members' sum."""
    lines = [f"# ftray bench fusion-overhead — {report['model']}, batch {report['batch']}, {report['tokens']} greedy tokens, "
             f"{report['threads_per_member']} thread(s) per member", "",
             f"Slowest member p50 {report['max_members_p50_ms']} ms; members one after another {report['sum_members_p50_ms']} ms. "
             f"Target: {report['target']}.", "",
             "| path | p50 ms/token | p95 | mean | ÷ slowest member | ÷ sum of members |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in report["rows"].items():
        lines.append(f"| {name} | {r['p50_ms']} | {r['p95_ms']} | {r['mean_ms']} | {r.get('vs_max', '–')} | {r.get('vs_sum', '–')} |")
    return "\n".join(lines) + "\n"
