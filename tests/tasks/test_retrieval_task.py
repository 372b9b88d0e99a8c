"""Retrieval as a task type: in-batch-negative InfoNCE on a pooled bi-encoder through Ray Train, and ranking metrics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ftray.config import build_spec
from ftray.eval import evaluate_on_ray
from ftray.tasks import get_task
from ftray.tasks.retrieval import rank_metrics
from tests.train.helpers import train_tiny


def test_rank_metrics_by_hand():
    m = rank_metrics(torch.tensor([1, 2, 11, 100]))
    assert m["mrr@10"] == pytest.approx((1 + 0.5) / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / torch.log2(torch.tensor(3.0)).item()) / 4)
    assert (m["recall@1"], m["recall@10"], m["recall@100"]) == (0.25, 0.5, 1.0)


def test_every_query_sees_its_own_and_the_other_queries_candidates(tiny_model_dir, tiny_tokenizer):
    import datasets

    spec = build_spec({"model": {"name": str(tiny_model_dir)}, "task": {"type": "retrieval", "negatives": 2}})
    task = get_task(spec)
    ds = datasets.Dataset.from_list([{"query": f"q {i}", "positive": f"p {i}", "negatives": [f"n {i} a", f"n {i} b", f"n {i} c"]} for i in range(3)])
    batch = task.collate(task.tokenize(ds, tiny_tokenizer, "t"), tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 3 + 3 * 3 and batch["labels"].tolist() == [0, 3, 6]
    out, loss_sum, count = task.forward_and_loss(task.load_model(), batch, None)
    assert out.logits.shape == (3, 9) and count == 3
    # InfoNCE by hand from the embeddings: cosine / temperature, the positive's column is the target
    scores = F.normalize(out.query_emb, dim=-1) @ F.normalize(out.doc_emb, dim=-1).T / 0.05
    torch.testing.assert_close(loss_sum, F.cross_entropy(scores, torch.tensor([0, 3, 6]), reduction="sum"))


def test_trains_on_ray_and_eval_ranks_the_bundled_corpus(ray_local, tiny_model_dir, tmp_path):
    result = train_tiny(
        tiny_model_dir, tmp_path, "ret",
        task={"type": "retrieval", "negatives": 3},
        data={"source": "bundled:retrieval", "max_len": 48, "max_samples": 64, "eval_max_samples": 16},
        methods=["full"], train={"max_steps": 3, "lr": 1e-3},
    )
    m = evaluate_on_ray(str(result.final_dir), max_samples=20)
    assert m["task"] == "retrieval" and m["n"] == 20 and m["corpus"] >= 2000
    assert 0 <= m["recall@1"] <= m["recall@10"] <= m["recall@100"] <= 1 and 0 <= m["ndcg@10"] <= 1
