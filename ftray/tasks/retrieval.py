"""Dense retrieval: a bi-encoder (the backbone, pooled, L2-normalised) trained with InfoNCE.

Rows are `{query, positive, negatives: [str, ...]}` and optionally `teacher_scores` (one float per
candidate [positive, *negatives], for distillation). A micro-batch of B queries holds their B·(1+k)
candidates (the positive first, then k hard negatives), so every query also sees every other query's
candidates as in-batch negatives: scores = cos(q, d) / temperature over all B·(1+k) passages, and the
target of query b is its own positive at column b·(1+k). Queries and passages go through ONE forward
(padded together), so DDP/FSDP see one forward per backward.

Evaluation embeds the whole corpus with Ray Data (`embed_on_ray`: one model per actor) and ranks it
for every test query: MRR@10, nDCG@10 and Recall@{1,10,100} (one relevant passage per query, so
each is a function of the positive's rank).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import datasets
import torch
import torch.nn.functional as F

from ftray.config import RunSpec
from ftray.data.errors import DataError, row_error
from ftray.models import load_model
from ftray.tasks.classification import pad
from ftray.train.loss import Criterion


class Retrieval:
    """In-batch-negative contrastive training of a pooled bi-encoder."""

    name = "retrieval"

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec

    def load_model(self) -> torch.nn.Module:
        """The backbone without a head (AutoModel)."""
        m = self.spec.model
        return load_model(m.name, dtype=m.dtype, gguf_file=m.gguf_file, task="retrieval")

    def tokenize(self, ds: datasets.Dataset, tokenizer: Any, source: str) -> list[dict]:
        """Rows → {q_ids, d_ids: [positive, *k negatives], teacher_scores?}; bad rows are named by number."""
        for col in ("query", "positive", "negatives"):
            if col not in ds.column_names:
                raise DataError(f"{source}: task.type=retrieval needs columns query, positive, negatives; found {ds.column_names}")
        k, max_len = self.spec.task.negatives, self.spec.data.max_len
        has_teacher = "teacher_scores" in ds.column_names
        out = []
        for i, row in enumerate(ds, 1):
            texts = [row["query"], row["positive"], *(row["negatives"] or [])[:k]]
            if not all(isinstance(t, str) and t.strip() for t in texts):
                raise row_error(source, i, "query, positive and every negative must be non-empty strings")
            if len(texts) < 2 + k:
                raise row_error(source, i, f"has {len(texts) - 2} negatives; task.negatives={k} needs at least {k}")
            ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_len)["input_ids"]
            r = {"q_ids": ids[0], "d_ids": ids[1:], "length": sum(map(len, ids))}
            if has_teacher:
                scores = row["teacher_scores"]
                if not isinstance(scores, list) or len(scores) < 1 + k:
                    raise row_error(source, i, f"'teacher_scores' needs one score per candidate [positive, *negatives] ({1 + k})")
                r["teacher_scores"] = [float(s) for s in scores[: 1 + k]]
            out.append(r)
        return out

    def collate(self, rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """Queries then candidates in one padded [B + B·(1+k), T] batch; labels [B] = each positive's column."""
        texts = [{"ids": r["q_ids"]} for r in rows] + [{"ids": d} for r in rows for d in r["d_ids"]]
        batch = pad(texts, pad_id, key="ids")
        per = len(rows[0]["d_ids"])
        batch["labels"] = torch.arange(len(rows)) * per
        if all("teacher_scores" in r for r in rows):
            batch["teacher_scores"] = torch.tensor([r["teacher_scores"] for r in rows])
        return batch

    def forward_and_loss(self, model: torch.nn.Module, batch: dict, amp: torch.dtype | None,
                         criterion: Criterion | None = None) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """(out with logits = scores [B, B·(1+k)], query/doc embeddings; summed InfoNCE; B)."""
        t = self.spec.task
        emb = embed(model, batch, amp, t.pooling)
        b = len(batch["labels"])
        q, d = emb[:b], emb[b:]
        scores = q @ d.T / t.temperature
        loss_sum = criterion(scores, batch["labels"]) if criterion else None
        if loss_sum is None:
            loss_sum = F.cross_entropy(scores, batch["labels"], reduction="sum")
        return SimpleNamespace(logits=scores, features=q, query_emb=q, doc_emb=d), loss_sum, torch.tensor(b)


