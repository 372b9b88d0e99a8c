"""RoSTE — Rotated Straight-Through Estimator for quantization-aware SFT (Wei et al., ICML 2025).

Idea: train with W4/A4/KV4 fake quantizers in the forward pass and the straight-through estimator in
the backward pass, after Hadamard rotations that spread outliers; each layer's optional rotations
(R2, R3, R4) are kept only where they lower a quantization-error surrogate on calibration data.

What prepare_model does (QuaRot/SpinQuant conventions where the spec infers):
1. Untie lm_head from the embedding (needed for 2), fuse every RMSNorm scale into the next linears.
2. R1: a randomized Hadamard on the residual stream, merged into embedding, q/k/v/gate/up (inputs),
   o/down (outputs) and lm_head.
3. Calibration (fp, no quantizers): per layer and slot, ‖Q(WR)−WR‖² + ‖Q(XR)−XR‖² with R = identity
   and R = Hadamard; keep the lower (`rotations: adaptive`). R2 = per-head Hadamard between v_proj and
   o_proj (merged into their weights; error of o_proj's weight and input and of the V cache); R3 =
   per-head Hadamard on Q and K after RoPE (online; error of the K cache); R4 = Hadamard on
   down_proj's input (online on both the activation and the weight; error of both).
4. Fake quantizers with STE (∂Q(x)/∂x = 1): weights per output channel, symmetric; activations per
   token, asymmetric, clip `a_clip`; K and V per head and token, asymmetric — on the inputs of the 7
   linears of every decoder layer; lm_head and embeddings stay in floating point [inf, QuaRot].

Hadamard sizes: Sylvester for powers of two, else Paley(q) ⊗ Sylvester (q prime, q ≡ 3 mod 4) —
SmolLM2's hidden 576 = 72 × 8 (q = 71), intermediate 1536 = 12 × 128, head_dim 64 — applied factor by
factor (cheap online); sizes with no such factor get a seeded random orthogonal matrix. Written by
hand: torch has no Hadamard and scipy's is powers of two only.

Export (finalize): the trained weights in the rotated basis (R1, R2 merged, norms fused, lm_head
untied: `tie_word_embeddings: false`) as a plain Llama, without fake quantizers. Without quantizers
R3 is the identity and R4 is applied on the fly to both sides of down_proj (its weight is stored
unrotated), so this plain model reproduces the trained model's quantizer-free outputs exactly; the
choices, bits and R1 seed are in `config.roste` for a W4A4KV4 runtime (rotate R3/R4 online, RTN).
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ftray.methods.base import Context, Method, MethodConfig, stable_seed
from ftray.methods.hft import decoder_layers
from ftray.methods.registry import register

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class RoSTEConfig(MethodConfig):
    w_bits: int = Field(4, ge=2, le=16, description="Weight bits, per output channel, symmetric (paper: W4).")
    a_bits: int = Field(4, ge=2, le=16, description="Activation bits on every decoder linear's input, per token, asymmetric (paper: A4; also A8).")
    kv_bits: int = Field(4, ge=2, le=16, description="K/V cache bits, per head and token, asymmetric (paper: KV4).")
    w_clip: float = Field(1.0, gt=0, le=1, description="Weight clip ratio of the per-channel max [inf].")
    a_clip: float = Field(0.9, gt=0, le=1, description="Activation and KV clip ratio [inf: QuaRot's 0.9].")
    r1: bool = Field(True, description="Merge a randomized Hadamard into the residual stream (fusing norm scales, untying lm_head).")
    rotations: Literal["adaptive", "all", "none"] = Field("adaptive", description="R2/R3/R4 per layer: the lower-error option (paper), always Hadamard, or never.")
    calib_source: Literal["data", "random"] = Field("data", description="Calibration inputs: rows of data.source, or seeded random token ids.")
    calib_samples: int = Field(8, ge=1, description="Calibration sequences for the rotation choice [inf].")


# --- Hadamard matrices -------------------------------------------------------------------------

def sylvester(n: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of a power-of-two size."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def paley(q: int) -> torch.Tensor:
    """Paley construction I: a ±1 Hadamard matrix of size q+1 for a prime q ≡ 3 (mod 4)."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)])
    jacobsthal = torch.stack([chi[(torch.arange(q) - i) % q] for i in range(q)])
    s = torch.zeros(q + 1, q + 1)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jacobsthal
    return s + torch.eye(q + 1)


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1))


