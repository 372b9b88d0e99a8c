"""FFN concepts: the principal directions of each layer's FFN output vectors, read out as vocabulary words.

Behaviour-shift paper (arXiv 2310.00492) §4, the authors' `ffn_explain`: the columns of a layer's
down-projection are the vectors its FFN neurons write into the residual stream. Centre them, take the
SVD, and map each of the top principal directions onto the (length-normalised) unembedding vectors;
the top-K words of a direction name the concept it stores. Comparing the lists of a base model and its
tuned version shows which knowledge the tuning re-oriented.

A principal direction's sign is arbitrary; ftray orients each so that its largest vocabulary score is
positive (the stronger pole) before reading the top words. Only "word" tokens (letters, 2+ characters)
are listed, since the paper reads directions as words.
"""

from __future__ import annotations

from typing import Any

import torch


def down_projections(model: Any) -> list[torch.Tensor]:
    """The FFN output matrices (hidden × intermediate) of every decoder layer, in order: `*.mlp.down_proj`
    (Llama, Mistral, Qwen, SmolLM2 ...); empty when the architecture names them otherwise."""
    return [mod.weight for name, mod in model.named_modules()
            if name.endswith("mlp.down_proj") and isinstance(mod, torch.nn.Linear)]


def principal_directions(down_proj: torch.Tensor, k: int) -> torch.Tensor:
    """The top-`k` principal directions (k × hidden) of the centred FFN value vectors (the columns)."""
    values = down_proj.detach().float().T  # one row per FFN neuron: the vector it adds to the residual stream
    values = values - values.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(values, full_matrices=False)
    return vh[:k]


def word_ids(tokenizer: Any) -> torch.Tensor:
    """Boolean mask over the vocabulary: tokens that decode to a word (letters only, 2+ characters)."""
    words = [w.strip() for w in tokenizer.batch_decode([[i] for i in range(len(tokenizer))])]
    return torch.tensor([len(w) >= 2 and w.isalpha() for w in words])


def concepts(model: Any, tokenizer: Any, directions: int = 5, top_k: int = 10,
             layers: list[int] | None = None) -> dict[int, list[list[str]]]:
    """{layer: [top-`top_k` words of each of the top `directions` principal directions]} for `layers` (default all)."""
    downs = down_projections(model)
    unembed = model.get_output_embeddings().weight.detach().float()
    unembed = unembed / unembed.norm(dim=1, keepdim=True).clamp(min=1e-12)
    allowed = word_ids(tokenizer)
    allowed = torch.nn.functional.pad(allowed, (0, max(0, unembed.shape[0] - allowed.numel())))[: unembed.shape[0]]
    out = {}
    for layer in range(len(downs)) if layers is None else layers:
        lists = []
        for v in principal_directions(downs[layer], directions):
            scores = unembed @ v.to(unembed.device)
            if -scores.min() > scores.max():
                scores = -scores
            scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
            lists.append([tokenizer.decode([int(i)]).strip() for i in scores.topk(top_k).indices])
        out[layer] = lists
    return out


def overlap(a: list[list[str]], b: list[list[str]]) -> float:
    """Jaccard overlap of the words of all directions of one layer in two models (1 = the same words)."""
    wa, wb = {w for ws in a for w in ws}, {w for ws in b for w in ws}
    return len(wa & wb) / max(1, len(wa | wb))
