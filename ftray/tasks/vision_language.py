"""Vision-language fine-tuning: `{images, messages}` rows → an AutoModelForImageTextToText, LM loss on the replies.

Rows use the Hugging Face chat format with image parts: `{"images": ["a.png"], "messages": [{"role": "user",
"content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]}, {"role": "assistant",
"content": [{"type": "text", "text": "red"}]}]}` (one image part per entry of `images`, in order; a
content may also be a plain string). The model's own `AutoProcessor` renders its chat template and expands
each image into its image tokens, so LLaVA, Idefics3/SmolVLM and Qwen2-VL need no code of their own here.

Labels (the same rule as text chat, `ftray.data.tokenize`): an assistant turn starts where the
conversation before it, rendered with add_generation_prompt=True and processed with its images, ends, and
ends where the conversation up to and including it ends; everything else (system and user turns, template
markup, image tokens, padding) is -100. Rows keep their images as encoded bytes (so a worker on another
node needs no shared filesystem); `collate` runs the image processor on the micro-batch.

What trains is `task.vlm`: the groups `vision_tower`, `projector` and `language_model`, each frozen, full
or LoRA (one PEFT adapter over the LoRA groups; full groups become its `modules_to_save`, so the
checkpoint is one adapter directory), and an optional separate projector learning rate.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from PIL import Image

from ftray.config import RunSpec, VisionLanguageSpec
from ftray.data.errors import DataError, row_error
from ftray.data.formats import validate_rows
from ftray.models import load_model, load_processor
from ftray.train.loss import Criterion

IGNORE_INDEX = -100
# Module-name components that mark a group, checked in this order (a projector inside the vision module,
# Qwen2-VL's `visual.merger`, is a projector); anything else belongs to the language model.
GROUP_KEYS = (
    ("projector", ("multi_modal_projector", "connector", "visual.merger", "mm_projector")),
    ("vision_tower", ("vision_tower", "vision_model", "visual", "vision_encoder")),
)
GROUPS = ("vision_tower", "projector", "language_model")
# Processor attributes naming image placeholder/markup tokens (LLaVA, Idefics3, Qwen2-VL, ...).
IMAGE_TOKEN_ATTRS = ("image_token", "fake_image_token", "global_image_token", "image_start_token", "image_end_token",
                     "vision_start_token", "vision_end_token", "boi_token", "eoi_token")


class VisionLanguage:
    """Next-token prediction on the assistant replies of image+text conversations."""

    name = "vision_language"

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self._processor = None

    @property
    def processor(self) -> Any:
        """The model's AutoProcessor (loaded once); checkpoints save it, so they reload with their image processor."""
        if self._processor is None:
            self._processor = load_processor(self.spec.model.name)
        return self._processor

    def load_model(self) -> torch.nn.Module:
        """The AutoModelForImageTextToText with `task.vlm`'s groups frozen, trainable or LoRA-wrapped."""
        m = self.spec.model
        return apply_groups(load_model(m.name, dtype=m.dtype, task="vision_language"), self.spec.task.vlm)

    def tokenize(self, ds: datasets.Dataset, tokenizer: Any, source: str) -> list[dict]:
        """Rows → {input_ids, labels, images (encoded bytes), length}; bad rows are named by number."""
        for col in ("images", "messages"):
            if col not in ds.column_names:
                raise DataError(f"{source}: task.type=vision_language needs columns 'images' and 'messages'; found {ds.column_names}")
        validate_rows(ds, "vision", source)
        base_dirs = [Path(s).expanduser().parent for s in (self.spec.data.source, self.spec.data.eval_source) if s and not s.startswith("bundled:")]
        special, out = image_token_ids(self.processor), []
        for i, row in enumerate(ds, 1):
            try:
                images = [image_bytes(x, base_dirs) for x in row["images"]]
                out.append(encode_row(self.processor, normalize_messages(row["messages"]), images, self.spec.data.max_len, special))
            except (ValueError, OSError) as err:
                raise row_error(source, i, str(err)) from None
        return out

    def collate(self, rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """Right-padded input_ids/attention_mask/labels [B, T] plus the image processor's tensors (pixel_values, ...)."""
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k], labels[i, :k], mask[i, :k] = torch.as_tensor(r["input_ids"]), torch.as_tensor(r["labels"]), 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        images = [[decode_image(b) for b in r["images"]] for r in rows]
        if any(images):
            # The nested per-row list is what the processor itself hands its image processor, which then
            # batches the way its model expects: LLaVA/Qwen2-VL concatenate, Idefics3 pads to [B, max_images, ...].
            pixels = self.processor.image_processor(images, return_tensors="pt")
            batch.update({k: v for k, v in pixels.items() if isinstance(v, torch.Tensor)})
        return batch

    def forward_and_loss(self, model: torch.nn.Module, batch: dict, amp: torch.dtype | None,
                         criterion: Criterion | None = None) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """(output, summed next-token loss over label tokens, label-token count)."""
        labels = batch["labels"]
        keep = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)  # logits only where some row has a label
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.autocast(labels.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(**inputs, use_cache=False, logits_to_keep=keep)
        targets = labels[:, keep + 1].reshape(-1)
        logits = out.logits.reshape(-1, out.logits.size(-1)).float()
        loss_sum = criterion(logits, targets) if criterion else None
        if loss_sum is None:
            loss_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        return out, loss_sum, (targets != IGNORE_INDEX).sum()

    def param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]] | None:
        """Two optimizer groups when `task.vlm.projector_lr` is set (the projector's lr, the run's for the rest)."""
        lr = self.spec.task.vlm.projector_lr
        if lr is None:
            return None
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        projector = [p for n, p in trainable if group_of(n) == "projector"]
        rest = [p for n, p in trainable if group_of(n) != "projector"]
        return [g for g in ({"params": rest}, {"params": projector, "lr": lr}) if g["params"]]


