"""`ftray bench train-throughput`: ftray's training loop against a plain PyTorch+PEFT loop and
`transformers.Trainer`, in one run, on one machine, same model/data/LoRA/batch/steps.

Reports real-token throughput over the timed steps (warm-up steps skipped), the peak RSS of the
training process(es), ratios against both baselines, and model-FLOPs utilisation against a matmul
peak measured here. Writes `<out>/train_throughput.json` and `<out>/train_throughput.md`.

    ftray bench train-throughput --steps 12 --out bench_results
    python -m ftray.bench.throughput --contender plain --settings '{"steps": 4}' --json t.json   # one baseline
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ftray.bench.contenders import BASELINES, Settings, Timing, cores, run_ftray
from ftray.models import DEFAULT_MODEL, default_autocast_dtype

FLOPS_FORMULA = (
    "FLOPs/token = 2·N_fwd + 2·N_bwd_input + 2·N_trainable, N_fwd = N_bwd_input = N_frozen + N_lora "
    "(nn.Linear weights incl. lm_head, no embedding lookups, attention scores ignored) → 4·N_frozen + 6·N_lora; "
    "tokens are real (non-pad) tokens"
)


def main(steps: int = 20, out_dir: str = "bench_results", model: str = DEFAULT_MODEL, batch_size: int = 8,
         packing: bool = True, warmup: int = 2, max_samples: int | None = None, threads: int | None = None) -> dict[str, Any]:
    """Time every contender, print the table, write JSON + markdown into `out_dir`; returns the report.

    `threads` (default: all cores) is each baseline's and ftray-1w's torch threads, and ftray-Nw's N.
    """
    if steps < 1 or warmup < 1:
        raise ValueError(f"--steps ({steps}) and warm-up steps ({warmup}) must be ≥ 1: a rate needs a step end to start from")
    s = Settings(model=model, batch_size=batch_size, steps=steps, warmup=warmup, max_samples=max_samples, threads=threads or cores())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peak = matmul_peak(s.threads)
    timings = {name: in_subprocess(name, s, out) for name in BASELINES}
    n = s.threads
    runs = [("ftray-1w", 1, False)] + ([(f"ftray-{n}w", n, False)] if n > 1 else [])
    runs += [(f"{name}-packed", w, True) for name, w, _ in runs] if packing else []
    for name, workers, packed in runs:
        timings[name] = run_ftray(s, name, workers, packed, str(out / "runs"))
    report = summarize(s, timings, peak)
    (out / "train_throughput.json").write_text(json.dumps(report, indent=2))
    (out / "train_throughput.md").write_text(markdown(report))
    print_table(report)
    return report


def in_subprocess(name: str, s: Settings, out: Path) -> Timing:
    """Run baseline `name` in a fresh Python, so its RSS and torch threads are its own."""
    path = out / f"{name}.timing.json"
    cmd = [sys.executable, "-m", "ftray.bench.throughput", "--contender", name,
           "--settings", json.dumps(dataclasses.asdict(s)), "--json", str(path)]
    subprocess.run(cmd, check=True)
    return Timing(**json.loads(path.read_text()))


def matmul_peak(threads: int, n: int = 2048, repeats: int = 10) -> dict[str, Any]:
    """Best-of-`repeats` FLOP/s of an n×n matmul in the autocast dtype, on `threads` threads."""
    dtype = default_autocast_dtype("cpu") or torch.float32
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    torch.set_num_threads(before)
    return {"flops": 2 * n**3 / best, "dtype": str(dtype).removeprefix("torch."), "n": n, "threads": threads}


def rate(t: Timing, warmup: int, steps: int) -> tuple[float, float]:
    """(real tokens/s, seconds/step) over steps warmup+1 … warmup+steps."""
    seconds = t.ends[warmup + steps - 1] - t.ends[warmup - 1]
    return sum(t.tokens[warmup : warmup + steps]) / seconds, seconds / steps


def summarize(s: Settings, timings: dict[str, Timing], peak: dict[str, Any]) -> dict[str, Any]:
    """Per-contender throughput, memory, ratios and MFU, plus machine, settings and targets."""
    params = timings["plain"].params
    flops_per_token = 4 * params["frozen"] + 6 * params["trainable"]
    rates = {name: rate(t, s.warmup, s.steps) for name, t in timings.items()}
    rows = {}
    for name, t in timings.items():
        tps, step_s = rates[name]
        rows[name] = {
            "tokens_per_s": tps, "step_s": step_s, "peak_rss_mb": sum(t.rss_mb), "peak_rss_mb_per_process": t.rss_mb,
            "vs_plain": tps / rates["plain"][0], "vs_hf_trainer": tps / rates["hf-trainer"][0],
            "mfu": tps * flops_per_token / peak["flops"],
        }
    return {
        "contenders": rows,
        "targets": targets(rows, s.threads),
        "flops": {"per_token": flops_per_token, "formula": FLOPS_FORMULA, "params": params, "matmul_peak": peak},
        "machine": machine(),
        "settings": dataclasses.asdict(s) | {"autocast": str(default_autocast_dtype("cpu")), "data": "bundled:arithmetic"},
    }


def targets(rows: dict[str, dict], n: int) -> list[dict[str, Any]]:
    """The ratios the project tracks (reported, never asserted)."""
    packed = {k: r["vs_hf_trainer"] for k, r in rows.items() if k.endswith("-packed")}
    checks = [("ftray-1w ≥ 0.95× plain", rows["ftray-1w"]["vs_plain"], 0.95, True)]
    if f"ftray-{n}w" in rows:
        checks.append((f"ftray-{n}w > 1.0× plain", rows[f"ftray-{n}w"]["vs_plain"], 1.0, False))
    checks.append(("ftray-1w ≥ 1.0× hf-trainer", rows["ftray-1w"]["vs_hf_trainer"], 1.0, True))
    if packed:
        best = max(packed, key=packed.get)
        checks.append((f"best packed ({best}) ≥ 1.3× hf-trainer", packed[best], 1.3, True))
    return [{"target": t, "ratio": r, "pass": r >= bound if inclusive else r > bound} for t, r, bound, inclusive in checks]


def machine() -> dict[str, Any]:
    """CPU model, cores and library versions."""
    import peft
    import ray
    import transformers

    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return {"cpu": names[0] if names else platform.processor(), "cores": cores(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "ray": ray.__version__,
            "python": platform.python_version()}


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown page: table, targets, FLOPs formula, machine, settings."""
    lines = ["# ftray train throughput", "", "| contender | tokens/s | s/step | peak RSS MB | vs plain | vs hf-trainer | MFU |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in report["contenders"].items():
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['vs_plain']:.2f}× | {r['vs_hf_trainer']:.2f}× | {r['mfu']:.1%} |")
    lines += ["", "## Targets", ""]
    lines += [f"- {'PASS' if t['pass'] else 'FAIL'}: {t['target']} (measured {t['ratio']:.2f}×)" for t in report["targets"]]
    f, m, s = report["flops"], report["machine"], report["settings"]
    peak = f["matmul_peak"]
    lines += [
        "", "## How", "",
        f"- Tokens/s: real (non-pad) tokens over optimizer steps {s['warmup'] + 1}–{s['warmup'] + s['steps']}, "
        f"after {s['warmup']} warm-up step(s); ftray-Nw splits the same global batch over N workers × 1 thread.",
        "- Peak RSS: max resident set of each training process (Ray workers for ftray), summed over workers.",
        f"- MFU: {f['formula']}; here {f['per_token']:,} FLOPs/token "
        f"(N_frozen {f['params']['frozen']:,}, N_lora {f['params']['trainable']:,}); "
        f"peak = best {peak['n']}×{peak['n']} {peak['dtype']} torch.mm on {peak['threads']} threads "
        f"= {peak['flops'] / 1e9:.0f} GFLOP/s.",
        f"- Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, transformers {m['transformers']}, "
        f"peft {m['peft']}, ray {m['ray']}, python {m['python']}.",
        f"- Settings: model {s['model']}, data {s['data']} (max_len {s['max_len']}), LoRA {s['lora']}, "
        f"global batch {s['batch_size']}, lr {s['lr']}, autocast {s['autocast']}.",
        "",
    ]
    return "\n".join(lines)


