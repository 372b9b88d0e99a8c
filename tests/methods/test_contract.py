"""The contract every registered method meets; a new method gets these checks for free."""

import copy
import math
from pathlib import Path

import pytest
import torch

from ftray.config import build_spec, load_spec
from ftray.data import load_rows
from ftray.eval.loading import load_checkpoint
from ftray.methods import REGISTRY, Context, build_methods
from ftray.models import load_model
from ftray.tasks import get_task
from ftray.train.checkpoint import export_hf
from ftray.train.loop import train_step
from ftray.train.optim import build_optimizer, build_scheduler
from ftray.tune.space import load_space, param_space, sample_spec
from tests.methods.helpers import random_batch

ROOT = Path(__file__).resolve().parents[2]
NAMES = sorted(REGISTRY)


def two_steps(model, methods, ctx, make_batch, task=None) -> None:
    """Two real optimizer steps as the loop takes them (methods' groups/optimizer, on_step); each loss is finite."""
    groups = next((g for m in methods if (g := m.param_groups(model, ctx))), None)
    params = groups or [p for p in model.parameters() if p.requires_grad]
    opt = next((o for m in methods if (o := m.optimizer(params, ctx))), None) or build_optimizer(params, ctx.spec.train)
    sched = build_scheduler(opt, ctx.spec.train, 2)
    for step in range(2):
        ctx.step = step
        for m in methods:
            m.on_step(model, opt, ctx)
        metrics = train_step(model, [make_batch(step)], methods, opt, sched, ctx, amp=None, task=task)
        assert math.isfinite(metrics["loss"])


@pytest.mark.parametrize("name", NAMES)
def test_method_has_test_tune_space_docs_and_defaults(name):
    cls = REGISTRY[name]
    assert (ROOT / "tests" / "methods" / f"test_{name}.py").exists()
    assert (ROOT / "tune_spaces" / f"{name}.yaml").exists()
    assert cls.paper and cls.__module__ and REGISTRY[name].__doc__
    assert all(f.description for f in cls.Config.model_fields.values()), "every config field is documented"
    cls.Config()  # every field has the paper's default


@pytest.mark.parametrize("name", NAMES)
def test_method_has_a_recipe_that_validates_and_uses_it(name):
    spec = load_spec(name)  # ftray/recipes/<name>.yaml, validated as `ftray train <name>` would
    assert name in [m["name"] for m in spec.methods]


@pytest.mark.parametrize("name", NAMES)
def test_tune_space_samples_valid_run_specs(name):
    base = build_spec({"methods": [name], "task": {"type": REGISTRY[name].tasks[0]}})
    space = load_space(ROOT / "tune_spaces" / f"{name}.yaml")
    domains = param_space(space, base, name)
    for _ in range(10):
        sample_spec(domains, base)


@pytest.mark.parametrize("name", [n for n in NAMES if "causal_lm" in REGISTRY[n].tasks])
def test_two_steps_finite_loss_only_declared_params_change_and_finalize_round_trips(name, tiny_model_dir, tiny_tokenizer, tmp_path):
    spec = build_spec({"model": {"name": str(tiny_model_dir)}, "methods": [name], "train": {"lr": 1e-2, "warmup_ratio": 0}})
    methods = build_methods(spec.methods)
    ctx = Context(spec=spec, tokenizer=tiny_tokenizer, max_steps=2)
    base = load_model(str(tiny_model_dir))
    model = copy.deepcopy(base)
    for m in methods:
        model = m.prepare_model(model, ctx)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    declared = {n for n, p in model.named_parameters() if p.requires_grad}
    two_steps(model, methods, ctx, lambda step: random_batch(vocab=len(tiny_tokenizer), seed=step))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= declared

    for m in methods:
        model = m.finalize(model, base, ctx)
    export_hf(model, model.state_dict(), tmp_path / "out")
    tiny_tokenizer.save_pretrained(tmp_path / "out")
    reloaded, _ = load_checkpoint(tmp_path / "out", merge=False)
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def _task_batch(task, tokenizer, seed: int) -> dict:
    """A real collated micro-batch of the task from bundled text (classification), image rows (vision_language)
    or synthetic triples (retrieval)."""
    import datasets

    g = torch.Generator().manual_seed(seed)
    if task.name == "classification":
        ds = load_rows("bundled:classification_lt", "train", 8)
    elif task.name == "vision_language":
        ds = load_rows("bundled:shapes_vqa", "train", 8)
    else:
        n = task.spec.task.negatives
        ds = datasets.Dataset.from_list([{"query": f"what is {i}?", "positive": f"{i} is a number", "negatives": [f"{i + j + 1} apples" for j in range(n)],
                                          "teacher_scores": torch.randn(n + 1, generator=g).tolist()} for i in range(4)])
    return task.collate(task.tokenize(ds, tokenizer, "test")[:4], tokenizer.pad_token_id)