def group_of(name: str) -> str:
    """The trainable group of a parameter or module name: vision_tower, projector or language_model."""
    parts = name.split(".")
    for group, keys in GROUP_KEYS:
        for key in keys:
            kp = key.split(".")
            if any(parts[i : i + len(kp)] == kp for i in range(len(parts) - len(kp) + 1)):
                return group
    return "language_model"


def apply_groups(model: torch.nn.Module, cfg: VisionLanguageSpec) -> torch.nn.Module:
    """Freeze, train or LoRA-wrap each group of `model` as `cfg` says; returns the model (a PeftModel with LoRA)."""
    modes = {g: getattr(cfg, g) for g in GROUPS}
    present = {group_of(n) for n, _ in model.named_parameters()}
    missing = [g for g in GROUPS if g not in present and modes[g] != "frozen"]
    if missing:
        raise ValueError(f"task.vlm: {type(model).__name__} has no parameters of group(s) {', '.join(missing)} "
                         f"(looked for module names {dict(GROUP_KEYS)}); set them to frozen")
    for n, p in model.named_parameters():
        p.requires_grad_(modes[group_of(n)] == "full")
    lora = {g for g, mode in modes.items() if mode == "lora"}
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    # PEFT matches target names by suffix, so full names pick exactly these layers (the LM head is an
    # output layer, left out as PEFT's "all-linear" does).
    targets = [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and group_of(n) in lora
               and n.split(".")[-1] != "lm_head"]
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                        modules_to_save=full_modules(model, {g for g, mode in modes.items() if mode == "full"}) or None)
    return get_peft_model(model, config)


def full_modules(model: torch.nn.Module, groups: set[str]) -> list[str]:
    """The largest submodules whose parameters all belong to `groups` (trained in full beside LoRA: PEFT's modules_to_save)."""
    subtree: dict[str, set[str]] = {}
    for n, _ in model.named_parameters():
        parts = n.split(".")
        for k in range(1, len(parts)):
            subtree.setdefault(".".join(parts[:k]), set()).add(group_of(n))
    inside = {m for m, gs in subtree.items() if gs <= groups}
    return sorted(m for m in inside if m.rpartition(".")[0] not in inside)


def normalize_messages(messages: list[dict]) -> list[dict]:
    """Messages with list content (a string becomes one text part) and no None-valued keys (Arrow adds them)."""
    out = []
    for m in messages:
        content = m["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        out.append({"role": m["role"], "content": [{k: v for k, v in p.items() if v is not None} for p in parts]})
    return out


def count_images(messages: list[dict]) -> int:
    """How many image parts `messages` hold."""
    return sum(p["type"] == "image" for m in messages for p in m["content"])


def image_bytes(image: Any, base_dirs: list[Path] = ()) -> bytes:
    """The encoded bytes of an image given as a path (absolute, or relative to the cwd or a data file's dir),
    a PIL image, or a datasets Image dict {bytes, path}."""
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, bytes):
        return image
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    if isinstance(image, str):
        for candidate in (Path(image).expanduser(), *(d / image for d in base_dirs)):
            if candidate.is_file():
                return candidate.read_bytes()
        raise ValueError(f"image file {image!r} does not exist")
    raise ValueError(f"an image must be a path, a PIL image or a {{bytes, path}} dict, got {type(image).__name__}")


def decode_image(data: bytes) -> Image.Image:
    """An RGB PIL image from encoded bytes."""
    return Image.open(io.BytesIO(data)).convert("RGB")


