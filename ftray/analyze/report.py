"""The `ftray analyze shift` outputs: report.md (tests, per-prompt table, FFN concepts) and heatmap.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _cell(text: str, width: int = 60) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def write_report(summary: dict[str, Any], path: Path, layers_shown: int = 3, directions_shown: int = 3) -> None:
    """Markdown: mean IFA base vs tuned with Welch tests, per-prompt IFA, FFN concept words and overlaps."""
    all_ = summary["tests"]["all"]
    lines = [
        "# Behaviour shift after instruction tuning",
        "",
        f"- base: `{summary['base']}`; tuned: `{summary['tuned']}`",
        f"- {summary['n']} prompts with marked instruction spans; each model's own greedy response, at most "
        f"{summary['max_response_tokens']} tokens; chat template: {summary['chat_template']}",
        f"- time: base {summary['seconds']['base']} s, tuned {summary['seconds']['tuned']} s (attribution, generation, FFN)",
        "",
        "## Instruction-following score (IFA)",
        "",
        "IFA = Σ_i d_i·M_i / log₂(2 + ΣM): attribution density on the instruction tokens. One-sided Welch t-test,",
        "H1: mean IFA(tuned) > mean IFA(base) (the paper's expectation after instruction tuning).",
        "",
        "| group | mean IFA base | mean IFA tuned | t | df | p (one-sided) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for group, w in summary["tests"].items():
        lines.append(f"| {group} | {w['mean_a']:.3f} | {w['mean_b']:.3f} | {w['t']:.2f} | {w['df']:.1f} | {w['p']:.3g} |")
    verdict = "higher" if all_["mean_b"] > all_["mean_a"] else "not higher"
    lines += ["", f"Mean IFA of the tuned model is {verdict} than the base model's "
              f"({all_['mean_b']:.3f} vs {all_['mean_a']:.3f}, p = {all_['p']:.3g}).", "",
              "## Per prompt", "", "| id | group | IFA base | IFA tuned | response base | response tuned |",
              "| --- | --- | ---: | ---: | --- | --- |"]
    for rb, rt in zip(summary["cases"]["base"], summary["cases"]["tuned"]):
        lines.append(f"| {rb['id']} | {rb['group']} | {rb['ifa']:.3f} | {rt['ifa']:.3f} | {_cell(rb['response'])} | "
                     f"{_cell(rt['response'])} |")
    ffn_b, ffn_t, over = summary["ffn"]["base"], summary["ffn"]["tuned"], summary["ffn_overlap"]
    lines += ["", "## FFN concepts", ""]
    if not ffn_b:
        lines.append("No `mlp.down_proj` layers found in this architecture: FFN concepts skipped.")
    else:
        n_layers = len(ffn_b)
        shown = sorted({0, n_layers // 2, n_layers - 1})[:layers_shown]
        lines += ["Top words of the top principal directions of each layer's centred FFN down-projection, read through",
                  "the normalised unembedding. Overlap: Jaccard overlap of all listed words of a layer, base vs tuned.", ""]
        for layer in shown:
            lines += [f"### Layer {layer} (overlap {over[layer]:.2f})", "", "| direction | base | tuned |", "| --- | --- | --- |"]
            for k, (wb, wt) in enumerate(zip(ffn_b[layer], ffn_t[layer])):
                if k < directions_shown:
                    lines.append(f"| {k + 1} | {', '.join(wb)} | {', '.join(wt)} |")
            lines.append("")
        mean_over = sum(over.values()) / len(over)
        lines += [f"Overlap per layer (mean {mean_over:.2f}): " + ", ".join(f"{k}: {v:.2f}" for k, v in over.items()), ""]
    lines += ["## Not included", "",
              "The paper's attention word-pair analysis (instruction verbs in lower/middle attention layers) needs GloVe",
              "vectors to filter pairs, which are not available offline; it is not run.", ""]
    path.write_text("\n".join(lines))


def plot_heatmap(base: list, tuned: list, path: Path, max_prompts: int = 6) -> None:
    """heatmap.png: attribution density per prompt token, base above tuned, instruction tokens in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(zip(base, tuned))[:max_prompts]
    width = max(6.0, 0.28 * max(len(r.tokens) for pair in pairs for r in pair))
    fig, axes = plt.subplots(2 * len(pairs), 1, figsize=(width, 1.55 * 2 * len(pairs)), squeeze=False)
    for k, (rb, rt) in enumerate(pairs):
        for row, (label, r) in enumerate((("base", rb), ("tuned", rt))):
            ax = axes[2 * k + row, 0]
            ax.imshow([r.density or [0.0]], aspect="auto", cmap="viridis", vmin=0, vmax=1)
            ax.set_yticks([])
            ax.set_title(f"{r.id} — {label} (IFA {r.ifa:.3f})", fontsize=8, loc="left")
            ax.set_xticks(range(len(r.tokens)))
            ax.set_xticklabels(r.tokens, rotation=90, fontsize=6)
            for tick, m in zip(ax.get_xticklabels(), r.instruction):
                tick.set_color("red" if m else "black")
    fig.suptitle("Attribution density per prompt token (instruction tokens in red)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
