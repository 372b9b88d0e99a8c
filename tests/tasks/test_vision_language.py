"""vision_language as a task type: label masks, pixel collation, trainable groups, the image path's gradient, Ray Train."""

from __future__ import annotations

import random

import datasets
import pytest
import torch

from ftray.config import SpecError, build_spec
from ftray.data import DataError
from ftray.data.bundled.shapes_vqa import COLOURS, draw
from ftray.tasks import get_task
from ftray.tasks.vision_language import IGNORE_INDEX, drop_images, group_of, full_modules, image_bytes, image_token_ids, normalize_messages

from tests.tasks.vlm_helpers import overfit

MODELS = ["tiny_llava_dir", "tiny_idefics3_dir"]


def vl_task(model_dir, **vlm):
    return get_task(build_spec({"model": {"name": str(model_dir)}, "task": {"type": "vision_language", "vlm": vlm},
                                "data": {"max_len": 128}}))


def colour_rows() -> list[dict]:
    """8 one-shape scenes whose answer is the shape's colour: only the image can tell them apart."""
    rng = random.Random(0)
    rows = []
    for colour in COLOURS:
        for kind in ("circle", "square"):
            img = draw([{"kind": kind, "colour": colour, "cell": 4, "box": [28, 28, 68, 68]}], rng)
            rows.append({"images": [image_bytes(img)], "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": colour}]}]})
    return rows


def tokenize(task, rows: list[dict]) -> list[dict]:
    return task.tokenize(datasets.Dataset.from_list(rows), None, "rows")


