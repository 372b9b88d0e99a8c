"""Gradient × input attribution of a response to its prompt, sparsified, and the instruction-following score.

From "From Language Modeling to Instruction Following: Understanding the Behavior Shift in LLMs after
Instruction Tuning" (Wu, Xu et al., NAACL 2024, arXiv 2310.00492), §3 and the authors'
`generator.input_explain`, `utils.compute_density` and `analysis_following_ability_after_IFT.evaluate`:

    S[i, j] = Σ_d ∂p(y_j | x, y_<j)/∂E_i · E_i     prompt token i, response token j (the probability, not its log)
    S ← max(S, 0); S[:, j] /= max_i S[i, j]; S ← ⌈L·S⌉; S[S ≤ b] = 0          L = 10 levels, b = 7
    d_i = ‖S_i‖₁ / ‖S_i‖_p, d ← d / max d                                       p = 4
    IFA = Σ_i d_i M_i / log₂(2 + Σ_i M_i)                                       M: 1 on instruction tokens

One backward pass per response token (m of them), all from one forward pass.
"""

from __future__ import annotations

import math
from typing import Any

import torch

LEVELS, CUT, NORM_P = 10, 7, 4  # the authors' quantisation levels, sparsity cut and density norm


def saliency(model: Any, input_ids: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """Raw gradient × input S (n_prompt × m) of each response token's probability w.r.t. each prompt embedding.

    `input_ids` (1-D) is the prompt followed by the m response tokens; `model` takes `inputs_embeds` and
    `logits_to_keep` and returns `.logits` (any Hugging Face causal LM). Runs in eval mode and restores
    the previous mode.
    """
    ids = input_ids.reshape(-1).to(model.get_input_embeddings().weight.device)
    m = ids.numel() - n_prompt
    if m <= 0:
        return torch.zeros(n_prompt, 0)
    was_training = model.training
    model.eval()
    try:
        embeds = model.get_input_embeddings()(ids).detach().float().requires_grad_(True)
        # only the m + 1 last positions need logits (position t predicts token t + 1); the full vocabulary
        # projection at every prompt position would triple the cost of each backward pass
        logits = model(inputs_embeds=embeds[None], logits_to_keep=m + 1).logits[0, :-1].float()
        p = torch.softmax(logits, dim=-1).gather(-1, ids[n_prompt:, None]).squeeze(-1)
        grads = _grads(p, embeds)
    finally:
        model.train(was_training)
    return (grads[:, :n_prompt] * embeds[:n_prompt].detach()).sum(-1).T.cpu()


def _grads(p: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """∂p_j/∂embeds for every j (m × seq × d): one vmapped backward pass, else m sequential ones.

    The vmapped pass (`is_grads_batched`) is ~1.4x faster on CPU, but vmap does not cover every
    attention kernel, hence the fallback.
    """
    m = p.numel()
    try:
        (g,) = torch.autograd.grad(p, embeds, grad_outputs=torch.eye(m, device=p.device), is_grads_batched=True,
                                   retain_graph=True)
        return g
    except RuntimeError:
        return torch.stack([torch.autograd.grad(p[j], embeds, retain_graph=j < m - 1)[0] for j in range(m)])


def sparsify(scores: torch.Tensor, levels: int = LEVELS, cut: int = CUT) -> torch.Tensor:
    """Keep positive attributions, scale each response column to max 1, quantise to `levels`, zero those ≤ `cut`."""
    s = scores.clamp(min=0)
    top = s.max(dim=0, keepdim=True).values
    s = torch.where(top > 0, s / top.clamp(min=1e-30), torch.zeros_like(s))
    q = torch.ceil(levels * s)
    return torch.where(q > cut, q, torch.zeros_like(q))


def density(sparse: torch.Tensor, p: int = NORM_P) -> torch.Tensor:
    """d_i = ‖S_i‖₁ / ‖S_i‖_p per prompt token, scaled so that its max is 1 (all zeros when S is)."""
    l1 = sparse.abs().sum(dim=1)
    lp = sparse.abs().pow(p).sum(dim=1).pow(1 / p)
    d = torch.where(lp > 0, l1 / lp.clamp(min=1e-30), torch.zeros_like(l1))
    top = d.max() if d.numel() else torch.tensor(0.0)
    return d / top if top > 0 else d


def ifa(d: torch.Tensor, mask: torch.Tensor) -> float:
    """Instruction-following score: density on instruction tokens, discounted by log₂(2 + their count)."""
    m = mask.float()
    return float((d * m).sum() / math.log2(2 + float(m.sum())))
