"""US-Tuning: every positive answer is in its context and no negative answer is; judgements are exactly half
Sufficient; each prompt-sensitive prompt holds its causal instruction once, in one of 5 slots, and its
scripted CHECKING verdicts are true; stage 1 trains on stage-1 rows only and stage 2 follows it in one run."""

import json
import random

import pytest
import torch

from ftray.config import build_spec
from ftray.data import load_rows
from ftray.methods import Context, build_methods
from ftray.methods.us_tuning import (
    CAUSAL, INSUFFICIENT, REQUIREMENTS, STAGE1, STAGE2, SUFFICIENT, build_tuples, checked_target, mentions, parse_qa_answer,
    qa_prompt,
)
from tests.methods.helpers import prepare
from tests.train.helpers import events, train_tiny

ROWS = load_rows("bundled:factual_qa", "train", 60).to_list()


def test_tuples_have_the_positive_answer_in_context_and_the_negative_answer_nowhere_in_it():
    items = [{"question": r["prompt"], "answer": r["answer"], "category": r["category"]} for r in ROWS]
    tuples = build_tuples(items, 3, random.Random(0))
    assert len(tuples) >= 55
    for t in tuples:
        assert mentions(t["context"], t["answer"]) and t["question"] in t["context"]
        assert not mentions(t["context"], t["negative_answer"]) and t["negative"] not in t["context"]
        assert t["context"].count("\nQ: ") == 3


def test_prepare_data_rows_balanced_judgements_and_true_checking(ray_local):
    spec = build_spec({"methods": [{"name": "us_tuning", "draft_miss": 0.5}]})
    out, report = prepare(build_methods(spec.methods)[0], ROWS[:40], spec)
    stage1 = [r for r in out if r["task_type"] == STAGE1]
    qa = [r for r in out if r["task_type"] == STAGE2]
    assert report["stage1_rows"] == len(stage1) == 2 * len(qa) == 2 * report["tuples"]
    assert sum(r["completion"] == SUFFICIENT for r in stage1) == sum(r["completion"] == INSUFFICIENT for r in stage1)
    misses = 0
    for r in qa:
        lines = r["prompt"].split("\n\nContext:")[0].split("\n")
        (causal,) = [c for c in CAUSAL if r["prompt"].count(c) == 1]  # exactly one causal instruction, once
        slot = lines.index(causal)
        assert 1 <= slot <= len(REQUIREMENTS) and [x for x in lines[: len(REQUIREMENTS) + 1] if x != causal] == list(REQUIREMENTS)
        assert "CHECKING:" in r["completion"]
        gold = next(x["answer"] for x in ROWS if f"Question: {x['prompt']}" in r["prompt"])
        assert parse_qa_answer(r["completion"]) == CAUSAL[causal](gold)  # the final answer fulfils the rule
        missed = f"{causal} <not fulfilled>" in r["completion"]
        assert missed == (sum(x.startswith("ANSWER:") for x in r["completion"].split("\n")) == 2)  # a miss is always revised, and only then
        misses += missed
    assert 0 < misses < len(qa)


def test_checked_target_marks_only_a_real_miss():
    assert checked_target("8", "Write the answer in capital letters.", 2, miss=True).count("<not fulfilled>") == 0  # "8" is already upper
    text = checked_target("Paris", "Write the answer in capital letters.", 2, miss=True)
    assert text.startswith("ANSWER: Paris\nCHECKING:") and text.endswith("\nANSWER: PARIS")
    assert "Write the answer in capital letters. <not fulfilled>" in text and text.count("<fulfilled>") == 5
    assert parse_qa_answer("ANSWER: Not Provided\nCHECKING:\n...") == "Not Provided"
    plain = qa_prompt("ctx", "q?")
    assert "CHECKING" not in plain and all(s in plain for s in REQUIREMENTS)


def test_recognition_phase_masks_prompt_sensitive_rows_only():
    (method,) = build_methods(build_spec({"methods": ["us_tuning"]}).methods)
    assert [p.name for p in method.phases()] == ["recognition", "prompt_sensitive"]
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.ones(2, 4, dtype=torch.long),
             "task_type": torch.tensor([STAGE1, STAGE2])}
    ctx = Context(spec=build_spec({}), tokenizer=None, phase="recognition")
    masked = method.corrupt_batch(batch, ctx)["labels"]
    assert masked[0].tolist() == [1, 1, 1, 1] and masked[1].tolist() == [-100] * 4
    ctx.phase = "prompt_sensitive"
    assert torch.equal(method.corrupt_batch(batch, ctx)["labels"], batch["labels"])


def test_check_refuses_packing_and_lora():
    with pytest.raises(ValueError, match="packing"):
        build_spec({"methods": ["us_tuning"], "data": {"packing": True}})
    with pytest.raises(ValueError, match="cannot be combined"):
        build_spec({"methods": ["lora", "us_tuning"]})


def test_real_run_trains_stage_two_after_stage_one(ray_local, tiny_model_dir, tmp_path):
    result = train_tiny(tiny_model_dir, tmp_path, "us_tuning", methods=[{"name": "us_tuning", "recognition_fraction": 0.5}],
                        data={"source": "bundled:factual_qa", "max_len": 768, "max_samples": 16, "eval_max_samples": 4},
                        train={"max_steps": 4, "batch_size": 4})
    phases = [e for e in events(result.run_dir) if e["event"] == "phase"]
    assert [e["step"] for e in phases] == [0, 2]  # recognition for steps 0-1, prompt-sensitive tuning for steps 2-3
    report = json.loads((result.run_dir / "data_report.json").read_text())["us_tuning"]
    assert report["stage1_rows"] == 2 * report["stage2_qa_rows"] == 32
