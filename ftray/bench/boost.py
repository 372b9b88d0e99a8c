"""`ftray bench boost`: per-token latency and tokens/s of a served 2-member LLMBoost chain, pipelined vs sequential
vs a single member, at batch 1 and 8, in one run.

Everything runs through `serving.boost`'s member actors and Ray Compiled Graphs, with the same prompt and greedy
tokens (the bench checks that pipelined and sequential decode the same tokens):
- single member: one `BoostMember` actor (member 1 with its LM head) on its own, the whole forward per step;
- sequential (`pipeline: false`): the chain's actors one after another, states handed on once per step;
- pipelined (`pipeline: true`): per-segment graph nodes; member 2 runs its layers while member 1 runs the same
  segment and waits only at each CMA layer.
Each member actor gets `--threads` CPUs (Ray resource) and torch threads. Without `--chain` the chain is built
untrained on SmolLM2-135M (fresh LoRA, zero-init CMA: the same compute as a trained chain). Targets at batch 1
(issue 12): pipelined ≤ 0.6× sequential and ≤ 1.15× a single member. Writes `<out>/boost.json` and `.md`.

    ftray bench boost --tokens 32 --repeats 3
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import ray
import torch

from ftray.models import DEFAULT_MODEL

PROMPT = "Question: A baker has 12 trays with 7 rolls each. How many rolls are there?\nAnswer:"


def build_chain(model: str, out: Path, members: int = 2, every: int = 4) -> str:
    """An untrained chain on `model` (fresh LoRA r=16 on all linear layers, zero-init CMA at every `every`-th layer)."""
    from ftray.methods.llmboost.model import LlmBoostConfig, LlmBoostForCausalLM
    from ftray.models import load_model, load_tokenizer

    base = load_model(model)
    n_layers = base.config.num_hidden_layers
    config = LlmBoostConfig(base_model=model, base_config=base.config.to_dict(), n_members=members,
                            layers=[layer for layer in range(1, n_layers + 1) if layer % every == 0] or [n_layers],
                            lora={"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"})
    LlmBoostForCausalLM(config, base=base).save_pretrained(out)
    load_tokenizer(model).save_pretrained(out)
    return str(out)


def timed(step, tokens: int) -> tuple[list[float], list[list[int]]]:
    """Seconds of each decoding step after the prefill, and the greedy tokens chosen."""
    logits = step(None)
    times, chosen = [], []
    for _ in range(tokens):
        ids = logits.argmax(-1).tolist()
        chosen.append(ids)
        t0 = time.perf_counter()
        logits = step(ids)
        times.append(time.perf_counter() - t0)
    return times, chosen


def measure(graph, prompts: list[list[int]], pad: int, tokens: int, repeats: int) -> tuple[dict[str, float], list]:
    """p50/p95 ms per token and tokens/s over `repeats` sessions; the first session's tokens."""
    from serving.boost import BoostDecoder

    times, first = [], None
    for _ in range(repeats):
        decoder = BoostDecoder(graph, prompts, pad)
        try:
            t, chosen = timed(decoder.step, tokens)
        finally:
            decoder.close()
        times += t
        first = first or chosen
    ms = sorted(x * 1000 for x in times)
    return {"p50_ms": round(statistics.median(ms), 2), "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 2),
            "tokens_per_s": round(len(prompts) * len(times) / sum(times), 1)}, first


@ray.remote
class _Echo:
    def echo(self, x):
        return x


def transport(calls: int = 200, hidden: int = 576) -> dict[str, float]:
    """p50 ms of a driver → actor → driver round trip of one [1, 1, hidden] state: Compiled Graph vs plain actor call."""
    from ray.dag import InputNode

    actor = _Echo.options(num_cpus=0).remote()
    x = torch.randn(1, 1, hidden)

    def p50(call) -> float:
        for _ in range(10):  # warm-up
            call()
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return round(statistics.median(times) * 1000, 3)

    try:
        plain = p50(lambda: ray.get(actor.echo.remote(x)))
        with InputNode() as inp:
            dag = actor.echo.bind(inp).experimental_compile()
        try:
            graph = p50(lambda: ray.get(dag.execute(x)))
        finally:
            dag.teardown()
    finally:
        ray.kill(actor)
    return {"compiled_graph_roundtrip_ms": graph, "actor_call_roundtrip_ms": plain}


