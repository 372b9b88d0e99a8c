"""`ftray bench serve-throughput`: serving SmolLM2 through ftray (engine hf and engine vllm) against
`ray.serve.llm`'s own OpenAI app, vLLM offline and `model.generate`, in one run, same prompts and model.

Every contender generates `max_tokens` greedy tokens per request (fewer where the model ends its answer:
tokens are counted, never assumed) for 1, 4 and 16 concurrent clients. Served contenders are called over
HTTP on 127.0.0.1 with the `openai` client, streaming, so each request gives its latency and its time to
first token (TTFT); each is deployed alone (the others' replicas are gone), with the same CPUs. The
in-process baselines run in a fresh Python each: `generate-seq` is `model.generate` one request at a time,
`generate-batch` one left-padded static batch of the clients' size, `vllm-offline` one `LLM.generate`
call on that many prompts. Writes `<out>/serve_throughput.json` and `<out>/serve_throughput.md`.

    ftray bench serve-throughput --out bench_results
    python -m ftray.bench.serve --contender generate --settings '{"levels": [1]}' --json g.json   # one baseline
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ftray.models import DEFAULT_MODEL

# The anchors on this machine (SmolLM2, bf16, 64 greedy tokens), tokens/s.
ANCHORS = {("generate-seq", 1): 40.0, ("generate-batch", 16): 405.0, ("vllm-offline", 16): 514.0,
           ("ray-serve-llm", 16): 420.0}
SERVED = ("ftray-vllm", "ray-serve-llm", "ftray-hf")
TOPICS = ["a lighthouse keeper", "the history of bread", "a robot learning to paint", "volcanoes",
          "a city under the sea", "the first winter on Mars", "a lost umbrella", "how bees talk",
          "an old clockmaker", "the northern lights", "a chess tournament", "the silk road",
          "a talking cat", "rainforests", "a time traveller's breakfast", "the invention of paper"]


@dataclasses.dataclass
class Settings:
    """What every contender shares."""

    model: str = DEFAULT_MODEL
    max_tokens: int = 64
    levels: list[int] = dataclasses.field(default_factory=lambda: [1, 4, 16])
    rounds: int = 2  # requests per client per level (1-client level: 2 * rounds, to steady p50)
    dtype: str = "bfloat16"
    num_cpus: float = 2.0  # Ray CPUs of a served contender's model replica (the whole machine here)


def main(out_dir: str = "bench_results", model: str = DEFAULT_MODEL, max_tokens: int = 64,
         levels: list[int] | None = None, rounds: int = 2, contenders: list[str] | None = None) -> dict[str, Any]:
    """Time every contender, print the table, write JSON + markdown into `out_dir`; returns the report."""
    s = Settings(model=model, max_tokens=max_tokens, levels=levels or [1, 4, 16], rounds=rounds)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = contenders or ["generate-seq", "generate-batch", "vllm-offline", *SERVED]
    rows: dict[str, dict[int, dict]] = {}
    errors: dict[str, str] = {}
    for name in names:
        try:  # one broken contender is reported, not allowed to lose the others' numbers
            rows[name] = run_served(name, s) if name in SERVED else in_subprocess(name, s, out)
        except Exception as err:
            errors[name] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
            print(f"serve-throughput: {name} failed: {errors[name]}", file=sys.stderr)
    report = summarize(s, rows) | {"errors": errors}
    (out / "serve_throughput.json").write_text(json.dumps(report, indent=2))
    (out / "serve_throughput.md").write_text(markdown(report))
    print(markdown(report))
    return report


def prompts(s: Settings) -> list[str]:
    """One chat-templated prompt per client slot (16 topics, cycled), as completions text."""
    from ftray.models import load_tokenizer

    tokenizer = load_tokenizer(s.model)
    chats = [[{"role": "user", "content": f"Write a long story about {t}."}] for t in TOPICS]
    return [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]


def level_row(latencies: list[float], tokens: int, wall: float, ttfts: list[float] | None = None) -> dict:
    """tokens/s, p50/p95 latency (and TTFT) of one concurrency level."""
    row = {"tokens_per_s": tokens / wall, "p50_s": quantile(latencies, 0.5), "p95_s": quantile(latencies, 0.95),
           "requests": len(latencies), "tokens": tokens, "wall_s": wall}
    if ttfts:
        row |= {"ttft_p50_s": quantile(ttfts, 0.5), "ttft_p95_s": quantile(ttfts, 0.95)}
    return row


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile (p95 of few samples is their max)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


# ---- served contenders: one app at a time on a local Ray Serve, called over HTTP ----

def run_served(name: str, s: Settings) -> dict[int, dict]:
    """Deploy `name`, warm it up, then time every level; the app is deleted afterwards."""
    import openai
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    texts = prompts(s)
    try:
        serve.run(served_app(name, s), name=name, route_prefix="/")
        _stream_one(client, texts[0], s)  # warm-up: compilation, first allocations
        return {c: _served_level(client, texts, c, s) for c in s.levels}
    finally:
        serve.shutdown()


def served_app(name: str, s: Settings):
    """The Serve application of contender `name` (model served as `smol`)."""
    from serving.config import ModelConfig

    model = ModelConfig(name="smol", path=s.model, engine="hf" if name == "ftray-hf" else "vllm", dtype=s.dtype,
                        num_cpus=s.num_cpus, max_batch_size=max(s.levels), max_ongoing_requests=4 * max(s.levels))
    if name == "ray-serve-llm":
        from ray.serve.llm import build_openai_app

        from serving.vllm_engine import llm_config, model_source

        config = llm_config(model, "smol", model_source(s.model), {})
        return build_openai_app({"llm_configs": [config],
                                 "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0}}})
    from serving.app import build_app

    return build_app({"models": [model.model_dump()]})


def _served_level(client, texts: list[str], clients: int, s: Settings) -> dict:
    per_client = s.rounds * (2 if clients == 1 else 1)
    jobs = [texts[(i * per_client + r) % len(texts)] for i in range(clients) for r in range(per_client)]

    def one_client(i: int) -> list[tuple[float, float, int]]:
        return [_stream_one(client, p, s) for p in jobs[i * per_client:(i + 1) * per_client]]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(one_client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    return level_row([r[0] for r in results], sum(r[2] for r in results), wall, [r[1] for r in results])


def _stream_one(client, prompt: str, s: Settings) -> tuple[float, float, int]:
    """(latency, TTFT, completion tokens) of one streamed greedy completion."""
    t0 = time.perf_counter()
    first, tokens = None, 0
    stream = client.completions.create(model="smol", prompt=prompt, max_tokens=s.max_tokens, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return time.perf_counter() - t0, first or 0.0, tokens


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- in-process baselines, each in a fresh Python ----

def in_subprocess(name: str, s: Settings, out: Path) -> dict[int, dict]:
    """Run baseline `name` (generate-seq, generate-batch or vllm-offline) in a fresh Python."""
    path = out / f"{name}.serve.json"
    cmd = [sys.executable, "-m", "ftray.bench.serve", "--contender", name,
           "--settings", json.dumps(dataclasses.asdict(s)), "--json", str(path)]
    subprocess.run(cmd, check=True)
    return {int(k): v for k, v in json.loads(path.read_text()).items()}


def run_generate(s: Settings, batched: bool) -> dict[int, dict]:
    """`model.generate`: one request at a time (level 1 only), or one static left-padded batch per level."""
    import torch

    from ftray.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(s.model)
    tokenizer.padding_side = "left"
    model = load_model(s.model, dtype=s.dtype).eval()
    texts = prompts(s)

    def generate(batch: list[str]) -> tuple[float, int]:
        enc = tokenizer(batch, return_tensors="pt", padding=True)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=s.max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        new = out[:, enc.input_ids.shape[1]:]
        return time.perf_counter() - t0, int((new != tokenizer.pad_token_id).sum())

    generate(texts[:1])  # warm-up
    rows = {}
    for c in (s.levels if batched else [1]):
        runs = [generate([texts[(r * c + i) % len(texts)] for i in range(c)]) for r in range(s.rounds * (2 if c == 1 else 1))]
        # A static batch: every request in it waits for the whole batch.
        rows[c] = level_row([t for t, _ in runs for _ in range(c)], sum(n for _, n in runs), sum(t for t, _ in runs))
    return rows


def run_vllm_offline(s: Settings) -> dict[int, dict]:
    """vLLM's `LLM.generate` on `c` prompts at once, with the engine arguments engine vllm uses."""
    from vllm import LLM, SamplingParams

    from serving.config import ModelConfig
    from serving.vllm_engine import DEFAULT_ENGINE_KWARGS, model_source, vllm_dtype

    model = ModelConfig(name="smol", path=s.model, engine="vllm", dtype=s.dtype, max_batch_size=max(s.levels),
                        max_ongoing_requests=4 * max(s.levels))
    llm = LLM(model=model_source(s.model), dtype=vllm_dtype(model), max_num_seqs=model.max_batch_size,
              **DEFAULT_ENGINE_KWARGS)
    params = SamplingParams(max_tokens=s.max_tokens, temperature=0)
    texts = prompts(s)
    llm.generate(texts[:1], params, use_tqdm=False)  # warm-up
    rows = {}
    for c in s.levels:
        runs = []
        for r in range(s.rounds * (2 if c == 1 else 1)):
            t0 = time.perf_counter()
            outs = llm.generate([texts[(r * c + i) % len(texts)] for i in range(c)], params, use_tqdm=False)
            runs.append((time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)))
        rows[c] = level_row([t for t, _ in runs for _ in range(c)], sum(n for _, n in runs), sum(t for t, _ in runs))
    return rows


