"""Greedy soup: one pass in held-out order, strict improvement only, never below its best ingredient."""

import pytest
import torch
import yaml

from ftray.merge.run import load_weights
from ftray.tune.heldout import load_held_out
from ftray.tune.soups import greedy_soup
from tests.merge.helpers import full_checkpoint, lora_checkpoint, state_of


class Scripted:
    """A held-out set whose scores are given in advance, in call order."""

    name, metric = "scripted", "loss"

    def __init__(self, scores):
        self.scores = list(scores)

    def score(self, model):
        return self.scores.pop(0)


@pytest.fixture(scope="module")
def ckpts(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("greedy")
    return [
        str(full_checkpoint(tiny_model_dir, d / "small", seed=1, noise=0.005)),
        str(lora_checkpoint(tiny_model_dir, d / "lora", seed=2)),
        str(full_checkpoint(tiny_model_dir, d / "large", seed=3, noise=0.05)),
    ]


def test_greedy_soup_never_scores_below_its_best_ingredient(ckpts, tiny_tokenizer, tmp_path):
    held_out = load_held_out("bundled:arithmetic", "test", 16, tiny_tokenizer, "loss", max_len=192)
    result = greedy_soup(ckpts, held_out, tmp_path / "soup")
    assert result.order == sorted(ckpts, key=lambda c: -result.scores[c])
    assert result.ingredients[0] == result.order[0]
    rescored = held_out.score(load_weights(str(result.path))[0])  # the written checkpoint, scored afresh
    assert rescored == pytest.approx(result.score, abs=1e-6)
    assert rescored >= max(result.scores.values()) - 1e-6


def test_ties_are_rejected_and_order_follows_the_scores(ckpts, tmp_path):
    small, lora, large = ckpts
    # ingredient scores: large best, then lora, then small; candidates: +lora ties (rejected), +small rises
    held_out = Scripted([0.1, 0.2, 0.3, 0.3, 0.4])
    result = greedy_soup(ckpts, held_out, tmp_path / "soup")
    assert result.order == [large, lora, small]
    assert result.ingredients == [large, small] and result.score == 0.4
    soup, a, b = state_of(result.path), state_of(large), state_of(small)
    for k in soup:
        torch.testing.assert_close(soup[k], (a[k] + b[k]) / 2, rtol=0, atol=1e-7)
    record = yaml.safe_load((result.path / "merge.yaml").read_text())
    assert record["accepted"] == [large, small] and [c["checkpoint"] for c in record["candidates"]] == [large, lora, small]


def test_a_flat_score_keeps_the_best_ingredient_alone(ckpts, tmp_path):
    result = greedy_soup(ckpts, Scripted([0.0] * 5), tmp_path / "soup")
    assert result.ingredients == [ckpts[0]]  # all tie: the first given wins, nothing is added
    soup, first = state_of(result.path), state_of(ckpts[0])
    assert all(torch.equal(soup[k], first[k]) for k in soup)