@functools.lru_cache(maxsize=None)  # called per forward during calibration; callers never modify the factors
def hadamard_factors(n: int, seed: int = 0) -> list[torch.Tensor]:
    """Orthonormal factors whose Kronecker product is an n×n Hadamard matrix (or a random orthogonal one)."""
    for k in range(n.bit_length(), -1, -1):
        m = n >> k
        if m << k != n:
            continue
        if m == 1:
            return [sylvester(n) / math.sqrt(n)]
        if _is_prime(m - 1) and (m - 1) % 4 == 3:
            return [paley(m - 1) / math.sqrt(m)] + ([sylvester(1 << k) / math.sqrt(1 << k)] if k else [])
    g = torch.Generator().manual_seed(seed)
    return [torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0].float()]  # no Hadamard of this size


def dense(factors: list[torch.Tensor]) -> torch.Tensor:
    """The matrix kron(*factors)."""
    return functools.reduce(torch.kron, factors)


def rotate(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """x @ kron(factors) on the last dim, block-diagonally when that dim is a multiple of the size (per head)."""
    sizes = [f.shape[0] for f in factors]
    lead = x.shape[:-1]
    y = x.reshape(*lead, -1, *sizes)
    for i, f in enumerate(factors):
        axis = y.dim() - len(sizes) + i
        y = (y.movedim(axis, -1) @ f.to(y.device, y.dtype)).movedim(-1, axis)
    return y.reshape(x.shape)


# --- fake quantization with the straight-through estimator -------------------------------------

def fake_quant(x: torch.Tensor, bits: int, symmetric: bool, clip: float = 1.0) -> torch.Tensor:
    """Round x to a per-row (last dim) integer grid in the forward pass; identity gradient (STE)."""
    xf = x.float()
    with torch.no_grad():
        if symmetric:
            top = 2 ** (bits - 1) - 1
            scale = (xf.abs().amax(-1, keepdim=True) * clip).clamp(min=1e-8) / top
            q = (xf / scale).round().clamp(-top - 1, top) * scale
        else:
            hi, lo = xf.amax(-1, keepdim=True).clamp(min=0) * clip, xf.amin(-1, keepdim=True).clamp(max=0) * clip
            scale = (hi - lo).clamp(min=1e-8) / (2**bits - 1)
            zero = (-lo / scale).round()
            q = ((xf / scale).round() + zero).clamp(0, 2**bits - 1).sub(zero) * scale
    return (xf + (q - xf).detach()).to(x.dtype)


def sq_err(x: torch.Tensor, bits: int, symmetric: bool, clip: float) -> float:
    """‖Q(x) − x‖² (float64 sum)."""
    return float((fake_quant(x, bits, symmetric, clip).float() - x.float()).pow(2).sum(dtype=torch.float64))


class Quant:
    """Quantizer settings shared by every patched module, and the calibration error log."""

    def __init__(self, c: RoSTEConfig) -> None:
        self.c, self.enabled, self.calibrating, self.errors = c, False, False, {}

    def act(self, x: torch.Tensor, bits: int | None = None) -> torch.Tensor:
        return fake_quant(x, bits or self.c.a_bits, False, self.c.a_clip) if self.enabled else x

    def log(self, layer: int, slot: str, x: torch.Tensor, alt: list[torch.Tensor], bits: int, symmetric: bool, clip: float) -> None:
        """Add x's quantization error as is and rotated by `alt` to the (layer, slot) totals."""
        e = self.errors.setdefault(layer, {}).setdefault(slot, [0.0, 0.0])
        e[0] += sq_err(x.detach(), bits, symmetric, clip)
        e[1] += sq_err(rotate(x.detach().float(), alt), bits, symmetric, clip)


class RoSTELinear(torch.nn.Linear):
    """nn.Linear with fake-quantized input and weight; `rot` rotates both along the input dim (R4)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, w = self.roste, self.weight
        if q.calibrating and self.roste_alt is not None:
            q.log(self.roste_layer, self.roste_slot, x, self.roste_alt, q.c.a_bits, False, q.c.a_clip)
        if self.rot is not None:
            x, w = rotate(x, self.rot), rotate(w, self.rot)
        if q.enabled:
            x, w = q.act(x), fake_quant(w, q.c.w_bits, True, q.c.w_clip)
        return F.linear(x, w, self.bias)


def roste_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention with R3 on Q/K after RoPE and fake-quantized K/V (the KV cache), then the model's own kernel."""
    q, hd = module.roste, module.head_dim
    if q.calibrating:
        h = hadamard_factors(hd)
        q.log(module.layer_idx, "r3", key, h, q.c.kv_bits, False, q.c.a_clip)
        q.log(module.layer_idx, "r2", value, h, q.c.kv_bits, False, q.c.a_clip)
    if module.r3 is not None:
        query, key = rotate(query, module.r3), rotate(key, module.r3)
    key, value = q.act(key, q.c.kv_bits), q.act(value, q.c.kv_bits)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(module.roste_inner, eager)(module, query, key, value, attention_mask, **kwargs)


# --- the offline transforms --------------------------------------------------------------------

@torch.no_grad()
def fuse_and_rotate_r1(model: torch.nn.Module, r1: torch.Tensor) -> None:
    """Untie lm_head, fold every RMSNorm scale into the next linears (R1 commutes only with unit-scale norms), merge R1."""
    inner, head = model.model, model.lm_head
    if head.weight is inner.embed_tokens.weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    blocks = [(layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
              for _, layer in decoder_layers(model)]
    blocks += [(layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj]) for _, layer in decoder_layers(model)]
    for norm, linears in blocks + [(inner.norm, [head])]:
        for lin in linears:
            lin.weight.mul_(norm.weight.to(lin.weight.dtype))
        norm.weight.fill_(1.0)

    def right(p):  # an input side in the residual basis: W ← W R1
        p.copy_((p.double() @ r1).to(p.dtype))
    right(inner.embed_tokens.weight)
    right(head.weight)
    for _, layer in decoder_layers(model):
        for lin in blocks_inputs(layer):
            right(lin.weight)
        for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):  # outputs into the residual: W ← R1ᵀ W
            lin.weight.copy_((r1.T @ lin.weight.double()).to(lin.weight.dtype))
            if lin.bias is not None:
                right(lin.bias)


