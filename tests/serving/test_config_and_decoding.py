"""Serve config validation, the app builder's refusals, the CLI, and batched decoding without Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from ftray.cli import app as cli
from serving.app import app_builder
from serving.config import ServeConfigError, load_serve_config, parse_serve_config
from serving.generation import Job, TextTracker, decode_batch

CONFIGS = sorted((Path(__file__).parents[2] / "serving" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_parse(path):
    assert parse_serve_config(yaml.safe_load(path.read_text())).models


@pytest.mark.parametrize("model, field", [
    ({"name": "a:b", "path": "x"}, "models.0.name"),
    ({"name": "a", "path": "x", "num_replicas": 0}, "models.0.num_replicas"),
    ({"name": "a", "path": "x", "engine": "tgi"}, "models.0.engine"),
    ({"name": "a", "path": "x", "max_batch_size": 32, "max_ongoing_requests": 8}, "models.0"),
    ({"name": "a", "path": "x", "adapters": {"b:c": "y"}}, "models.0.adapters"),
    ({"name": "a", "path": "x", "typo": 1}, "models.0.typo"),
])
def test_bad_model_fields_are_named(model, field):
    with pytest.raises(ServeConfigError, match=rf"{field}\b"):
        parse_serve_config({"models": [model]})


def test_duplicate_names_and_missing_paths_are_refused(tmp_path):
    with pytest.raises(ServeConfigError, match="listed twice"):
        parse_serve_config({"models": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]})
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"models": [{"name": "a", "path": "smollm2-135m", "adapters": {"x": str(tmp_path)}}]}))
    with pytest.raises(ServeConfigError, match=r"models\.0\.adapters\.x: .* not a PEFT adapter dir"):
        load_serve_config(cfg)


def test_adapter_entries_with_merge_are_for_engine_vllm():
    model = {"name": "a", "path": "x", "engine": "vllm", "adapters": {"l": "/l", "d": {"path": "/d", "merge": True}}}
    parsed = parse_serve_config({"models": [model]}).models[0]
    assert parsed.adapters == {"l": "/l", "d": "/d"} and parsed.merge_adapters == ["d"]
    with pytest.raises(ServeConfigError, match=r"models\.0: .*merge: true is for engine vllm"):
        parse_serve_config({"models": [{**model, "engine": "hf"}]})
    with pytest.raises(ServeConfigError, match=r"models\.0: .*adapter 'd'"):
        parse_serve_config({"models": [{**model, "adapters": {"d": {"dir": "/d"}}}]})


def test_app_builder_needs_a_config(monkeypatch):
    monkeypatch.delenv("FTRAY_SERVE_CONFIG", raising=False)
    with pytest.raises(ServeConfigError, match="FTRAY_SERVE_CONFIG"):
        app_builder({})


def test_cli_serve_refuses_a_bad_config_before_ray(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"models": [{"name": "a", "path": "x", "temperature": 1}]}))
    result = CliRunner().invoke(cli, ["serve", str(cfg)])
    assert result.exit_code == 2
    assert "models.0.temperature" in result.output


class CharTokenizer:
    """Decodes ids as characters, enough to drive TextTracker."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_stop_string_split_across_tokens_is_held_back_then_cut():
    tracker = TextTracker(CharTokenizer(), ["END"])
    sent = [tracker.add(ord(c)) for c in "abEN"]
    assert "".join(text for text, _ in sent) == "ab"  # "EN" might become "END"
    assert tracker.add(ord("D")) == ("", True)
    tracker = TextTracker(CharTokenizer(), ["END"])
    assert "".join(tracker.add(ord(c))[0] for c in "abENx") + tracker.flush() == "abENx"


def test_left_padded_batch_equals_one_at_a_time(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts = [tok(p).input_ids for p in ["The answer is", "Classify the topic: cooking eggs and ham", "x"]]

    def run(jobs):
        texts = [""] * len(jobs)
        for events in decode_batch(model, tok, jobs, {tok.eos_token_id}, tok.pad_token_id):
            for i, event in enumerate(events):
                texts[i] += event.text if event else ""
        return texts

    greedy = [Job(p, 10) for p in prompts]
    assert run(greedy) == [run([job])[0] for job in greedy]
    sampled = [Job(p, 10, temperature=1.0, top_p=0.8, seed=5) for p in prompts]
    assert run(sampled) == [run([job])[0] for job in sampled]  # a row's draws ignore its batch mates
