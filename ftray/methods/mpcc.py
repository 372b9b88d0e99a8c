"""MPCC — masked prediction with commonsense context (Yu et al., AAAI 2026, 2510.21807).

Idea: hide a meaningful region of the image behind a box and train the VLM to say what is hidden, from
the visible context; the answer is verifiable, so besides SFT (direct answer or chain of thought) the
paper trains with reinforcement fine-tuning with verifiable rewards, GRPO-style, with "prior sampling".

    methods: [{name: mpcc, mode: rl}]      # rows: bundled:shapes_vqa scenes ({images, objects, ...})

Data (`prepare_data`): each scene gives one row per chosen object: the image with a grey box over the
central `coverage` share of that object's bounding box (its edges, so its colour and outline, stay
partly visible — on random synthetic scenes nothing else would make the hidden content inferable), the
question "What is hidden under the grey box?" and the verifiable answer "<colour> <kind>". The occluded
image is stored in the row as PNG bytes.

Training modes:
- `sft_direct`: the reply is the answer; `sft_cot`: a scripted rationale (what is visible around the box,
  where the box is) then "Answer: <colour> <kind>". Both are plain CE.
- `rl`: GRPO inside ftray's loop (the `loss` hook; the run's CE is scaled by `sft_weight`, 0 by default).
  For each prompt of the micro-batch, `group_size` replies are sampled from the current policy; `prior_samples`
  of them are replaced by prior-guided samples — [inf] the spec's reading of "prior sampling": replies
  drawn from the prior the data carries (the reference answer in the reply format), so that a group of
  all-wrong samples still has a positive-advantage member and the gradient is never zero on a hard
  prompt. Reward = 1 for the right answer + `format_reward` for the reply format ("Answer: ..." in cot,
  one line in direct) [inf]; advantage = (r − mean_group) / (std_group + 1e-4); loss = −mean over the
  group of advantage × the reply's mean token log-prob. One policy update per sample batch, so the PPO
  ratio is 1 and needs no clipping; no KL term to a reference model (β = 0, as in DAPO / Dr. GRPO) [inf].
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from ftray.data.tokenize import IGNORE_INDEX
from ftray.methods.base import Context, Method, MethodConfig, stable_seed
from ftray.methods.registry import register

if TYPE_CHECKING:
    import ray.data

QUESTION = "What is hidden under the grey box?"


class MPCCConfig(MethodConfig):
    """MPCC's data and training mode (GRPO settings are inferred; the paper's were not recovered)."""

    mode: Literal["sft_direct", "sft_cot", "rl"] = Field("rl", description="sft_direct / sft_cot: CE on the answer (or a rationale "
                                                         "then the answer); rl: GRPO with prior sampling (the paper's RFT).")
    coverage: float = Field(0.6, gt=0, le=1, description="Side of the grey box as a share of the hidden object's box side (centred).")
    objects_per_scene: int = Field(1, ge=1, description="Rows per scene: how many of its objects are each hidden in turn.")
    group_size: int = Field(4, ge=2, description="rl: replies sampled per prompt (the GRPO group).")
    prior_samples: int = Field(1, ge=0, description="rl: replies per group replaced by prior-guided samples (the reference answer).")
    temperature: float = Field(1.0, gt=0, description="rl: sampling temperature of the rollouts.")
    max_new_tokens: int = Field(24, ge=1, description="rl: longest sampled reply.")
    format_reward: float = Field(0.1, ge=0, description="rl: reward for the reply format, beside 1 for the right answer.")
    sft_weight: float = Field(0.0, ge=0, description="rl: weight of the run's CE on the reference reply beside the GRPO term.")


def hidden_box(box: list[int], coverage: float) -> list[int]:
    """The centred sub-box covering `coverage` of each side of `box` (at least 2 px)."""
    x0, y0, x1, y1 = box
    w, h = max(2, round((x1 - x0) * coverage)), max(2, round((y1 - y0) * coverage))
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    return [cx - w // 2, cy - h // 2, cx - w // 2 + w, cy - h // 2 + h]


def answer_of(obj: dict) -> str:
    """The verifiable answer for a hidden object: "<colour> <kind>"."""
    return f"{obj['colour']} {obj['kind']}"


def final_answer(text: str) -> str:
    """The answer part of a reply (after its last "Answer:"), lower-cased, first line, no final full stop."""
    text = text.rsplit("Answer:", 1)[-1] if "Answer:" in text else text
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    return " ".join(line.lower().split()).rstrip(".")


def reward(reply: str, reference: str, cot: bool, format_reward: float) -> float:
    """1 for the right answer, plus `format_reward` for the format ("Answer:" in cot, a single line otherwise)."""
    right = final_answer(reply) == final_answer(reference)
    formatted = "Answer:" in reply if cot else len(reply.strip().splitlines()) == 1
    return float(right) + format_reward * formatted


def rationale(objects: list[dict], i: int) -> str:
    """The scripted chain of thought of sft_cot: what is visible besides the box, and where the box is."""
    from ftray.data.bundled.shapes_vqa import position

    others = [f"a {answer_of(o)} at the {position(o['cell'])}" for j, o in enumerate(objects) if j != i]
    seen = f"Besides the box I see {', '.join(others)}." if others else "There is nothing else in the image."
    o = objects[i]
    return f"{seen} The box is at the {position(o['cell'])}; around it the edges are {o['colour']} and outline a {o['kind']}."


def masked_rows(row: dict, cfg: MPCCConfig, rng: random.Random) -> list[dict]:
    """The MPCC rows of one scene row: one per hidden object, with the occluded image as PNG bytes."""
    from PIL import Image

    from ftray.data.images import shift_image
    from ftray.tasks.vision_language import image_bytes

    objects = row["objects"]
    img = Image.open(io.BytesIO(image_bytes(row["images"][0]))).convert("RGB")
    out = []
    for i in sorted(rng.sample(range(len(objects)), min(cfg.objects_per_scene, len(objects)))):
        box = hidden_box(objects[i]["box"], cfg.coverage)
        masked, _ = shift_image(img, "occlusion", box=box)
        buf = io.BytesIO()
        masked.save(buf, format="PNG")
        answer = answer_of(objects[i])
        reply = f"{rationale(objects, i)}\nAnswer: {answer}" if cfg.mode == "sft_cot" else answer
        out.append({"images": [buf.getvalue()], "answer": answer, "box": box, "hidden": i,
                    "messages": [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": QUESTION}]},
                                 {"role": "assistant", "content": [{"type": "text", "text": reply}]}]})
    return out


def sequence_logprob(model: Any, ids: torch.Tensor, start: int, extra: dict[str, torch.Tensor], pad_id: int) -> torch.Tensor:
    """Mean log-prob [G] of each sequence's tokens from position `start` on (its reply), padding excluded."""
    mask = (ids != pad_id).long()
    mask[:, :start] = 1  # the prompt is real even where it holds the pad id
    logits = model(input_ids=ids, attention_mask=mask, **extra).logits[:, start - 1 : -1].float()
    target = ids[:, start:]
    logp = torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    keep = mask[:, start:].float()
    return (logp * keep).sum(1) / keep.sum(1).clamp(min=1)