TASK_CASES = [(n, t) for n in NAMES for t in REGISTRY[n].tasks if t != "causal_lm"]


@pytest.mark.parametrize("name,task_type", TASK_CASES)
def test_two_steps_on_classification_and_retrieval_give_finite_loss(name, task_type, tiny_model_dir, tiny_tokenizer, request):
    if task_type == "vision_language":  # the tiny LLaVA shares the tiny tokenizer (plus its <image> token)
        tiny_model_dir = request.getfixturevalue("tiny_llava_dir")
    spec = build_spec({"model": {"name": str(tiny_model_dir)}, "task": {"type": task_type, "num_labels": 4, "negatives": 3},
                       "methods": [name], "train": {"lr": 1e-2, "warmup_ratio": 0}})
    task = get_task(spec)
    methods = build_methods(spec.methods)
    ctx = Context(spec=spec, tokenizer=tiny_tokenizer, max_steps=2)
    ctx.draw_batch = lambda: _task_batch(task, tiny_tokenizer, 99)
    model = task.load_model()
    for m in methods:
        model = m.prepare_model(model, ctx)
    two_steps(model, methods, ctx, lambda step: _task_batch(task, tiny_tokenizer, step), task)


DATA_METHODS = [n for n in NAMES if "prepare_data" in REGISTRY[n].hooks()]


@pytest.mark.parametrize("name", DATA_METHODS)
def test_prepare_data_on_32_rows_gives_valid_rows_a_report_and_then_the_cache(name, tiny_model_dir, tiny_tokenizer, tmp_path, ray_local, request):
    """The method's bench data (or the default), 32 rows, the tiny random model (LLaVA for VLM methods): rows the
    task can tokenize, the method's entry in data_report.json, and the same rows from the cache on a second call."""
    import json

    from ftray.data.prepare import REPORT, prepare_training_data
    from ftray.train.trainer import training_source_rows

    bench = copy.deepcopy(REGISTRY[name].bench)
    if bench.get("task", {}).get("type") == "vision_language":
        tiny_model_dir = request.getfixturevalue("tiny_llava_dir")
        tiny_tokenizer = get_task(build_spec({"model": {"name": str(tiny_model_dir)}, "task": {"type": "vision_language"}})).processor.tokenizer
    data = {**bench.get("data", {}), "max_samples": 32, "max_len": max(128, bench.get("data", {}).get("max_len", 128))}
    methods_entry = next((m for m in bench.get("methods", []) if m["name"] == name), {"name": name})
    spec = build_spec({"model": {"name": str(tiny_model_dir)}, "data": data, "task": bench.get("task", {}),
                       "methods": [methods_entry], "output": {"dir": str(tmp_path)}})
    d = spec.data
    rows = training_source_rows(spec, d.split, d.max_samples) if d.sources else load_rows(d.source, d.split, d.max_samples)
    logs = []
    out, entry = prepare_training_data(spec, build_methods(spec.methods), rows, tiny_tokenizer, log=logs.append)
    assert len(out) > 0 and get_task(spec).tokenize(out, tiny_tokenizer, "prepared")
    assert name in json.loads((entry / REPORT).read_text())
    again, entry2 = prepare_training_data(spec, build_methods(spec.methods), rows, tiny_tokenizer, log=logs.append)
    assert entry2 == entry and "reusing the cache" in logs[-1] and again.to_list() == out.to_list()
