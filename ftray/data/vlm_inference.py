"""Vision-language model inference over a Ray Dataset, for the VLM data methods (KnowAda, Uni-MuMER, POINTS).

    ds = map_model(ds, VLMAnswerer, ctx, num_samples=10, temperature=0.4, prompt_of=fn)   # + answers
    ds = map_model(ds, VLMScorer, ctx)                                                     # + nll, ppl, n_tokens

The same actor-pool contract as `ftray.data.inference` (each actor loads the AutoModelForImageTextToText
and its AutoProcessor once, then gets Arrow batches of `{images, messages}` rows); only the loading and
the image handling differ, which is why these are separate classes rather than flags on the text ones.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import pyarrow as pa
import torch

from ftray.config import RunSpec
from ftray.data.inference import _add_columns
from ftray.models import load_model, load_processor
from ftray.tasks.vision_language import IGNORE_INDEX, decode_image, image_bytes, normalize_messages

# (messages of the prompt, images of the prompt) for one raw row
PromptOf = Callable[[dict], tuple[list[dict], list[Any]]]


def prompt_of_row(row: dict) -> tuple[list[dict], list[Any]]:
    """A row's prompt: its messages before the final assistant turn, with its images."""
    return normalize_messages(row["messages"])[:-1], list(row["images"])


class VLMActor:
    """Loads the run's vision-language model and processor once per actor, in eval mode."""

    def __init__(self, spec: dict, threads: int = 1, model: str | None = None) -> None:
        self.spec = RunSpec.model_validate(spec)
        torch.set_num_threads(threads)
        name = model or self.spec.model.name
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(name, task="vision_language").to(self.device).eval()
        self.processor = load_processor(name)


class VLMAnswerer(VLMActor):
    """Adds `answers`: `num_samples` replies per row to `prompt_of(row)` (greedy when temperature is 0).

    Sampling is seeded per row from (train.seed, the prompt text, the image bytes' length), so a cache
    rebuild and another batch split give the same answers.
    """

    def __init__(self, spec: dict, threads: int = 1, num_samples: int = 1, temperature: float = 0.0, max_new_tokens: int = 32,
                 prompt_of: PromptOf | None = None, model: str | None = None) -> None:
        super().__init__(spec, threads, model)
        self.num_samples, self.temperature, self.max_new_tokens = num_samples, temperature, max_new_tokens
        self.prompt_of = prompt_of or prompt_of_row

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        """Generate for one batch of rows."""
        return _add_columns(batch, {"answers": [self.sample(*self.prompt_of(r)) for r in batch.to_pylist()]})

    def sample(self, messages: list[dict], images: list[Any]) -> list[str]:
        """`num_samples` replies to one prompt."""
        from ftray.methods import stable_seed

        data = [image_bytes(x) for x in images]
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = self.processor(text=[text], images=[[decode_image(b) for b in data]] if data else None,
                             add_special_tokens=False, return_tensors="pt").to(self.device)
        sample = self.temperature > 0
        if sample:
            torch.manual_seed(stable_seed(self.spec.train.seed, text, [len(b) for b in data]))
        out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=sample,
                                  temperature=self.temperature if sample else None, top_p=None, top_k=None,
                                  num_return_sequences=self.num_samples, pad_token_id=self.processor.tokenizer.pad_token_id)
        return self.processor.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


class VLMScorer(VLMActor):
    """Adds nll / ppl / n_tokens: the mean NLL of each row's reply tokens given its images and prompt,
    tokenized and masked exactly as training will (the vision_language task)."""

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        """Score one batch of rows."""
        import datasets

        from ftray.tasks.vision_language import VisionLanguage

        task = VisionLanguage(self.spec)
        task._processor = self.processor
        rows = task.tokenize(datasets.Dataset(batch), self.processor.tokenizer, "prepare_data")
        nll, count = [], []
        for r in rows:  # one row at a time: rows differ in image count and length, and a pad would need masking anyway
            b = {k: v.to(self.device) for k, v in task.collate([r], self.processor.tokenizer.pad_token_id).items()}
            labels = b.pop("labels")
            logits = self.model(**b).logits[:, :-1].float()
            target = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="sum")
            n = int((target != IGNORE_INDEX).sum())
            nll.append(float(loss) / max(1, n))
            count.append(n)
        return _add_columns(batch, {"nll": nll, "ppl": [math.exp(min(x, 50.0)) for x in nll], "n_tokens": count})