def blocks_inputs(layer: torch.nn.Module) -> list[torch.nn.Linear]:
    """The linears that read the (normed) residual stream."""
    a, m = layer.self_attn, layer.mlp
    return [a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj]


@torch.no_grad()
def merge_r2(attn: torch.nn.Module, h: list[torch.Tensor]) -> None:
    """Per-head Hadamard between v_proj and o_proj: v ← v H (rows of W_v), o_proj reads v H (its input columns)."""
    v, o = attn.v_proj, attn.o_proj
    v.weight.copy_(rotate(v.weight.T.float(), h).T.to(v.weight.dtype))
    if v.bias is not None:
        v.bias.copy_(rotate(v.bias.float(), h).to(v.bias.dtype))
    o.weight.copy_(rotate(o.weight.float(), h).to(o.weight.dtype))


def calibration_ids(c: RoSTEConfig, ctx: Context, vocab: int) -> list[torch.Tensor]:
    """Token-id sequences for the rotation choice: rows of the training source, or seeded random ids."""
    if c.calib_source == "random":
        g = torch.Generator().manual_seed(stable_seed("roste", ctx.spec.train.seed))
        return [torch.randint(1, vocab, (1, 64), generator=g) for _ in range(c.calib_samples)]
    from ftray.data import detect_format, load_rows, tokenize_dataset

    s = ctx.spec.data
    ds = load_rows(s.source, s.split, c.calib_samples)
    fmt = detect_format(ds) if s.format == "auto" else s.format
    rows = tokenize_dataset(ds, ctx.tokenizer, fmt, s.max_len, source_name=f"{s.source}[{s.split}]").to_list()
    return [torch.tensor([r["input_ids"]]) for r in rows]