def main(tokens: int = 32, repeats: int = 3, batches: tuple[int, ...] = (1, 8), out_dir: str = "bench_results",
         model: str = DEFAULT_MODEL, chain: str | None = None, threads: int = 1, every: int = 4) -> dict[str, Any]:
    """Time a single member, the sequential chain and the pipelined chain; write JSON + markdown; return the report."""
    from serving.boost import BoostMember, ChainGraph, start_members

    from ftray.eval.loading import load_checkpoint_tokenizer
    from ftray.methods.llmboost.model import LlmBoostConfig
    from ftray.train.trainer import ensure_ray

    ensure_ray()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chain = chain or build_chain(model, out / f"boost_chain_every{every}", every=every)
    cfg = LlmBoostConfig.from_pretrained(chain)
    tok = load_checkpoint_tokenizer(chain)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompt = tok(PROMPT).input_ids
    rows: dict[str, dict[int, dict[str, float]]] = {"single member": {}, "sequential": {}, "pipelined": {}}
    tokens_of: dict[str, dict[int, list]] = {name: {} for name in rows}

    hop = transport()
    # One member alone first (its own actor, the same CPUs and threads); then the chain's actors.
    single = BoostMember.options(num_cpus=threads).remote(chain, 0, "float32", threads, True)
    info = ray.get(single.info.remote())
    graph = ChainGraph([single], info, pipeline=False)
    try:
        for b in batches:
            rows["single member"][b], tokens_of["single member"][b] = measure(graph, [prompt] * b, pad, tokens, repeats)
    finally:
        graph.teardown()
        ray.kill(single)

    actors = start_members(chain, cfg.n_members, cfg.ensemble, "float32", threads, threads)
    info = ray.get(actors[-1].info.remote())
    try:
        for name, pipeline in (("sequential", False), ("pipelined", True)):
            graph = ChainGraph(actors, info, pipeline)
            try:
                for b in batches:
                    rows[name][b], tokens_of[name][b] = measure(graph, [prompt] * b, pad, tokens, repeats)
            finally:
                graph.teardown()
    finally:
        for actor in actors:
            ray.kill(actor)

    ratios = {b: {"pipelined_vs_sequential": round(rows["pipelined"][b]["p50_ms"] / rows["sequential"][b]["p50_ms"], 3),
                  "pipelined_vs_single": round(rows["pipelined"][b]["p50_ms"] / rows["single member"][b]["p50_ms"], 3)}
              for b in batches}
    report = {"model": cfg.base_model, "chain": chain, "members": cfg.n_members, "layers_S": cfg.layers,
              "tokens": tokens, "repeats": repeats, "threads_per_member": threads, "cpus_per_member": threads,
              "machine_cpus": os.cpu_count(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
              "ray": ray.__version__, "torch": torch.__version__, "dtype": "float32",
              "same_tokens_pipelined_sequential": tokens_of["pipelined"] == tokens_of["sequential"],
              "transport": hop, "rows": rows, "ratios": ratios,
              "targets": "batch 1: pipelined <= 0.6 x sequential and <= 1.15 x single member"}
    (out / "boost.json").write_text(json.dumps(report, indent=2))
    (out / "boost.md").write_text(markdown(report))
    print(markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    """The latency/throughput table per batch size with the pipelined chain's ratios."""
    lines = [f"# ftray bench boost — {report['model']}, {report['members']}-member chain, S = {report['layers_S']}, "
             f"{report['tokens']} greedy tokens × {report['repeats']} repeats, fp32", "",
             f"Each member actor: {report['cpus_per_member']} CPU (Ray) and {report['threads_per_member']} torch thread(s); "
             f"machine: {report['machine_cpus']} cores (1-min load average at the end: {report['load_avg_1m_at_end']}). "
             f"Pipelined and sequential chose the same tokens: {report['same_tokens_pipelined_sequential']}. "
             f"Targets: {report['targets']}.", "",
             f"Transport, driver → actor → driver round trip of a [1, 1, 576] state, p50: Compiled Graph "
             f"{report['transport']['compiled_graph_roundtrip_ms']} ms, plain actor call {report['transport']['actor_call_roundtrip_ms']} ms.", "",
             "| batch | path | p50 ms/token | p95 ms/token | tokens/s | pipelined ÷ this |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for b in report["ratios"]:
        pipe = report["rows"]["pipelined"][b]["p50_ms"]
        for name, per_batch in report["rows"].items():
            r = per_batch[b]
            lines.append(f"| {b} | {name} | {r['p50_ms']} | {r['p95_ms']} | {r['tokens_per_s']} | {round(pipe / r['p50_ms'], 3)} |")
    return "\n".join(lines) + "\n"