@register
class MPCC(Method):
    """Predict what a grey box hides in the image: SFT (direct / CoT) or GRPO with prior sampling."""

    name = "mpcc"
    paper = "Yu et al. 2026, MPCC: masked prediction with commonsense context for VLM fine-tuning (2510.21807, AAAI 2026)"
    Config = MPCCConfig
    tasks = ("vision_language",)
    bench = {"task": {"type": "vision_language", "vlm": {"vision_tower": "full", "projector": "full", "language_model": "full"}},
             "data": {"source": "bundled:shapes_vqa", "max_len": 128}, "train": {"lr": 1e-3, "max_steps": 400}}
    bench_metrics = ("ftray.methods.mpcc:bench_scores",)
    bench_baseline = [{"name": "mpcc", "mode": "sft_direct"}]  # the paper's comparison: RL against SFT on the same masked rows

    def prepare_data(self, ds: ray.data.Dataset, ctx: Context) -> ray.data.Dataset:
        """Scene rows → masked-prediction rows (one per hidden object), the occluded images as bytes."""
        import ray.data

        rows = ds.take_all()
        bad = [i for i, r in enumerate(rows, 1) if not r.get("objects") or len(r.get("images") or []) != 1]
        if bad:
            raise ValueError(f"mpcc: rows {bad[:5]} need one image and its `objects` (kind, colour, cell, box), as in bundled:shapes_vqa")
        rng = random.Random(stable_seed(ctx.spec.train.seed, "mpcc"))
        out = [m for r in rows for m in masked_rows(r, self.config, rng)]
        kinds: dict[str, int] = {}
        for r in out:
            kinds[r["answer"]] = kinds.get(r["answer"], 0) + 1
        ctx.report.update({"scenes_in": len(rows), "rows_out": len(out), "mode": self.config.mode, "answers": dict(sorted(kinds.items())),
                           "examples": [{"answer": r["answer"], "box": r["box"], "reply": r["messages"][1]["content"][0]["text"][:120]}
                                        for r in out[:2]]})
        return ray.data.from_items(out)

    def criterion(self, logits: torch.Tensor, targets: torch.Tensor, ctx: Context) -> torch.Tensor | None:
        """rl: the run's CE scaled by `sft_weight` (0 = pure GRPO); SFT modes keep plain CE."""
        if self.config.mode != "rl":
            return None
        return self.config.sft_weight * torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")

    def loss(self, model: torch.nn.Module, batch: dict, out: Any, ctx: Context) -> tuple[torch.Tensor | None, dict[str, float]]:
        """rl: the GRPO term over `group_size` replies per prompt of the micro-batch (prior-guided samples mixed in)."""
        if self.config.mode != "rl":
            return None, {}
        from ftray.train.loop import unwrap

        policy = unwrap(model)
        tokenizer = ctx.tokenizer
        pad = tokenizer.pad_token_id
        losses, rewards, solved = [], [], []
        for i in range(batch["input_ids"].size(0)):
            loss_i, r = self.group_loss(policy, batch, i, pad, tokenizer, ctx)
            losses.append(loss_i)
            rewards += r
            solved.append(max(r) >= 1)
        n = len(rewards)
        return torch.stack(losses).mean(), {"reward": sum(rewards) / n, "groups_solved": sum(solved) / len(solved)}

    def group_loss(self, policy: Any, batch: dict, i: int, pad: int, tokenizer: Any, ctx: Context) -> tuple[torch.Tensor, list[float]]:
        """The GRPO loss of row `i`'s group and its rewards."""
        c = self.config
        labels = batch["labels"][i]
        label_pos = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        start = int(label_pos[0])
        prompt = batch["input_ids"][i, :start].unsqueeze(0)
        reference_ids = batch["input_ids"][i, label_pos]
        reference = tokenizer.decode(reference_ids, skip_special_tokens=True)
        extra = {k: v[i : i + 1] for k, v in batch.items() if k not in ("input_ids", "labels", "attention_mask")}
        cot = "Answer:" in reference
        n_prior = min(c.prior_samples, c.group_size - 1)
        torch.manual_seed(stable_seed(ctx.spec.train.seed, ctx.step, ctx.rank, i))
        was_training = policy.training
        policy.eval()
        config = policy.config
        # a sampled image placeholder would ask for image features that the row does not have
        image_ids = sorted({i for k in ("image_token_id", "image_token_index") if isinstance(i := getattr(config, k, None), int)})
        with torch.no_grad():
            sampled = policy.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **extra, do_sample=True,
                                      temperature=c.temperature, top_p=None, top_k=None, max_new_tokens=c.max_new_tokens,
                                      num_return_sequences=c.group_size - n_prior, pad_token_id=pad,
                                      suppress_tokens=image_ids or None)[:, start:]
        policy.train(was_training)
        replies = [s for s in sampled] + [reference_ids] * n_prior
        width = max(len(r) for r in replies)
        seqs = torch.full((len(replies), start + width), pad, dtype=torch.long, device=prompt.device)
        seqs[:, :start] = prompt
        for j, r in enumerate(replies):
            seqs[j, start : start + len(r)] = r
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in replies]
        r = torch.tensor([reward(t, reference, cot, c.format_reward) for t in texts], device=prompt.device)
        advantage = (r - r.mean()) / (r.std() + 1e-4)
        many = {k: v.expand(len(replies), *v.shape[1:]) for k, v in extra.items()}
        logp = sequence_logprob(policy, seqs, start, many, pad)
        return -(advantage * logp).mean(), r.tolist()


def bench_scores(final_dir: str, eval_n: int, out_dir: Path) -> dict[str, Any]:
    """Bench measurement: accuracy of greedy replies (their answer part) on masked-prediction rows from
    bundled:shapes_vqa test (one hidden object per scene, coverage 0.6)."""
    from ftray.data import load_rows
    from ftray.tasks.vision_language import checkpoint_replies

    rng, cfg = random.Random(0), MPCCConfig(mode="sft_direct")
    rows = [m for r in load_rows("bundled:shapes_vqa", "test", eval_n).to_list() for m in masked_rows(r, cfg, rng)]
    replies = checkpoint_replies(final_dir, rows, max_new_tokens=48)
    hits = [final_answer(a) == r["answer"] for a, r in zip(replies, rows)]
    return {"masked_acc": round(sum(hits) / max(1, len(hits)), 4), "masked_n": len(hits)}
