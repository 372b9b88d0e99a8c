"""Model inference over a Ray Dataset for the data methods: score, generate, embed.

    ds = map_model(ds, ResponseScorer, ctx)                      # + nll, ppl, entropy, n_tokens columns
    ds = map_model(ds, Answerer, ctx, num_samples=5, temperature=0.7)   # + answers (list of str)
    ds = map_model(ds, TextEmbedder, ctx)                        # + embedding (list of float)

Each class is a Ray Data callable class: `map_batches` starts an actor pool, every actor loads the
run's model once and then gets batches of rows (as Arrow tables; the output keeps every input column
and adds its own). The pool follows `data.actors` / `data.actor_threads`, or the cluster: one GPU per
actor when `scaling.use_gpu`, else one-thread CPU actors covering the free CPUs.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import pyarrow as pa
import torch

from ftray.config import RunSpec
from ftray.data.formats import format_of_columns, format_prompt, to_messages
from ftray.data.packing import collate
from ftray.data.templates import use_chat_template
from ftray.data.tokenize import IGNORE_INDEX, render_prompt
from ftray.models import default_autocast_dtype, load_model, load_tokenizer


# glibc's allocator for one-thread inference actors: one arena, no mmap for big tensors, no trimming. A
# forward's large temporaries (autocast's weight copies, the [B, T, vocab] logits: hundreds of MB each)
# are above glibc's default mmap threshold, so each is a fresh mmap whose pages the kernel faults in and
# zeroes, every batch: scoring SmolLM2 spent a fifth of its CPU time in the kernel (user 29 s, sys 7.4 s
# for 96 rows). One arena (Ray Data calls the UDF on a worker thread, whose own arena cannot hold them)
# and thresholds above any batch's tensors cut sys time to 2 s and the time per row by ~20% (313 → 240
# ms), with the actor's memory flat at 2.6–3.2 GB over 1,000 rows. With two torch threads in a process
# the same settings fragment the heap (14.9 GB after 320 rows, and slower than the default), so they are
# for one-thread actors only. Set through the environment: glibc reads it before the first allocation.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str((1 << 31) - 1)}


def malloc_env(threads: int) -> dict[str, str]:
    """Environment variables for an inference process with `threads` torch threads (MALLOC_ENV for one)."""
    return dict(MALLOC_ENV) if threads == 1 else {}


def pool_size(spec: RunSpec) -> tuple[int, int, int]:
    """(actors, CPUs per actor, GPUs per actor) for model inference over the data."""
    import ray

    d = spec.data
    if spec.scaling.use_gpu:
        gpus = int(ray.cluster_resources().get("GPU", 1))
        return d.actors or max(1, gpus), d.actor_threads or 1, 1
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))  # not available_resources(): Ray Data's own metadata tasks hold CPUs for a moment
    # One thread per CPU actor: on 2 cores, 2 actors × 1 thread scored 10.98 rows/s steady against 9.48 for
    # 1 actor × 2 threads (SmolLM2, 256 rows × 128 tokens); torch's intra-op threads scale worse than processes.
    threads = d.actor_threads or 1
    return d.actors or max(1, cpus // threads), threads, 0


def map_model(ds: Any, cls: type, ctx: Any, batch_size: int | None = None, **kwargs: Any) -> Any:
    """`ds.map_batches(cls)` on an actor pool of up to `pool_size` actors; `kwargs` go to cls's constructor.

    All the actors are asked for at once; the pass runs on those that get resources (at least one), so a
    busy cluster slows it down instead of stalling it."""
    import ray.data

    actors, threads, gpus = pool_size(ctx.spec)
    return ds.map_batches(
        cls, fn_constructor_kwargs={"spec": ctx.spec.model_dump(mode="json"), "threads": threads, **kwargs},
        batch_size=batch_size or ctx.spec.data.infer_batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors, initial_size=actors), num_cpus=threads, num_gpus=gpus or None,
        runtime_env={"env_vars": malloc_env(threads)},
    )


class ModelActor:
    """Loads the run's model and tokenizer once (per actor), in eval mode, on the actor's device."""

    def __init__(self, spec: dict, threads: int = 1, model: str | None = None) -> None:
        self.spec = RunSpec.model_validate(spec)
        m = self.spec.model
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(model or m.name, gguf_file=None if model else m.gguf_file).to(self.device).eval()
        self.tokenizer = use_chat_template(load_tokenizer(model or m.name, None if model else m.gguf_file), self.spec.data.chat_template)
        self.amp = default_autocast_dtype(self.device.type)

    def autocast(self) -> torch.autocast:
        """bf16 autocast where the device supports it (the loop's policy), else a no-op."""
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)