def print_table(report: dict[str, Any]) -> None:
    """The contenders as a rich table, then the targets."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ftray train throughput (real tokens/s)")
    for col in ("contender", "tok/s", "s/step", "RSS MB", "×plain", "×HF", "MFU"):
        table.add_column(col, justify="left" if col == "contender" else "right", no_wrap=True)
    for name, r in report["contenders"].items():
        table.add_row(name, f"{r['tokens_per_s']:.0f}", f"{r['step_s']:.2f}", f"{r['peak_rss_mb']:.0f}",
                      f"{r['vs_plain']:.2f}×", f"{r['vs_hf_trainer']:.2f}×", f"{r['mfu']:.1%}")
    console = Console()
    console.print(table)
    for t in report["targets"]:
        console.print(f"{'[green]PASS' if t['pass'] else '[red]FAIL'}[/] {t['target']} ({t['ratio']:.2f}×)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run one baseline of the train-throughput benchmark.")
    parser.add_argument("--contender", choices=sorted(BASELINES), required=True)
    parser.add_argument("--settings", default="{}", help="Settings fields as JSON.")
    parser.add_argument("--json", required=True, help="Where to write its Timing.")
    a = parser.parse_args()
    timing = BASELINES[a.contender](Settings(**json.loads(a.settings)))
    Path(a.json).write_text(json.dumps(dataclasses.asdict(timing)))