def image_token_ids(processor: Any) -> set[int]:
    """Ids of the tokens a processor inserts for images (placeholders and their markup)."""
    tok = processor.tokenizer
    ids = {getattr(processor, "image_token_id", None)}
    for attr in IMAGE_TOKEN_ATTRS:
        text = getattr(processor, attr, None)
        if isinstance(text, str):
            ids.add(tok.convert_tokens_to_ids(text))
    ids.update(i for t, i in tok.get_vocab().items() if re.fullmatch(r"<row_\d+_col_\d+>", t))  # Idefics3 tile markers
    return {i for i in ids if isinstance(i, int) and i != tok.unk_token_id}


def processed_ids(processor: Any, messages: list[dict], images: list[Image.Image], generation_prompt: bool = False) -> list[int]:
    """Token ids of `messages` rendered by the processor's chat template, image tokens expanded."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    enc = processor(text=[text], images=[images] if images else None, add_special_tokens=False)
    ids = enc["input_ids"][0]
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


def encode_row(processor: Any, messages: list[dict], images: list[bytes], max_len: int, special: set[int] | None = None) -> dict:
    """{input_ids, labels, images, length} of one conversation; labels only on the assistant turns.

    `special`: the image token ids to mask (default `image_token_ids(processor)`; pass them when encoding many rows).
    """
    pil = [decode_image(b) for b in images]
    ids = processed_ids(processor, messages, pil)
    labels = [IGNORE_INDEX] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = messages[:k]
        prefix = processed_ids(processor, before, pil[: count_images(before)], generation_prompt=True)
        end = len(ids) if k == len(messages) - 1 else len(processed_ids(processor, messages[: k + 1], pil[: count_images(messages[: k + 1])]))
        if ids[: len(prefix)] != prefix or end < len(prefix):
            raise ValueError(f"the chat template renders the prompt differently on its own (with add_generation_prompt=True) "
                             f"than inside the full conversation (before assistant message {k + 1}), so it cannot be masked")
        labels[len(prefix) : end] = ids[len(prefix) : end]
    special = image_token_ids(processor) if special is None else special
    labels = [IGNORE_INDEX if t in special else y for t, y in zip(ids, labels)]
    if len(ids) > max_len:
        if any(t in special for t in ids[max_len:]):
            raise ValueError(f"the example is {len(ids)} tokens and its image tokens reach past data.max_len={max_len} "
                             "(an image cannot be cut); raise data.max_len")
        ids, labels = ids[:max_len], labels[:max_len]
    if all(y == IGNORE_INDEX for y in labels):
        raise ValueError(f"no reply tokens within data.max_len={max_len} (the example is {len(ids)} tokens); raise data.max_len")
    return {"input_ids": ids, "labels": labels, "images": images, "length": len(ids)}


def drop_images(row: dict) -> dict:
    """The no-image variant of a raw row (SURE-VQA's sanity baseline): image parts and images removed."""
    messages = [{**m, "content": [p for p in normalize_messages([m])[0]["content"] if p["type"] != "image"]}
                for m in row["messages"]]
    return {**row, "images": [], "messages": messages}


def normalize_answer(text: str) -> str:
    """Lower-cased, whitespace-collapsed, without a trailing full stop: the exact-match key."""
    return " ".join(text.lower().split()).rstrip(".")


@torch.no_grad()
def generate_replies(model: torch.nn.Module, processor: Any, rows: list[dict], max_new_tokens: int = 32) -> list[str]:
    """Greedy replies to each raw row's prompt (its messages before the final assistant turn, with its images)."""
    model.eval()
    replies = []
    for row in rows:
        messages = normalize_messages(row["messages"])[:-1]
        images = [decode_image(image_bytes(x)) for x in row["images"]]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = processor(text=[text], images=[images] if images else None, add_special_tokens=False, return_tensors="pt")
        out = model.generate(**enc.to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
        replies.append(processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return replies


def checkpoint_replies(final_dir: str, rows: list[dict], max_new_tokens: int = 32) -> list[str]:
    """Greedy replies of the checkpoint at `final_dir` (model and its processor) to each raw row's prompt."""
    from ftray.eval.loading import load_checkpoint
    from ftray.models import load_processor

    model, _ = load_checkpoint(final_dir)
    return generate_replies(model, load_processor(final_dir), rows, max_new_tokens)


def evaluate_vision_language(model: torch.nn.Module, processor: Any, rows: list[dict], max_new_tokens: int = 32) -> dict[str, Any]:
    """Exact match of greedy replies against each row's final assistant text (normalised), and a few examples."""
    replies = generate_replies(model, processor, rows, max_new_tokens)
    refs = [" ".join(p.get("text") or "" for p in normalize_messages(r["messages"])[-1]["content"]) for r in rows]
    hits = [normalize_answer(a) == normalize_answer(b) for a, b in zip(replies, refs)]
    return {"exact_match": sum(hits) / max(1, len(hits)), "n": len(hits),
            "examples": [{"reference": b, "reply": a} for a, b in list(zip(replies, refs))[:3]]}