BASELINES = {"generate-seq": lambda s: run_generate(s, batched=False),
             "generate-batch": lambda s: run_generate(s, batched=True),
             "vllm-offline": run_vllm_offline}


# ---- report ----

def summarize(s: Settings, rows: dict[str, dict[int, dict]]) -> dict[str, Any]:
    """Rows per contender and level, anchor ratios, targets, machine and settings."""
    from ftray.bench.throughput import machine

    for (name, level), anchor in ANCHORS.items():
        if level in rows.get(name, {}):
            rows[name][level]["vs_anchor"] = rows[name][level]["tokens_per_s"] / anchor
    import os

    import fastapi

    info = machine() | {"fastapi": fastapi.__version__, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except ImportError:
        info["vllm"] = None
    return {"contenders": {n: {str(c): r for c, r in levels.items()} for n, levels in rows.items()},
            "targets": targets(rows), "anchors": {f"{n}@{c}": a for (n, c), a in ANCHORS.items()},
            "machine": info, "settings": dataclasses.asdict(s)}


def targets(rows: dict[str, dict[int, dict]]) -> list[dict[str, Any]]:
    """The issue's targets (reported, never asserted); a target whose contenders did not run is left out."""
    def tps(name: str, level: int) -> float | None:
        return rows.get(name, {}).get(level, {}).get("tokens_per_s")

    def p50(name: str, level: int) -> float | None:
        return rows.get(name, {}).get(level, {}).get("p50_s")

    checks = [(f"ftray-vllm ≥ 0.95× ray-serve-llm tokens/s @{c}", tps("ftray-vllm", c), tps("ray-serve-llm", c), 0.95, True)
              for c in (1, 4, 16)]
    checks += [("ftray-hf @16 ≥ 0.8× ray-serve-llm @16 tokens/s", tps("ftray-hf", 16), tps("ray-serve-llm", 16), 0.8, True),
               ("ftray-hf @16 ≥ 8× generate-seq tokens/s", tps("ftray-hf", 16), tps("generate-seq", 1), 8.0, True),
               # latency ratios: lower is better, so the bound is an upper one
               ("ftray-hf p50 latency @1 ≤ 1.15× generate-seq", p50("ftray-hf", 1), p50("generate-seq", 1), 1.15, False),
               ("ftray-vllm p50 latency @1 ≤ 1.15× vllm-offline", p50("ftray-vllm", 1), p50("vllm-offline", 1), 1.15, False)]
    out = []
    for target, a, b, bound, higher_is_better in checks:
        if a is None or b is None:
            continue
        ratio = a / b
        out.append({"target": target, "ratio": ratio, "pass": ratio >= bound if higher_is_better else ratio <= bound})
    return out


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown page: table, targets, machine, settings."""
    s, m = report["settings"], report["machine"]
    lines = ["# ftray serve throughput", "",
             "| contender | clients | tokens/s | p50 latency s | p95 latency s | TTFT p50 s | TTFT p95 s | vs anchor |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, levels in report["contenders"].items():
        for c, r in levels.items():
            ttft = (f"{r['ttft_p50_s']:.3f} | {r['ttft_p95_s']:.3f}" if "ttft_p50_s" in r else "– | –")
            anchor = f"{r['vs_anchor']:.2f}×" if "vs_anchor" in r else "–"
            lines.append(f"| {name} | {c} | {r['tokens_per_s']:.1f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | {ttft} | {anchor} |")
    lines += [f"| {name} | failed: {error} | | | | | | |" for name, error in report.get("errors", {}).items()]
    lines += ["", "## Targets", ""]
    lines += [f"- {'PASS' if t['pass'] else 'FAIL'}: {t['target']} (measured {t['ratio']:.2f}×)" for t in report["targets"]]
    anchors = ", ".join(f"{k} ≈ {v:.0f}" for k, v in report["anchors"].items())
    lines += [
        "", "## How", "",
        f"- {s['model']}, {s['dtype']}, {s['max_tokens']} greedy tokens per request (fewer where the model ends its "
        "answer; tokens/s counts generated tokens over the level's wall time).",
        "- Served contenders (ftray-vllm, ray-serve-llm = `ray.serve.llm.build_openai_app`, ftray-hf) are called over "
        "HTTP on 127.0.0.1 with the `openai` client, streaming (TTFT = first text chunk), each deployed alone "
        f"with {s['num_cpus']} Ray CPUs; `clients` threads each send {s['rounds']} requests one after another "
        f"({2 * s['rounds']} at 1 client).",
        "- generate-seq: `model.generate` one request at a time; generate-batch: one left-padded static batch of "
        "`clients` prompts (every request's latency is the batch's); vllm-offline: one `LLM.generate` call on "
        "`clients` prompts; each in a fresh Python.",
        f"- vs anchor: measured / the issue's anchor on the reference machine ({anchors} tokens/s).",
        f"- Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, transformers {m['transformers']}, "
        f"ray {m['ray']}, vllm {m['vllm']}, fastapi {m.get('fastapi')}, python {m['python']}; "
        f"OMP_NUM_THREADS={m.get('OMP_NUM_THREADS')}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # vLLM's engine process needs this guard: it re-imports the main module
    parser = argparse.ArgumentParser(description="Run one baseline of the serve-throughput benchmark.")
    parser.add_argument("--contender", choices=sorted(BASELINES), required=True)
    parser.add_argument("--settings", default="{}", help="Settings fields as JSON.")
    parser.add_argument("--json", required=True, help="Where to write its rows.")
    a = parser.parse_args()
    rows = BASELINES[a.contender](Settings(**json.loads(a.settings)))
    Path(a.json).write_text(json.dumps(rows))
