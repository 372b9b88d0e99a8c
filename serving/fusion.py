"""Logit-fusion ensembles: a large model steered at every step by small (expert − base) logit deltas.

Static fusion is proxy tuning (Liu et al. 2401.08565): z = z_L + Σ αᵢ (zᵢ − z_S) with fixed αᵢ.
Dynamic fusion is Dynamic Logit Fusion (Fan et al. 2406.15480): at every step and for every batch row,
α is the grid point (0, 0.1, …, 2.0 by default; one expert active at a time, scanned expert-major,
first minimum wins) minimising Σ_t [(KL(P̃‖P) − KL(Q_t‖Q))² + (KL(P‖P̃) − KL(Q‖Q_t))²], where P, Q,
Q_t are the large, small-base and expert distributions and P̃ the fused one (spec §(b) 3–5). The
per-row choice is our reading ([inf] in the spec). Temperature/top-p act on the fused logits.

Where the members live. Fusion needs every member's full-vocabulary logits at every step (the KLs
use the whole distribution, so no top-k before fusion). A Serve deployment-to-deployment call costs
4–7 ms per token here with a [1, 49152] row against ~32 ms of SmolLM2 decoding, and Serve has no
sticky sessions for the per-sequence KV caches; a plain actor call costs 1.6–3.8 ms. So an ensemble
replica owns its members as Ray actors (`FusionMember`): one holds the large model, one holds the
small base and its experts and, for static fusion, returns only the weighted delta Σ αᵢ(zᵢ − z_S)
(one row instead of T+1). Both are called at once every step (`ray.get` on both refs), never one
after another; `ftray bench fusion-overhead` measures the cost against the members alone. The large
actor gets its own resources (on a cluster it can take its own GPU); Ray Compiled Graphs would cut
the per-call cost further (~0.4–0.7 ms) and are the next step if the overhead matters.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import ray
import torch
from ray import serve

from serving.config import EnsembleConfig, ModelConfig, ServeConfigError
from serving.engine import TextEngine, eos_ids, load_for_serving
from serving.generation import BatchDecoder, Event, Job, decode_batch


def alpha_grid(alpha_max: float = 2.0, step: float = 0.1) -> torch.Tensor:
    """The dynamic search grid 0, step, …, alpha_max (21 values by default)."""
    return torch.arange(round(alpha_max / step) + 1, dtype=torch.float32) * step


def static_fusion(z_large: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Proxy tuning: the large logits plus the already weighted expert deltas Σ αᵢ(zᵢ − z_S)."""
    return z_large + delta


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) over the last dimension, from log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1)