@torch.no_grad()
def token_scores(model: Any, batch: dict[str, torch.Tensor], amp: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token NLL and predictive entropy [B, T-1] of each label token, and the label mask [B, T-1]."""
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:].to(device)
    mask = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    entropy = -(logp.exp() * logp).sum(-1) * mask
    return nll.cpu(), entropy.cpu(), mask.cpu()


def score_rows(model: Any, rows: list[dict], pad_id: int, amp: torch.dtype | None, per_token: bool = False) -> dict[str, list]:
    """Mean NLL, perplexity and mean entropy over each tokenized row's label tokens (one batch)."""
    nll, ent, mask = token_scores(model, collate(rows, pad_id), amp)
    n = mask.sum(1).clamp(min=1)
    out = {"nll": (nll.sum(1) / n).tolist(), "entropy": (ent.sum(1) / n).tolist(), "n_tokens": mask.sum(1).tolist()}
    out["ppl"] = [math.exp(min(x, 50.0)) for x in out["nll"]]
    if per_token:  # per label token, in order (the label mask's True positions)
        out["token_nll"] = [x[m].tolist() for x, m in zip(nll, mask)]
        out["token_entropy"] = [x[m].tolist() for x, m in zip(ent, mask)]
    return out


def _add_columns(batch: pa.Table, columns: dict[str, list]) -> pa.Table:
    for name, values in columns.items():
        if name in batch.column_names:
            batch = batch.drop_columns([name])
        batch = batch.append_column(name, pa.array(values))
    return batch


class ResponseScorer(ModelActor):
    """Adds nll / ppl / entropy / n_tokens (and with per_token, token_nll / token_entropy) per row.

    The rows are tokenized exactly as training will tokenize them (the task's tokenizer, chat template
    and label mask, no packing), so "the response's loss" here is the loss training starts from.
    `scope="all"` scores every token after the first instead (e.g. raw text for a perplexity filter).
    """

    def __init__(self, spec: dict, threads: int = 1, per_token: bool = False, scope: str = "response", model: str | None = None) -> None:
        super().__init__(spec, threads, model)
        self.per_token, self.scope = per_token, scope
        self.spec.data.packing = False

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Score one batch of rows."""
        import datasets

        from ftray.tasks import get_task

        rows = get_task(self.spec).tokenize(datasets.Dataset(batch), self.tokenizer, "prepare_data")
        if self.scope == "all":
            rows = [{**r, "labels": r["input_ids"]} for r in rows]
        return _add_columns(batch, score_rows(self.model, rows, self.tokenizer.pad_token_id, self.amp, self.per_token))


class Answerer(ModelActor):
    """Adds `answers`: `num_samples` replies per row to its prompt (greedy when temperature is 0).

    Sampling is seeded per row from (train.seed, the row's prompt), so a cache rebuild and a different
    batch split give the same answers.
    """

    def __init__(self, spec: dict, threads: int = 1, num_samples: int = 1, temperature: float = 0.0, max_new_tokens: int = 32,
                 prompt_of: Callable[[dict], list[dict]] | None = None, model: str | None = None) -> None:
        super().__init__(spec, threads, model)
        self.num_samples, self.temperature, self.max_new_tokens, self.prompt_of = num_samples, temperature, max_new_tokens, prompt_of

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        """Generate for one batch of rows."""
        rows = batch.to_pylist()
        fmt = format_of_columns(batch.column_names)
        prompts = [self.prompt_of(r) if self.prompt_of else format_prompt(r, fmt) for r in rows]
        answers = [self._sample(p) for p in prompts]
        return _add_columns(batch, {"answers": answers})

    def _sample(self, prompt: list[dict]) -> list[str]:
        from ftray.methods import stable_seed

        text = render_prompt(prompt, self.tokenizer)
        enc = self.tokenizer([text], return_tensors="pt", add_special_tokens=False).to(self.device)
        sample = self.temperature > 0
        if sample:
            torch.manual_seed(stable_seed(self.spec.train.seed, text))
        # Decoding on CPU runs fp32: autocast re-casts every weight at every step, which at batch ≤ 8 costs more
        # than it saves (SmolLM2 decode: 229 ms/token with bf16 autocast vs 85 ms fp32, docs/levi.md).
        with self.autocast() if self.device.type != "cpu" else contextlib.nullcontext():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=sample,
                                      temperature=self.temperature if sample else None, top_p=None, top_k=None,
                                      num_return_sequences=self.num_samples, pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


class TextEmbedder(ModelActor):
    """Adds `embedding`: the mean of the last hidden states over a row's tokens (the rendered conversation
    by default, or `text_of(row)`), L2-normalised."""

    def __init__(self, spec: dict, threads: int = 1, text_of: Callable[[dict], str] | None = None, max_len: int = 256,
                 model: str | None = None) -> None:
        super().__init__(spec, threads, model)
        self.text_of, self.max_len = text_of, max_len

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        """Embed one batch of rows."""
        rows = batch.to_pylist()
        fmt = format_of_columns(batch.column_names)
        texts = [self.text_of(r) if self.text_of else "\n".join(m["content"] for m in to_messages(r, fmt)[0]) for r in rows]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_len,
                             add_special_tokens=False).to(self.device)
        with self.autocast():
            hidden = self.model(**enc, output_hidden_states=True).hidden_states[-1].float()
        m = enc["attention_mask"].unsqueeze(-1).float()
        emb = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)
        return _add_columns(batch, {"embedding": emb.cpu().tolist()})