@register
class RoSTE(Method):
    """Fuse norms and merge R1/R2, choose R2/R3/R4 per layer by quantization error, then train with W/A/KV fake quantizers and STE."""

    name = "roste"
    paper = "Wei et al. 2025, RoSTE: An Efficient Quantization-Aware Supervised Fine-Tuning Approach for LLMs (ICML 2025)"
    Config = RoSTEConfig
    incompatible = ("lora",)

    def __init__(self, config: RoSTEConfig) -> None:
        super().__init__(config)
        self.choices: dict[str, list[bool]] | None = None  # slot → per-layer "Hadamard?"
        self.errors: dict = {}

    def prepare_model(self, model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        """Rotate, choose the per-layer rotations (or reuse them after a resume) and switch the quantizers on."""
        if getattr(model, "roste", None) is not None:
            return model  # a later phase: already prepared
        c, layers = self.config, [layer for _, layer in decoder_layers(model)]
        hidden, hd = model.config.hidden_size, layers[0].self_attn.head_dim
        if c.r1:  # without R1 nothing needs the norms fused or lm_head untied
            g = torch.Generator().manual_seed(stable_seed("roste-r1", ctx.spec.train.seed))
            signs = torch.randint(0, 2, (hidden,), generator=g).double() * 2 - 1
            fuse_and_rotate_r1(model, signs[:, None] * dense(hadamard_factors(hidden)).double())  # randomized Hadamard diag(±1)·H
        quant = Quant(c)
        model.roste = quant
        self._patch(model, layers, quant)
        if self.choices is None:
            self.choices = self._choose(model, layers, quant, ctx, hd)
        h_hd = hadamard_factors(hd)
        for i, layer in enumerate(layers):
            if self.choices["r2"][i]:
                merge_r2(layer.self_attn, h_hd)
            layer.self_attn.r3 = h_hd if self.choices["r3"][i] else None
            layer.mlp.down_proj.rot = hadamard_factors(layer.mlp.down_proj.in_features) if self.choices["r4"][i] else None
        model.config.roste = {"bits": {"w": c.w_bits, "a": c.a_bits, "kv": c.kv_bits}, "clip": {"w": c.w_clip, "a": c.a_clip},
                              "r1_seed": stable_seed("roste-r1", ctx.spec.train.seed) if c.r1 else None, **self.choices}
        quant.enabled = True
        return model

    def _patch(self, model: torch.nn.Module, layers: list, quant: Quant) -> None:
        """Swap the decoder linears to RoSTELinear and route attention through `roste_attention`."""
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        inner = model.config._attn_implementation or "sdpa"
        name = f"roste_{inner}"
        AttentionInterface.register(name, roste_attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
        model.roste_inner = inner
        model.config._attn_implementation = name
        hd = layers[0].self_attn.head_dim
        for i, layer in enumerate(layers):
            layer.self_attn.roste, layer.self_attn.roste_inner, layer.self_attn.r3 = quant, inner, None
            for path in LINEARS:
                lin = layer.get_submodule(path)
                lin.__class__ = RoSTELinear
                lin.roste, lin.rot, lin.roste_layer, lin.roste_slot, lin.roste_alt = quant, None, i, None, None
            layer.self_attn.o_proj.roste_slot, layer.self_attn.o_proj.roste_alt = "r2", hadamard_factors(hd)
            layer.mlp.down_proj.roste_slot = "r4"
            layer.mlp.down_proj.roste_alt = hadamard_factors(layer.mlp.down_proj.in_features)

    @torch.no_grad()
    def _choose(self, model, layers: list, quant: Quant, ctx: Context, hd: int) -> dict[str, list[bool]]:
        """Log identity-vs-Hadamard quantization errors per layer and slot; pick per `rotations`."""
        c = self.config
        for i, layer in enumerate(layers):  # the weight terms of the surrogate
            o, v, down = layer.self_attn.o_proj.weight, layer.self_attn.v_proj.weight, layer.mlp.down_proj.weight
            quant.log(i, "r2", o.float(), hadamard_factors(hd), c.w_bits, True, c.w_clip)
            quant.log(i, "r2", v.T.float(), hadamard_factors(hd), c.w_bits, True, c.w_clip)  # per output channel of v
            quant.log(i, "r4", down.float(), hadamard_factors(down.shape[1]), c.w_bits, True, c.w_clip)
        was_training, quant.calibrating = model.training, True
        model.eval()
        try:
            for ids in calibration_ids(c, ctx, model.config.vocab_size):
                model(input_ids=ids.to(model.device), use_cache=False)
        finally:
            quant.calibrating = False
            model.train(was_training)
        self.errors = {i: {s: tuple(e) for s, e in slots.items()} for i, slots in quant.errors.items()}
        pick = {"all": lambda e: True, "none": lambda e: False, "adaptive": lambda e: e[1] < e[0]}[c.rotations]
        choices = {s: [pick(self.errors[i][s]) for i in range(len(layers))] for s in ("r2", "r3", "r4")}
        if dist.is_initialized():  # float ties could differ across devices: every rank takes rank 0's choice
            box = [choices]
            dist.broadcast_object_list(box, src=0)
            choices = box[0]
        return choices

    def finalize(self, model: torch.nn.Module, base: torch.nn.Module, ctx: Context) -> torch.nn.Module:
        """The plain rotated model: fake quantizers and online rotations removed (they are identities without quantizers)."""
        if getattr(model, "roste", None) is None:
            return model  # a checkpoint loaded with plain transformers is already the export
        model.config._attn_implementation = model.roste_inner
        for mod in model.modules():
            if isinstance(mod, RoSTELinear):  # R4 rotates input and weight alike: without quantizers it cancels
                mod.__class__ = torch.nn.Linear
                for a in ("roste", "rot", "roste_layer", "roste_slot", "roste_alt"):
                    delattr(mod, a)
            for a in ("roste", "roste_inner", "r3"):
                if a in vars(mod):
                    delattr(mod, a)
        return model

    def state_dict(self) -> dict:
        """The per-layer rotation choices (a resumed run must not re-choose) and their logged errors."""
        return {"choices": self.choices, "errors": self.errors}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        self.choices, self.errors = state["choices"], state["errors"]
