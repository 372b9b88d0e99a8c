"""`ftray analyze shift`: the spec's attribution sanity checks, the Welch test, FFN concepts, and a CLI run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from ftray.analyze.attribution import density, ifa, saliency, sparsify
from ftray.analyze.ffn import concepts, overlap, principal_directions
from ftray.analyze.shift import load_cases
from ftray.analyze.stats import t_sf, welch_greater
from ftray.cli import app


class CopyModel(torch.nn.Module):
    """A toy LM whose every next-token distribution reads prompt token k (plus a small running mean of
    everything before it): its greedy output copies input token k. The scale keeps the softmax away from
    saturation, where the gradient of a probability near 1 is rounding noise."""

    def __init__(self, k: int, vocab: int = 40, dim: int = 16, scale: float = 0.3, leak: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.k, self.scale, self.leak = torch.nn.Embedding(vocab, dim), k, scale, leak

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.emb

    def forward(self, inputs_embeds: torch.Tensor, logits_to_keep: int = 0) -> SimpleNamespace:
        steps = torch.arange(1, inputs_embeds.shape[1] + 1, dtype=inputs_embeds.dtype)[None, :, None]
        h = self.scale * inputs_embeds[:, self.k : self.k + 1] + self.leak * inputs_embeds.cumsum(1) / steps
        logits = h @ self.emb.weight.T
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


@pytest.mark.parametrize("k", [0, 3, 7])
def test_density_of_a_copy_model_peaks_at_the_copied_token(k: int) -> None:
    model = CopyModel(k)
    prompt = torch.tensor([5, 9, 2, 17, 30, 11, 8, 21])
    response = torch.full((6,), int(prompt[k]))
    assert model(model.emb(torch.cat([prompt, response]))[None]).logits[0, len(prompt) - 1 :].argmax(-1).eq(prompt[k]).all()
    d = density(sparsify(saliency(model, torch.cat([prompt, response]), len(prompt))))
    assert d.shape == (len(prompt),) and int(d.argmax()) == k
    assert d.max() == 1 and d.min() >= 0 and (d <= 1).all()


def test_sparsify_keeps_only_the_top_levels_of_each_response_column() -> None:
    s = torch.tensor([[1.0, -2.0], [0.75, 4.0], [0.71, 3.5], [-1.0, 0.0]])
    assert sparsify(s).tolist() == [[10, 0], [8, 10], [8, 9], [0, 0]]  # ⌈10·s/max⌉ > 7 kept
    assert sparsify(torch.zeros(3, 2)).eq(0).all()


def test_density_is_in_unit_interval_with_max_one_and_ifa_zero_without_instruction() -> None:
    torch.manual_seed(1)
    d = density(sparsify(torch.randn(12, 7)))
    assert d.min() >= 0 and d.max() == 1
    assert ifa(d, torch.zeros(12)) == 0.0
    mask = torch.zeros(12)
    mask[int(d.argmax())] = 1
    assert ifa(d, mask) == pytest.approx(1 / math.log2(3))
    assert density(torch.zeros(4, 3)).eq(0).all()  # no attribution at all: zeros, not NaN


def test_student_t_tail_and_one_sided_welch() -> None:
    assert t_sf(2.0, 10) == pytest.approx(0.0366940, abs=1e-6)  # scipy.stats.t.sf(2, 10)
    assert t_sf(1.0, 5) == pytest.approx(0.1816087, abs=1e-6)
    assert t_sf(-1.0, 5) == pytest.approx(1 - 0.1816087, abs=1e-6) and t_sf(0.0, 3) == pytest.approx(0.5)
    w = welch_greater([1, 2, 3, 4], [2, 3, 5, 7, 8])
    assert w.t == pytest.approx(1.90808, abs=1e-4) and w.df == pytest.approx(6.1347, abs=1e-3) and 0.04 < w.p < 0.06
    assert welch_greater([2, 3, 5, 7, 8], [1, 2, 3, 4]).p == pytest.approx(1 - w.p)
    assert welch_greater([1, 2, 3], [1, 2, 3]).p == pytest.approx(0.5)


def test_bundled_prompts_mark_instruction_spans(tmp_path: Path) -> None:
    cases = load_cases()
    assert len(cases) == 20 and len({c.group for c in cases}) == 4
    assert all(c.prompt[s:e] and s >= 0 for c in cases for s, e in c.spans)
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"prompt": "Say hi.", "instruction": ["Say hi."]}) + "\n"
                   + json.dumps({"prompt": "Say hi.", "instruction": ["Say bye"]}) + "\n")
    with pytest.raises(ValueError, match="p.jsonl row 2: instruction 'Say bye' is not a substring"):
        load_cases(bad)


def test_ffn_directions_are_orthonormal_and_a_model_overlaps_itself(tiny_model_dir: Path, tiny_tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    v = principal_directions(model.model.layers[0].mlp.down_proj.weight, 4)
    assert torch.allclose(v @ v.T, torch.eye(4), atol=1e-5)
    words = concepts(model, tiny_tokenizer, directions=3, top_k=5)
    assert sorted(words) == [0, 1] and all(len(ws) == 5 for lists in words.values() for ws in lists)
    assert overlap(words[0], words[0]) == 1.0 and overlap([["a"]], [["b"]]) == 0.0


def test_cli_writes_report_and_heatmap(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "shift"
    # the same weights under two spellings of the path: analysed twice, and deterministic
    result = CliRunner().invoke(app, ["analyze", "shift", str(tiny_model_dir), f"{tiny_model_dir}/", "--out", str(out),
                                      "--n", "2", "--max-response-tokens", "4"])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    assert "| all |" in report and "## FFN concepts" in report and "GloVe" in report
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    base, tuned = results["cases"]["base"], results["cases"]["tuned"]
    assert len(base) == 2 and [r["ifa"] for r in base] == [r["ifa"] for r in tuned]  # same model both sides
    assert all(0 <= x <= 1 for r in base for x in r["density"]) and results["tests"]["all"]["p"] == pytest.approx(0.5)
    assert all(len(r["tokens"]) == len(r["density"]) == len(r["instruction"]) and sum(r["instruction"]) for r in base)
