"""The HF engine's continuous batching (`serving.generation.ContinuousBatcher`), without Ray.

Sequences join a running batch at any step and leave it when they finish; each must decode exactly as
it would alone (fp32 tiny model), with its own sampling settings and stop strings.
"""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving.generation import ContinuousBatcher, Event, Job

PROMPTS = ["The answer is", "Classify the topic: cooking eggs", "x", "Options: a, b or c and then more"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, tok


@pytest.fixture
def batcher(tiny):
    """A batcher that never meets an end-of-sequence token, so every job runs to max_tokens."""
    model, tok = tiny
    batcher = ContinuousBatcher(model, tok, eos_ids=set(), pad_id=tok.pad_token_id, max_batch_size=8)
    yield batcher
    batcher.close()


class Run:
    """One submitted job: its events as they come, appended to a log shared with other runs."""

    def __init__(self, batcher: ContinuousBatcher, job: Job, name: str = "", log: list | None = None):
        self.events: list[Event] = []
        self.log = log if log is not None else []
        self.name, self.done = name, threading.Event()
        self.tokens_seen = threading.Semaphore(0)
        self.seq = batcher.submit(job, self._emit)

    def _emit(self, event: Event | Exception) -> None:
        assert not isinstance(event, Exception), event
        self.events.append(event)
        self.log.append(self.name)
        self.tokens_seen.release()
        if event.finish_reason is not None:
            self.done.set()

    def wait_tokens(self, n: int) -> None:
        for _ in range(n):
            assert self.tokens_seen.acquire(timeout=60)

    def text(self) -> str:
        assert self.done.wait(60)
        return "".join(e.text for e in self.events)


def alone(batcher: ContinuousBatcher, job: Job) -> str:
    return Run(batcher, job).text()


def test_a_request_joins_while_another_decodes(batcher, tiny):
    tok = tiny[1]
    long, short = Job(tok(PROMPTS[0]).input_ids, 30), Job(tok(PROMPTS[1]).input_ids, 4)
    long_alone, short_alone = alone(batcher, long), alone(batcher, short)
    start, log = batcher.forwards, []
    first = Run(batcher, long, "long", log)
    first.wait_tokens(3)  # the long sequence is mid-decode
    second = Run(batcher, short, "short", log)
    assert (first.text(), second.text()) == (long_alone, short_alone)
    # The short request started after the long one had 3 tokens, and finished before it: it joined the
    # batch, and the long one kept decoding meanwhile (one token each per step).
    begin, end = log.index("short"), len(log) - 1 - log[::-1].index("short")
    assert log[:begin].count("long") >= 3 and "long" in log[end + 1:]
    assert log[begin:end + 1].count("long") >= 3
    # Decoded together: the long one's 30 forwards plus one prefill for the short one, not 30 + 4.
    assert batcher.forwards - start == 31


def test_concurrent_greedy_equals_single_and_generate(batcher, tiny):
    model, tok = tiny
    jobs = [Job(tok(p).input_ids, 8 + 3 * i) for i, p in enumerate(PROMPTS)]
    single = [alone(batcher, job) for job in jobs]
    runs = []
    for job in jobs:  # each arrives while the ones before it are decoding
        runs.append(Run(batcher, job))
        runs[-1].wait_tokens(2)
    assert [r.text() for r in runs] == single
    ids = tok(PROMPTS[3], return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=17, do_sample=False)[0, ids.shape[1]:]
    assert single[3] == tok.decode(generated, skip_special_tokens=True)


def test_sampling_settings_and_stop_strings_are_per_request(batcher, tiny):
    tok = tiny[1]
    prompt = tok(PROMPTS[1]).input_ids
    full = alone(batcher, Job(prompt, 16))
    stop = full[4:7]
    assert stop.strip(), full
    jobs = {
        "greedy": Job(prompt, 16),
        "stopped": Job(prompt, 16, stop=[stop]),
        "seed 5": Job(prompt, 12, temperature=1.0, top_p=0.8, seed=5),
        "seed 6": Job(prompt, 12, temperature=1.0, top_p=0.8, seed=6),
        "hot": Job(tok(PROMPTS[3]).input_ids, 10, temperature=0.7, seed=1, logprobs=2),
    }
    single = {name: alone(batcher, job) for name, job in jobs.items()}
    runs = {}
    for name, job in jobs.items():
        runs[name] = Run(batcher, job)
        runs[name].wait_tokens(1)
    together = {name: run.text() for name, run in runs.items()}
    assert together == single
    assert together["greedy"] == full
    assert together["stopped"] == full[:full.index(stop)]
    assert runs["stopped"].events[-1].finish_reason == "stop"
    assert runs["greedy"].events[-1].finish_reason == "length"
    assert together["seed 5"] != together["seed 6"]
    assert all(e.token is not None and len(e.token[2]) == 2 for e in runs["hot"].events)


def test_a_cancelled_sequence_leaves_the_batch(batcher, tiny):
    tok = tiny[1]
    stays, goes = Run(batcher, Job(tok(PROMPTS[0]).input_ids, 20)), Run(batcher, Job(tok("x").input_ids, 400))
    goes.wait_tokens(2)
    goes.seq.cancelled = True
    assert stays.text()
    assert not goes.done.is_set() and len(goes.events) < 25
    assert batcher.rows == []