@pytest.mark.parametrize("model", MODELS)
def test_labels_only_on_assistant_replies_never_on_image_tokens(model, request):
    task = vl_task(request.getfixturevalue(model))
    img = colour_rows()[0]["images"][0]
    row = {"images": [img, img], "messages": [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red again"}]}]}
    (r,) = tokenize(task, [row])
    tok, special = task.processor.tokenizer, image_token_ids(task.processor)
    image_id = task.processor.image_token_id
    assert sum(t == image_id for t in r["input_ids"]) > 2  # each image expanded into several tokens
    assert all(y == IGNORE_INDEX for t, y in zip(r["input_ids"], r["labels"]) if t in special)
    learned = [y for y in r["labels"] if y != IGNORE_INDEX]
    assert tok.decode(learned) == "red<|im_end|>\nred again<|im_end|>\n"  # both replies and their end-of-turn, nothing else
    assert all(y in (t, IGNORE_INDEX) for t, y in zip(r["input_ids"], r["labels"]))
    assert normalize_messages([{"role": "user", "content": "hi"}]) == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]


@pytest.mark.parametrize("model", MODELS)
def test_collate_pads_and_batches_pixels(model, request):
    task = vl_task(request.getfixturevalue(model))
    rows = tokenize(task, colour_rows()[:3])
    batch = task.collate(rows, task.processor.tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["pixel_values"].shape[0] == 3 and batch["pixel_values"].shape[-2:] == (32, 32)
    if model == "tiny_idefics3_dir":
        assert batch["pixel_attention_mask"].shape == (3, 1, 32, 32)  # Idefics3: [B, images, H, W]


def test_no_image_variant_has_no_pixels_or_image_tokens(tiny_llava_dir):
    task = vl_task(tiny_llava_dir)
    rows = tokenize(task, [drop_images(r) for r in colour_rows()[:2]])
    batch = task.collate(rows, task.processor.tokenizer.pad_token_id)
    assert "pixel_values" not in batch
    assert not (batch["input_ids"] == task.processor.image_token_id).any()


def test_bad_rows_are_named(tiny_llava_dir):
    task = vl_task(tiny_llava_dir)
    rows = colour_rows()[:2]
    rows[1] = {**rows[1], "images": rows[1]["images"] * 2}  # two images, one image part
    with pytest.raises(DataError, match=r"row 2.*image parts"):
        tokenize(task, rows)
    with pytest.raises(DataError, match="columns 'images' and 'messages'"):
        task.tokenize(datasets.Dataset.from_list([{"text": "x"}]), None, "rows")
    with pytest.raises(SpecError, match="every group is frozen"):
        build_spec({"task": {"type": "vision_language", "vlm": {"projector": "frozen", "language_model": "frozen"}}})


def test_groups_are_found_by_module_name_across_families():
    names = {"model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight": "vision_tower",  # LLaVA
             "model.multi_modal_projector.linear_1.weight": "projector",
             "model.language_model.layers.0.self_attn.q_proj.weight": "language_model",
             "model.vision_model.post_layernorm.weight": "vision_tower",  # Idefics3 / SmolVLM
             "model.connector.modality_projection.proj.weight": "projector",
             "model.text_model.embed_tokens.weight": "language_model",
             "model.visual.blocks.0.attn.qkv.weight": "vision_tower",  # Qwen2-VL: the merger sits inside `visual`
             "model.visual.merger.mlp.0.weight": "projector",
             "lm_head.weight": "language_model"}
    assert {n: group_of(n) for n in names} == names
    # full vision tower beside a LoRA projector nested in it: the tower's other parts are saved, not the merger
    lin = torch.nn.Linear
    net = torch.nn.ModuleDict({"visual": torch.nn.ModuleDict({"blocks": lin(2, 2), "patch_embed": lin(2, 2), "merger": lin(2, 2)}),
                               "language_model": lin(2, 2)})
    assert full_modules(net, {"vision_tower"}) == ["visual.blocks", "visual.patch_embed"]
    assert full_modules(net, {"vision_tower", "projector"}) == ["visual"]


def test_packaged_recipe_validates():
    from ftray.config import load_spec

    spec = load_spec("vision_language")
    assert spec.task.type == "vision_language" and spec.data.source == "bundled:shapes_vqa"
    assert (spec.task.vlm.vision_tower, spec.task.vlm.projector, spec.task.vlm.language_model) == ("frozen", "full", "lora")


def one_step(task, rows) -> tuple[dict, dict, torch.nn.Module, torch.optim.Optimizer]:
    """State before and after one AdamW step of the task's model on `rows`."""
    torch.manual_seed(0)
    model = task.load_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = task.param_groups(model) or [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(groups, lr=1e-2)
    _, loss, n = task.forward_and_loss(model, task.collate(rows, task.processor.tokenizer.pad_token_id), None)
    (loss / n).backward()
    opt.step()
    after = {n: p.detach() for n, p in model.named_parameters()}
    return before, after, model, opt


@pytest.mark.parametrize("model,vlm", [
    ("tiny_llava_dir", {"vision_tower": "frozen", "projector": "full", "language_model": "lora", "projector_lr": 1e-3}),
    ("tiny_llava_dir", {"vision_tower": "full", "projector": "frozen", "language_model": "frozen"}),
    ("tiny_idefics3_dir", {"vision_tower": "lora", "projector": "frozen", "language_model": "full"}),
])
def test_only_the_chosen_groups_change(model, vlm, request):
    task = vl_task(request.getfixturevalue(model), **vlm)
    before, after, m, opt = one_step(task, tokenize(task, colour_rows()[:4]))
    cfg = task.spec.task.vlm
    for group in ("vision_tower", "projector", "language_model"):
        mode = getattr(cfg, group)
        names = [n for n in before if group_of(n) == group]
        adapter = [n for n in names if "lora_" in n]
        base = [n for n in names if "lora_" not in n and "modules_to_save" not in n]
        changed = {n for n in names if not torch.equal(before[n], after[n])}
        if mode == "frozen":
            assert not changed, f"{group} is frozen but {sorted(changed)[:3]} changed"
        elif mode == "lora":
            assert adapter and not changed & set(base), f"{group}: LoRA must leave the base weights bit-identical"
            assert changed & set(adapter)
        else:
            assert changed, f"{group} trains in full but nothing changed"
    if cfg.projector_lr:
        assert sorted(g["lr"] for g in opt.param_groups) == [1e-3, 1e-2]


def overfit_loss(task, rows, steps: int = 120) -> float:
    return overfit(task, task.collate(tokenize(task, rows), task.processor.tokenizer.pad_token_id), steps)[1]


@pytest.mark.parametrize("model", MODELS)
def test_image_path_carries_gradient(model, request):
    # The answer (one of 4 colours) is only in the pixels: with the images the model fits all 8 rows;
    # without them the best it can do is a uniform guess over the colours (≈ ln 4 on the colour token).
    task = vl_task(request.getfixturevalue(model))  # defaults: tower frozen, projector and LM full
    rows = colour_rows()
    with_images, without = overfit_loss(task, rows), overfit_loss(task, [drop_images(r) for r in rows])
    assert with_images < 0.05
    assert without > 0.2 and without > 5 * with_images


def test_trains_on_ray_and_the_final_dir_reloads(ray_local, tiny_llava_dir, tmp_path):
    from ftray.eval import evaluate
    from ftray.eval.loading import load_checkpoint
    from tests.train.helpers import train_tiny

    result = train_tiny(
        tiny_llava_dir, tmp_path, "vlm",
        task={"type": "vision_language", "vlm": {"language_model": "lora", "projector_lr": 1e-3}},
        data={"source": "bundled:shapes_vqa", "max_len": 128, "max_samples": 32, "eval_max_samples": 8},
        methods=["full"], train={"max_steps": 4, "lr": 2e-3},
    )
    final = result.final_dir
    assert (final / "adapter_config.json").exists() and (final / "processor_config.json").exists()
    assert result.metrics["loss"] > 0 and "eval_loss" in result.metrics
    model, _ = load_checkpoint(final)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    m = evaluate(str(final), max_samples=4)
    assert m["task"] == "vision_language" and m["n"] == 4 and 0 <= m["exact_match"] <= 1
