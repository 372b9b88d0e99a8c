"""MPCC: the box hides the centre of the chosen object (its edges stay visible), the reward verifies the
answer, and GRPO with a prior-guided sample pushes the policy toward the right answer even when every
sampled reply is wrong (with no prior sample such a group gives exactly zero loss)."""

import io
import random

import pytest
import torch
from PIL import Image

from ftray.config import build_spec
from ftray.data import load_rows
from ftray.methods import Context, build_methods
from ftray.methods.mpcc import MPCCConfig, final_answer, hidden_box, masked_rows, reward, sequence_logprob
from ftray.tasks import get_task


def test_the_box_hides_the_centre_of_the_chosen_object_and_names_it():
    row = load_rows("bundled:shapes_vqa", "train", 1).to_list()[0]
    out = masked_rows(row, MPCCConfig(objects_per_scene=1), random.Random(0))
    assert len(out) == 1
    obj = row["objects"][out[0]["hidden"]]
    assert out[0]["answer"] == f"{obj['colour']} {obj['kind']}"
    x0, y0, x1, y1 = out[0]["box"]
    bx0, by0, bx1, by1 = obj["box"]
    assert bx0 < x0 < x1 < bx1 and by0 < y0 < y1 < by1  # inside the object's box: its edges stay visible
    img = Image.open(io.BytesIO(out[0]["images"][0])).convert("RGB")
    assert img.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == (128, 128, 128)
    assert hidden_box([0, 0, 10, 10], 0.6) == [2, 2, 8, 8]


def test_reward_checks_the_answer_and_the_format():
    assert reward("red circle", "red circle", cot=False, format_reward=0.1) == pytest.approx(1.1)
    assert reward("blue circle", "red circle", cot=False, format_reward=0.1) == pytest.approx(0.1)
    assert reward("I see things.\nAnswer: Red circle.", "x\nAnswer: red circle", cot=True, format_reward=0.1) == pytest.approx(1.1)
    assert final_answer("a\nAnswer: green  square.") == "green square"


def _rl_setup(tiny_llava_dir, prior_samples):
    spec = build_spec({"model": {"name": str(tiny_llava_dir)}, "task": {"type": "vision_language"},
                       "methods": [{"name": "mpcc", "mode": "rl", "group_size": 4, "prior_samples": prior_samples, "max_new_tokens": 6}]})
    task = get_task(spec)
    rows = [m for r in load_rows("bundled:shapes_vqa", "train", 2).to_list() for m in masked_rows(r, MPCCConfig(mode="sft_direct"), random.Random(0))]
    import datasets

    batch = task.collate(task.tokenize(datasets.Dataset.from_list(rows), task.processor.tokenizer, "test"), task.processor.tokenizer.pad_token_id)
    model = task.load_model()
    method = build_methods(spec.methods)[0]
    return method, model, batch, Context(spec=spec, tokenizer=task.processor.tokenizer), task


def test_prior_sampling_gives_a_gradient_toward_the_answer_when_every_sample_is_wrong(tiny_llava_dir):
    method, model, batch, ctx, task = _rl_setup(tiny_llava_dir, prior_samples=1)
    pad = ctx.tokenizer.pad_token_id
    labels = batch["labels"][0]
    pos = (labels != -100).nonzero().squeeze(1)
    start = int(pos[0])
    ref = batch["input_ids"][0, : int(pos[-1]) + 1].unsqueeze(0)
    extra = {"pixel_values": batch["pixel_values"][:1]}
    before = float(sequence_logprob(model, ref, start, extra, pad).detach())
    loss, metrics = method.loss(model, batch, None, ctx)
    assert metrics["reward"] < 1.0  # the random model answers wrong; only the prior-guided replies are right
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    assert float(sequence_logprob(model, ref, start, extra, pad).detach()) > before


def test_without_prior_samples_an_all_wrong_group_gives_zero_loss(tiny_llava_dir):
    method, model, batch, ctx, _ = _rl_setup(tiny_llava_dir, prior_samples=0)
    loss, metrics = method.loss(model, batch, None, ctx)
    if metrics["groups_solved"] == 0 and metrics["reward"] in (0.0, 0.1):  # every reply equally wrong (and formatted alike)
        assert float(loss) == 0.0
    else:  # a random model that happens to vary in format still gives a finite loss
        assert torch.isfinite(loss)


def test_prepare_data_writes_one_row_per_hidden_object(ray_local, tiny_llava_dir):
    import ray.data

    spec = build_spec({"model": {"name": str(tiny_llava_dir)}, "task": {"type": "vision_language"},
                       "methods": [{"name": "mpcc", "mode": "sft_cot", "objects_per_scene": 2}]})
    rows = load_rows("bundled:shapes_vqa", "train", 6).to_list()
    ctx = Context(spec=spec, tokenizer=None)
    out = build_methods(spec.methods)[0].prepare_data(ray.data.from_items(rows), ctx).take_all()
    assert len(out) == sum(min(2, len(r["objects"])) for r in rows) == ctx.report["rows_out"]
    for r in out:
        reply = r["messages"][1]["content"][0]["text"]
        assert reply.endswith(f"Answer: {r['answer']}") and isinstance(r["images"][0], bytes)
