"""Teacher scores for the bundled retrieval train set: SmolLM2 as a cross-encoder, run through Ray Data.

    python -m ftray.data.bundled.teacher [--concurrency 2] [--batch-size 32] [--model smollm2-135m]

For every train row the candidates [positive, *negatives] are scored by the log-odds
log p("Yes") - log p("No") of the model's next token after a chat prompt asking whether the passage
answers the question. Scoring needs the model and minutes of CPU, so it runs once: the scores are
cached in the committed retrieval_teacher.jsonl (rows {qid, teacher_scores: [8 floats, 4 decimals],
fingerprint}), and `python -m ftray.data.bundled.generate` merges them into retrieval_train.jsonl
without a model. This command writes both files. A generator change makes the cache stale (the
fingerprint hashes each row's query and candidates); generate.py then refuses to merge it.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
import torch

from ftray.data.bundled import DIR, path
from ftray.data.bundled import retrieval as _retrieval
from ftray.models import DEFAULT_MODEL, default_autocast_dtype, load_model, load_tokenizer

TEACHER_FILE = DIR / "retrieval_teacher.jsonl"
SYSTEM = "You judge whether a passage answers a question. Reply Yes or No."
# the question comes first so that one row's 8 prompts share a prefix, computed once (the KV cache is reused)
PREFIX = "Question: {query}\nPassage:"
SUFFIX = " {passage}\nDoes the passage answer the question? Answer Yes or No."

def _first_token(tokenizer, word: str) -> int:
    return tokenizer.encode(word, add_special_tokens=False)[0]


class CrossEncoderScorer:
    """Ray Data callable class: loads the model once per actor and adds `score` to (query, passage) batches."""

    def __init__(self, model: str = DEFAULT_MODEL, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.tokenizer = load_tokenizer(model)
        self.tokenizer.padding_side = "left"  # the next-token logits are then all at position -1
        self.model = load_model(model).eval()
        self.amp = default_autocast_dtype("cpu")  # bf16 is ~4x faster on AVX512-BF16 CPUs; scores move by ~0.05
        self.yes, self.no = _first_token(self.tokenizer, "Yes"), _first_token(self.tokenizer, "No")
        if self.yes == self.no:
            raise ValueError(f"{model}: 'Yes' and 'No' start with the same token; the log-odds would always be 0")
        self.decoder = self.model.get_decoder()
        self.yes_no = self.model.get_output_embeddings().weight[[self.yes, self.no]].detach().float()

    def prompt(self, query: str, passage: str) -> str:
        """The whole chat prompt whose next token is read as the relevance judgement."""
        user = PREFIX.format(query=query) + SUFFIX.format(passage=passage)
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _split(self, query: str, passage: str) -> tuple[str, str]:
        text, cut = self.prompt(query, passage), PREFIX.format(query=query)
        head = text.rindex(cut) + len(cut)  # words start with their space, so no token spans the cut
        return text[:head], text[head:]

    @torch.inference_mode()
    def score_query(self, query: str, passages: list[str]) -> np.ndarray:
        """log p(Yes) - log p(No) for each passage, the shared prompt prefix run once."""
        parts = [self._split(query, p) for p in passages]
        prefix = self.tokenizer(parts[0][0], return_tensors="pt", add_special_tokens=False)["input_ids"]
        suffix = self.tokenizer([s for _, s in parts], return_tensors="pt", padding=True, add_special_tokens=False)
        n, p_len = len(passages), prefix.shape[1]
        mask = suffix["attention_mask"]
        with torch.autocast("cpu", dtype=self.amp or torch.float32, enabled=self.amp is not None):
            cache = self.decoder(input_ids=prefix, use_cache=True).past_key_values
            cache.batch_repeat_interleave(n)
            # left padding sits between prefix and suffix, masked; positions count real tokens only, so a
            # prompt scores the same whatever it is padded to
            hidden = self.decoder(input_ids=suffix["input_ids"], attention_mask=torch.cat([torch.ones(n, p_len, dtype=mask.dtype), mask], 1),
                                  position_ids=p_len + (mask.cumsum(-1) - 1).clamp(min=0), past_key_values=cache,
                                  use_cache=True).last_hidden_state[:, -1]
        # log p(Yes) - log p(No) = logit(Yes) - logit(No): the softmax normaliser cancels, so only two rows of
        # the head are needed, and in fp32 (bf16 logits near 16 move in steps of 0.125, which makes ties)
        return (hidden.float() @ self.yes_no.T).diff(dim=1).neg().squeeze(1).numpy().astype(np.float64)

    def __call__(self, batch: dict) -> dict:
        """Add `score` to a batch with `query` and `passage` columns (rows of one query scored together)."""
        scores = np.zeros(len(batch["query"]))
        groups: dict[str, list[int]] = defaultdict(list)
        for i, q in enumerate(batch["query"]):
            groups[q].append(i)
        for q, idx in groups.items():
            scores[idx] = self.score_query(q, [batch["passage"][i] for i in idx])
        return {**batch, "score": scores}


def score_pairs(pairs: list[tuple[str, str]], model: str = DEFAULT_MODEL, concurrency: int = 2,
                batch_size: int = 32) -> list[float]:
    """Scores of (query, passage) pairs, in order, from `concurrency` one-thread scorer actors."""
    import ray.data

    ds = ray.data.from_items([{"i": i, "query": q, "passage": p} for i, (q, p) in enumerate(pairs)])
    out = ds.map_batches(CrossEncoderScorer, fn_constructor_kwargs={"model": model}, batch_size=batch_size,
                         concurrency=concurrency, num_cpus=1).take_all()
    out.sort(key=lambda r: r["i"])
    return [float(r["score"]) for r in out]


def teacher_rows(rows: list[dict], **kwargs) -> list[dict]:
    """{qid, teacher_scores, fingerprint} for each row; scores follow `retrieval.candidates(row)`."""
    pairs = [(r["query"], c) for r in rows for c in _retrieval.candidates(r)]
    scores = iter(score_pairs(pairs, **kwargs))
    return [{"qid": r["qid"], "teacher_scores": [round(next(scores), 4) for _ in _retrieval.candidates(r)],
             "fingerprint": _retrieval.fingerprint(r)} for r in rows]


def quality(scored: list[dict]) -> dict[str, float]:
    """How often the positive (candidate 0) scores strictly highest, and the MRR of the positive's rank."""
    ranks = [1 + sum(s > r["teacher_scores"][0] for s in r["teacher_scores"][1:]) for r in scored]
    top1 = sum(all(s < r["teacher_scores"][0] for s in r["teacher_scores"][1:]) for r in scored)
    return {"top1": top1 / len(scored), "mrr": sum(1 / k for k in ranks) / len(ranks), "n": len(scored)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the cross-encoder (a causal LM)")
    parser.add_argument("--concurrency", type=int, default=2, help="scorer actors, one CPU each")
    parser.add_argument("--batch-size", type=int, default=32, help="(query, passage) pairs per forward")
    parser.add_argument("--limit", type=int, default=None, help="score only the first n train rows (a dry run; writes nothing)")
    args = parser.parse_args(argv)

    import ray

    from ftray.data.bundled.generate import retrieval, retrieval_rows, write_jsonl

    if not ray.is_initialized():
        ray.init(num_cpus=args.concurrency, include_dashboard=False, object_store_memory=500 * 2**20)
    train = retrieval_rows()[0][: args.limit]
    scored = teacher_rows(train, model=args.model, concurrency=args.concurrency, batch_size=args.batch_size)
    print(json.dumps(quality(scored)))
    if args.limit is None:
        write_jsonl(scored, TEACHER_FILE)
        write_jsonl(retrieval()[0], path("retrieval", "train"))
        print(f"wrote {TEACHER_FILE} and {path('retrieval', 'train')}")


if __name__ == "__main__":
    main()