def embed(model: torch.nn.Module, batch: dict, amp: torch.dtype | None, pooling: str) -> torch.Tensor:
    """L2-normalised float32 embeddings [N, H] of a padded batch (mean over real tokens, or the last one)."""
    mask = batch["attention_mask"]
    with torch.autocast(mask.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        hidden = model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False).last_hidden_state.float()
    if pooling == "last":
        pooled = hidden[torch.arange(len(mask), device=mask.device), mask.sum(1) - 1]
    else:
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    return F.normalize(pooled, dim=-1)


class Embedder:
    """Ray Data callable class: loads the encoder once per actor and embeds `text` batches."""

    def __init__(self, model_dir: str, pooling: str, threads: int = 1, max_len: int = 256) -> None:
        from ftray.eval.loading import load_checkpoint_tokenizer

        torch.set_num_threads(threads)
        self.model = load_model(model_dir, task="retrieval").eval()
        self.tokenizer, self.pooling, self.max_len = load_checkpoint_tokenizer(model_dir), pooling, max_len

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        """Add an `embedding` column to a batch with a `text` column."""
        ids = self.tokenizer(list(batch["text"]), add_special_tokens=False, truncation=True, max_length=self.max_len)["input_ids"]
        padded = pad([{"ids": x} for x in ids], self.tokenizer.pad_token_id, key="ids")
        return {**batch, "embedding": embed(self.model, padded, None, self.pooling).numpy()}


def embed_on_ray(model_dir: str, texts: list[str], pooling: str, actors: int = 2, batch_size: int = 64) -> torch.Tensor:
    """Embeddings [N, H] of `texts` (in order) through Ray Data, `actors` one-thread encoder actors."""
    import ray.data

    ds = ray.data.from_items([{"i": i, "text": t} for i, t in enumerate(texts)])
    out = ds.map_batches(Embedder, fn_constructor_kwargs={"model_dir": model_dir, "pooling": pooling},
                         batch_size=batch_size, concurrency=actors, num_cpus=1).take_all()
    out.sort(key=lambda r: r["i"])
    return torch.stack([torch.as_tensor(r["embedding"]) for r in out])


def rank_metrics(ranks: torch.Tensor) -> dict[str, float]:
    """MRR@10, nDCG@10, Recall@{1,10,100} from each query's 1-based rank of its one relevant passage.

    Written out: with one relevant passage, nDCG@10 = 1/log2(rank+1) within the top 10 (ideal DCG = 1).
    """
    r = ranks.double()
    top10 = r <= 10
    return {
        "mrr@10": float(torch.where(top10, 1 / r, 0.0).mean()),
        "ndcg@10": float(torch.where(top10, 1 / torch.log2(r + 1), 0.0).mean()),
        **{f"recall@{k}": float((r <= k).double().mean()) for k in (1, 10, 100)},
        "n": len(ranks),
    }


def corpus_rows(source: str | None) -> list[dict]:
    """The eval corpus: rows of {pid, text}; default the bundled retrieval corpus."""
    from ftray.data.readers import read_file

    path = Path(source) if source else Path(__file__).parents[1] / "data" / "bundled" / "retrieval_corpus.jsonl"
    if not path.exists():
        raise DataError(f"task.eval_corpus: {path} does not exist")
    return read_file(path, str(path)).to_list()


def evaluate_retrieval(model_dir: str, queries: list[dict], corpus: list[dict], pooling: str, actors: int = 2) -> dict[str, Any]:
    """Rank the whole corpus for each query row ({query, positive_id} or {query, positive}) and score it."""
    pids = [c["pid"] for c in corpus]
    by_text = {c["text"]: c["pid"] for c in corpus}
    index = {p: i for i, p in enumerate(pids)}
    gold = []
    for i, q in enumerate(queries, 1):
        pid = q.get("positive_id") or by_text.get(q.get("positive"))
        if pid not in index:
            raise DataError(f"retrieval eval: row {i}: its positive passage is not in the corpus")
        gold.append(index[pid])
    emb = embed_on_ray(model_dir, [c["text"] for c in corpus] + [q["query"] for q in queries], pooling, actors)
    docs, qs = emb[: len(corpus)], emb[len(corpus):]
    scores = qs @ docs.T
    gold_t = torch.tensor(gold)
    ranks = (scores > scores[torch.arange(len(gold)), gold_t].unsqueeze(1)).sum(1) + 1
    return {**rank_metrics(ranks), "corpus": len(corpus)}
