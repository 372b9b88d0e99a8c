"""UL2 (Tay et al., "UL2: Unifying Language Learning Paradigms", arXiv 2205.05131, ICLR 2023).

A Mixture-of-Denoisers data transform: every example is rewritten by one denoiser drawn from R (T5
span corruption), X (extreme: long spans and/or a high rate) and S (prefix-LM), with a mode token
([NLU] / [NLG] / [S2S]) prepended so the model knows the paradigm; the loss stays token CE on the targets.

Decoder-only layout of one rewritten row (labels only on the targets, loss = mean CE over them):

    R/X:  mode  prompt  c0 [0] c1 [1] ...  |  [0] s0 [1] s1 ... EOS
    S:    mode  prompt  chunk[:k]          |  chunk[k:]

`chunk` is the labelled part of the row (the reply; the whole text for document-style rows),
`prompt` the unlabelled tokens before it, kept whole as context; `|` is where the labels begin.
Run it on its own with e.g. `ftray train ftray/recipes/ul2.yaml`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pydantic import Field, field_validator, model_validator

from ftray.data.tokenize import IGNORE_INDEX, SPAN_PROMPT, SPAN_RESPONSE
from ftray.methods.base import Context, Method, MethodConfig
from ftray.methods.registry import register

# Plain-text markers, not new special tokens: SmolLM2's 49,152 ids have no unused slots, and adding
# tokens would resize the embeddings (breaking LoRA exports and the shared tokenizer object).
MODE_TOKENS: dict[str, str] = {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"}  # the released preprocessor's names
_ROW_KEYS = ("input_ids", "labels", "attention_mask", "span_ids")


class UL2Config(MethodConfig):
    r_denoisers: list[tuple[float, float]] = Field(
        [(3, 0.15), (8, 0.15)], description="R denoisers as (mean span length μ, corruption rate r) pairs (Table 1).")
    x_denoisers: list[tuple[float, float]] = Field(
        [(3, 0.5), (8, 0.5), (64, 0.15), (64, 0.5)], description="X denoisers as (μ, r) pairs (Table 1).")
    r_share: float = Field(0.4, ge=0, description="Probability of R, split equally among the R denoisers (released 40/40/20 mix).")
    x_share: float = Field(0.4, ge=0, description="Probability of X, split equally among the X denoisers.")
    s_share: float = Field(0.2, ge=0, description="Probability of S (prefix-LM). Shares are normalised to sum to 1.")
    sentinel: str = Field(
        "[{}]", description="Text of sentinel k ('{}' = k), tokenized as plain text: e.g. '<extra_id_{}>' for T5's names "
        "(about 7 tokens each on SmolLM2 against 3 for '[{}]').")
    prefix_lm: bool = Field(
        False, description="Bidirectional attention over mode+prompt+inputs (the paper's decoder-only UL2); needs sdpa "
        "attention, and generation would need the same mask. False keeps the plain causal mask.")

    @field_validator("r_denoisers", "x_denoisers")
    @classmethod
    def _valid_pairs(cls, pairs: list[tuple[float, float]]) -> list[tuple[float, float]]:
        for mu, r in pairs:
            if mu < 1 or not 0 < r < 1:
                raise ValueError(f"denoiser (μ={mu}, r={r}): need μ >= 1 and 0 < r < 1")
        return pairs

    @field_validator("sentinel")
    @classmethod
    def _one_slot(cls, s: str) -> str:
        if s.count("{}") != 1:
            raise ValueError(f"sentinel {s!r} must contain '{{}}' exactly once (where the span number goes)")
        return s

    @model_validator(mode="after")
    def _some_mass(self) -> UL2Config:
        live = [(self.r_share, self.r_denoisers), (self.x_share, self.x_denoisers), (self.s_share, [None])]
        if sum(s for s, ds in live if ds) <= 0:
            raise ValueError("r_share + x_share + s_share must be > 0 over paradigms that have denoisers")
        return self


class Denoiser(NamedTuple):
    mode: str
    mean_span: float  # unused by S
    rate: float  # unused by S
    prob: float


def mixture(cfg: UL2Config) -> list[Denoiser]:
    """The denoisers with their probabilities p_k (each paradigm's share split equally among its members)."""
    out = [Denoiser(mode, mu, r, share / len(ds)) for mode, share, ds in
           (("R", cfg.r_share, cfg.r_denoisers), ("X", cfg.x_share, cfg.x_denoisers)) for mu, r in ds]
    out.append(Denoiser("S", 0.0, 0.0, cfg.s_share))
    total = sum(d.prob for d in out)
    return [d._replace(prob=d.prob / total) for d in out if d.prob > 0]


def mode_prompt(text: str, mode: str) -> str:
    """`text` with the mode token of `mode` ("R", "X" or "S") in front, as UL2 prompts at inference.

    Mode switching (§3.1.3): `ftray eval` would render the prompt (chat template included) and pass
    `mode_prompt(prompt, "S")` to generation for open-ended tasks (S matches SFT-style continuation),
    "R" for short fill-in tasks. Training puts the mode token first too, before the prompt.
    """
    if mode not in MODE_TOKENS:
        raise ValueError(f"mode {mode!r}: expected one of {sorted(MODE_TOKENS)}")
    return MODE_TOKENS[mode] + text


def _segments(n_items: int, n_segments: int, g: torch.Generator) -> list[int]:
    """A uniformly random split of n_items into n_segments positive lengths (T5's random segmentation)."""
    cuts = (torch.randperm(n_items - 1, generator=g)[: n_segments - 1] + 1).sort().values.tolist()
    bounds = [0, *cuts, n_items]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def noise_spans(length: int, mean_span: float, rate: float, g: torch.Generator) -> list[tuple[int, int]]:
    """[start, end) noise spans of a chunk: round(L·r) noise tokens in round(noise/μ) spans, interleaved
    with as many non-noise segments, starting with non-noise (the released preprocessor's layout)."""
    n_noise = min(max(round(length * rate), 1), length - 1)
    n_spans = min(max(round(n_noise / mean_span), 1), n_noise, length - n_noise)
    spans, pos = [], 0
    for keep, noise in zip(_segments(length - n_noise, n_spans, g), _segments(n_noise, n_spans, g)):
        pos += keep
        spans.append((pos, pos + noise))
        pos += noise
    return spans


@register
class UL2(Method):
    """Mixture-of-Denoisers: each row becomes mode + inputs (with sentinels) + targets, loss on targets only.

    Decisions ([inf] in the spec): sentinels and mode tokens are plain-text markers (no new ids, no
    resize); the chunk is the row's labelled part (a chat prompt stays whole and uncorrupted before it);
    S draws its split in [1, L-1], or [0, L-1] when a prompt precedes the chunk (so the reply's first
    tokens are learned too); R/X end their targets with EOS, S does not (the chunk keeps its own
    end-of-turn); a chunk too short for the drawn denoiser (R/X: L < 2) stays a plain SFT row.
    The causal mask is kept unless `prefix_lm`. Rows grow (sentinels appear twice), past data.max_len.
    """

    name = "ul2"
    paper = "Tay et al. 2023, UL2: Unifying Language Learning Paradigms (2205.05131)"
    Config = UL2Config
    baseline = "full"  # a data transform on plain SFT

    def __init__(self, config: UL2Config) -> None:
        super().__init__(config)
        self.denoisers = mixture(config)
        self._marker_ids: dict[tuple[int, str], torch.Tensor] = {}

    def check(self, spec) -> None:
        if spec.data.packing:
            raise ValueError("ul2 rewrites each example into mode + inputs + targets and cannot split packed rows; "
                             "set data.packing: false")

    def prepare_model(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        impl = getattr(model.config, "_attn_implementation", None)
        if self.config.prefix_lm and impl != "sdpa":
            raise ValueError(f"ul2.prefix_lm needs sdpa attention (it passes a boolean 4D mask), the model uses {impl!r}; "
                             "set prefix_lm: false")
        return model

    def _ids(self, tokenizer, text: str) -> torch.Tensor:
        key = (id(tokenizer), text)
        if key not in self._marker_ids:
            self._marker_ids[key] = torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
        return self._marker_ids[key]

    def corrupt_batch(self, batch: dict[str, torch.Tensor], ctx: Context) -> dict[str, torch.Tensor]:
        """Rewrite every row with one denoiser drawn from the mixture (ctx.generator: resumable, per rank)."""
        ids = batch["input_ids"]
        n_rows, width = ids.shape
        if ctx.tokenizer.eos_token_id is None:
            raise ValueError("ul2 ends R/X targets with EOS, but the tokenizer has no eos_token; set one")
        for key, value in batch.items():
            if key not in _ROW_KEYS and value.dim() > 1 and value.shape[:2] == (n_rows, width):
                raise ValueError(f"ul2 cannot re-lay out the per-token batch key {key!r} (packed rows or another "
                                 "method's tensor); drop data.packing or that method")
        probs = torch.tensor([d.prob for d in self.denoisers], dtype=torch.float64)
        picks = torch.multinomial(probs, n_rows, replacement=True, generator=ctx.generator).tolist()
        cpu = {k: batch[k].cpu() for k in _ROW_KEYS if k in batch}
        lengths = cpu["attention_mask"].sum(1).tolist() if "attention_mask" in cpu else [width] * n_rows
        rows = [self._rewrite(cpu, b, lengths[b], self.denoisers[k], ctx) for b, k in enumerate(picks)]
        return {**batch, **self._collate(rows, cpu, ctx.tokenizer.pad_token_id, ids.device)}

    def _rewrite(self, cpu: dict, b: int, n: int, d: Denoiser, ctx: Context) -> tuple[torch.Tensor, ...]:
        """(src, new_ids, is_target) of row b: src indexes the old row, or is -1 where new_ids holds an inserted id."""
        labelled = (cpu["labels"][b, :n] != IGNORE_INDEX).nonzero()
        first = int(labelled[0]) if len(labelled) else n
        length = n - first
        pieces: list[tuple[torch.Tensor, torch.Tensor, bool]] = []

        def old(a: int, z: int, target: bool) -> None:
            pieces.append((torch.arange(first + a, first + z), torch.full((z - a,), -1), target))

        def new(t: torch.Tensor, target: bool) -> None:
            pieces.append((torch.full((len(t),), -1), t, target))

        def head(mode: str) -> None:  # the mode token, then the prompt untouched
            new(self._ids(ctx.tokenizer, MODE_TOKENS[mode]), False)
            pieces.append((torch.arange(first), torch.full((first,), -1), False))

        if d.mode == "S" and length >= (1 if first else 2):
            split = int(torch.randint(1 if first == 0 else 0, length, (1,), generator=ctx.generator))
            head("S")
            old(0, split, False)
            old(split, length, True)
        elif d.mode in ("R", "X") and length >= 2:
            spans = noise_spans(length, d.mean_span, d.rate, ctx.generator)
            sentinels = [self._ids(ctx.tokenizer, self.config.sentinel.format(i)) for i in range(len(spans))]
            head(d.mode)
            prev = 0
            for (a, z), s in zip(spans, sentinels):
                old(prev, a, False)
                new(s, False)
                prev = z
            old(prev, length, False)
            for (a, z), s in zip(spans, sentinels):
                new(s, True)
                old(a, z, True)
            new(torch.tensor([ctx.tokenizer.eos_token_id]), True)
        else:  # too short for this denoiser: the row trains as plain SFT
            return torch.arange(n), torch.full((n,), -1), cpu["labels"][b, :n] != IGNORE_INDEX
        src, fresh, tgt = zip(*((s, f, torch.full((len(s),), t)) for s, f, t in pieces))
        return torch.cat(src), torch.cat(fresh), torch.cat(tgt)

    def _collate(self, rows: list, cpu: dict, pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Right-pad the rewritten rows into input_ids, labels, attention_mask, span_ids (+ the prefix-LM mask)."""
        width = max(len(src) for src, _, _ in rows)
        out = {
            "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
            "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
            "span_ids": torch.full((len(rows), width), SPAN_PROMPT, dtype=torch.long),
        }
        n_inputs = []
        for b, (src, fresh, tgt) in enumerate(rows):
            k, kept = len(src), src.clamp(min=0)
            tokens = torch.where(src >= 0, cpu["input_ids"][b, kept], fresh)
            out["input_ids"][b, :k] = tokens
            out["labels"][b, :k] = torch.where(tgt, tokens, IGNORE_INDEX)
            out["attention_mask"][b, :k] = 1
            # targets keep their rationale/answer span ids; inserted targets (sentinels, EOS) count as response
            old_span = cpu["span_ids"][b, kept] if "span_ids" in cpu else torch.full_like(src, SPAN_RESPONSE)
            out["span_ids"][b, :k] = torch.where(tgt, torch.where(src >= 0, old_span, SPAN_RESPONSE), SPAN_PROMPT)
            n_inputs.append(int(tgt.nonzero()[0]) if tgt.any() else 0)
        if self.config.prefix_lm:
            out["attention_mask"] = prefix_lm_mask(out["attention_mask"], torch.tensor(n_inputs))
        return {k: v.to(device) for k, v in out.items()}


def prefix_lm_mask(padding: torch.Tensor, n_inputs: torch.Tensor) -> torch.Tensor:
    """A boolean [B, 1, T, T] mask (True = attend): causal, plus full attention among the first n_inputs
    positions of each row; pads are never keys, and each pad query sees itself so no row is all-False (NaN)."""
    t = padding.shape[1]
    pos = torch.arange(t)
    causal = pos[None, :] <= pos[:, None]
    inside = pos[None, :] < n_inputs[:, None]  # [B, T]
    allowed = (causal[None] | (inside[:, :, None] & inside[:, None, :])) & padding.bool()[:, None, :]
    allowed |= torch.eye(t, dtype=torch.bool)[None]
    return allowed[:, None]