def dynamic_fusion(z_large: torch.Tensor, z_small: torch.Tensor, z_experts: torch.Tensor,
                   grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DLF: per-row α [B, T] (at most one non-zero per row) and the fused logits [B, V].

    Args:
        z_large: [B, V] large-model logits; z_small: [B, V] small base; z_experts: [T, B, V].
        grid: candidate α values for one expert, scanned in order.
    """
    logp = torch.log_softmax(z_large, -1)
    logq = torch.log_softmax(z_small, -1)
    logqt = torch.log_softmax(z_experts, -1)
    a, b = _kl(logqt, logq), _kl(logq[None], logqt)  # targets KL(Q_t‖Q), KL(Q‖Q_t): [T, B]
    losses = []
    for t in range(z_experts.shape[0]):  # one expert active per candidate: O(n·T·B·V), not O(n^T·B·V)
        cand = torch.log_softmax(z_large[None] + grid[:, None, None] * (z_experts[t] - z_small)[None], -1)
        kl_fwd, kl_rev = _kl(cand, logp[None]), _kl(logp[None], cand)  # [n, B]
        losses.append(((kl_fwd[:, None] - a[None]) ** 2 + (kl_rev[:, None] - b[None]) ** 2).sum(1))
    best = torch.cat(losses).argmin(0)  # [T·n, B] → first minimum in expert-major scan order
    alpha = torch.zeros(z_large.shape[0], z_experts.shape[0])
    alpha[torch.arange(len(best)), best // len(grid)] = grid[best % len(grid)]
    return alpha, z_large + torch.einsum("bt,tbv->bv", alpha, z_experts - z_small[None])


def lora_experts_of(paths: list[str]) -> bool:
    """Whether paths[1:] are all (non-DoRA) LoRA adapters of paths[0]: then one batched forward serves them all."""
    from ftray.eval.loading import base_model_of
    from ftray.models import resolve_model_path

    def is_lora_of_base(path: str) -> bool:
        config = Path(path) / "adapter_config.json"
        if not config.is_file() or json.loads(config.read_text()).get("use_dora"):
            return False
        return resolve_model_path(base_model_of(Path(path))[0]) == resolve_model_path(paths[0])

    return len(paths) > 1 and all(is_lora_of_base(p) for p in paths[1:])


@ray.remote
class FusionMember:
    """One or more models with a KV cache per decoding session; returns each step's logits.

    When the other models are LoRA adapters of the first (the usual expert: ftray's LoRA on the small
    base), they are mounted on one PEFT model and decoded as one batch of M·B rows with per-row
    adapters: decoding one row is memory-bound on CPU, so M rows cost little more than one.
    """

    def __init__(self, paths: list[str], dtype: str, num_threads: int, num_gpus: float = 0.0):
        torch.set_num_threads(max(1, num_threads))
        self.row_adapters: list[str | None] | None = None
        if lora_experts_of(paths):
            adapters = {f"expert{i}": p for i, p in enumerate(paths[1:])}
            loaded = [load_for_serving(ModelConfig(name="member", path=paths[0], dtype=dtype, num_gpus=num_gpus,
                                                   adapters=adapters))]
            self.row_adapters = [None, *adapters]
        else:
            loaded = [load_for_serving(ModelConfig(name="member", path=p, dtype=dtype, num_gpus=num_gpus)) for p in paths]
        self.models = [(model, autocast) for model, _, autocast in loaded]
        self.tokenizer = loaded[0][1]
        self.sessions: dict[str, tuple[list[BatchDecoder], torch.Tensor | None]] = {}

    def info(self) -> dict:
        """Context length, end-of-sequence ids and vocabulary size of the first model."""
        model = self.models[0][0]
        context = getattr(model.config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        return {"context": context, "eos_ids": eos_ids(model, self.tokenizer), "vocab": model.config.vocab_size}

    def start(self, session: str, prompts: list[list[int]], pad_id: int,
              weights: torch.Tensor | None = None) -> torch.Tensor:
        """Prefill a new session; `weights` [M] make it return Σ wₘ zₘ instead of all M rows."""
        if self.row_adapters is None:
            decoders = [BatchDecoder(model, prompts, pad_id, autocast=autocast) for model, autocast in self.models]
        else:
            (model, autocast), m = self.models[0], len(self.row_adapters)
            rows = [a for a in self.row_adapters for _ in prompts]
            decoders = [BatchDecoder(model, prompts * m, pad_id, adapters=rows, autocast=autocast)]
        self.sessions[session] = (decoders, weights)
        return self.step(session, None)

    def step(self, session: str, tokens: list[int] | None) -> torch.Tensor:
        """Feed one token per row: logits [M, B, V], or the weighted sum [B, V]."""
        decoders, weights = self.sessions[session]
        if self.row_adapters is None:
            logits = torch.stack([d.step(tokens) for d in decoders])
        else:
            m = len(self.row_adapters)
            logits = decoders[0].step(None if tokens is None else tokens * m)
            logits = logits.view(m, -1, logits.shape[-1])
        return logits if weights is None else torch.einsum("m,mbv->bv", weights, logits)

    def end(self, session: str) -> None:
        """Drop a session's KV caches."""
        self.sessions.pop(session, None)


class FusionDecoder:
    """A logits source for `decode_batch`: both member actors called at once, fused per step."""

    def __init__(self, large, small, prompts: list[list[int]], pad_id: int, cfg: EnsembleConfig, vocab: int):
        self.large, self.small, self.prompts, self.pad_id, self.vocab = large, small, prompts, pad_id, vocab
        self.dynamic = cfg.fusion == "dynamic"
        alphas = torch.tensor([e.alpha for e in cfg.experts])
        # Static: the small actor returns Σ αᵢ zᵢ − (Σ αᵢ) z_S, i.e. one [B, V] row instead of T+1.
        self.weights = None if self.dynamic else torch.cat([-alphas.sum()[None], alphas])
        self.grid = alpha_grid(cfg.alpha_max, cfg.alpha_step)
        self.session = uuid.uuid4().hex
        self.started = False
        self.alphas: list[torch.Tensor] = []  # dynamic: the α chosen at every step, [B, T] each

    def step(self, tokens: list[int] | None = None) -> torch.Tensor:
        """Prefill or feed one token per row to every member concurrently; returns fused logits [B, V]."""
        if not self.started:
            refs = [self.large.start.remote(self.session, self.prompts, self.pad_id),
                    self.small.start.remote(self.session, self.prompts, self.pad_id, self.weights)]
            self.started = True
        else:
            refs = [self.large.step.remote(self.session, tokens), self.small.step.remote(self.session, tokens)]
        z_large, small = ray.get(refs)
        z_large, small = z_large[0, :, : self.vocab], small[..., : self.vocab]  # drop padded vocab rows
        if not self.dynamic:
            return static_fusion(z_large, small)
        alpha, fused = dynamic_fusion(z_large, small[0], small[1:], self.grid)
        self.alphas.append(alpha)
        return fused

    def close(self) -> None:
        """Free the session's KV caches in both actors."""
        if self.started:
            self.large.end.remote(self.session)
            self.small.end.remote(self.session)


def start_members(cfg: EnsembleConfig):
    """(large actor, small actor) for `cfg`, each with its own CPUs/GPUs and thread count."""
    opts = lambda cpus: {"num_cpus": cpus, "num_gpus": cfg.num_gpus}  # noqa: E731
    large = FusionMember.options(**opts(cfg.large_num_cpus)).remote(
        [cfg.large], cfg.dtype, int(cfg.large_num_cpus), cfg.num_gpus)
    small = FusionMember.options(**opts(cfg.small_num_cpus)).remote(
        [cfg.small_base, *(e.path for e in cfg.experts)], cfg.dtype, int(cfg.small_num_cpus), cfg.num_gpus)
    return large, small


@serve.deployment
class FusionEngine(TextEngine):
    """An ensemble replica: OpenAI requests decoded by a `FusionDecoder` over its member actors."""

    def __init__(self, ensemble: dict):
        from ftray.eval.loading import load_checkpoint_tokenizer

        self.cfg = EnsembleConfig.model_validate(ensemble)
        self.large, self.small = start_members(self.cfg)
        info, small_info = ray.get([self.large.info.remote(), self.small.info.remote()])
        self.tokenizer = load_checkpoint_tokenizer(self.cfg.large)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.context, self.eos_ids = info["context"], info["eos_ids"]
        self.vocab = min(info["vocab"], small_info["vocab"], len(self.tokenizer))
        self.default_max_tokens = self.cfg.default_max_tokens
        self.configure_batching(self.cfg.max_batch_size, self.cfg.batch_wait_timeout_s)

    def steps(self, jobs: list[Job]) -> Iterator[list[Event | None]]:
        """Decode `jobs` as one batch through the fused logits; frees the members' caches at the end."""
        decoder = FusionDecoder(self.large, self.small, [j.prompt_ids for j in jobs], self.tokenizer.pad_token_id,
                                self.cfg, self.vocab)
        try:
            yield from decode_batch(None, self.tokenizer, jobs, self.eos_ids, self.tokenizer.pad_token_id,
                                    decoder=decoder)
        finally:
            decoder.close()


def check_vocabularies(cfg: EnsembleConfig, index: int) -> None:
    """Refuse an ensemble whose members do not share the large model's tokenizer (logits add token by token)."""
    from ftray.eval.loading import load_checkpoint_tokenizer as load_tokenizer

    reference = load_tokenizer(cfg.large).get_vocab()
    for field, path in cfg.member_paths().items():
        if field == "large":
            continue
        try:
            vocab = load_tokenizer(path).get_vocab()
        except Exception as err:  # a missing or broken tokenizer is the config's problem, say which member
            raise ServeConfigError(f"ensembles.{index}.{field}: cannot load the tokenizer of {path!r}: {err}") from None
        if vocab != reference:
            differ = len(set(vocab.items()) ^ set(reference.items()))
            raise ServeConfigError(
                f"ensembles.{index}.{field}: {path!r} has a different tokenizer from `large` ({len(vocab)} vs "
                f"{len(reference)} tokens, {differ} entries differ); logit fusion adds logits token by token, so every "
                "member must share one vocabulary"
            )


def fusion_deployment(cfg: EnsembleConfig, index: int):
    """The Serve application node of one ensemble (vocabularies checked first)."""
    check_vocabularies(cfg, index)
    # The replica only waits on its members and does O(n·T·B·V) arithmetic per step: no CPU reserved.
    return FusionEngine.options(
        name=f"fusion-{cfg.name}", num_replicas=cfg.num_replicas, max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    ).bind(cfg.model_dump())
