"""UL2: the Mixture-of-Denoisers rewrite (spec "sanity check"): rates, span lengths, mixture, layout, seeding."""

import collections
import copy

import pytest
import torch

from ftray.config import SpecError, build_spec
from ftray.methods import Context, build_methods
from ftray.methods.ul2 import MODE_TOKENS, UL2Config, mixture, mode_prompt, noise_spans
from ftray.train.loop import train_step
from ftray.train.optim import build_optimizer, build_scheduler
from tests.methods.helpers import tiny_llama

PAD, EOS, MODE_IDS, SENTINEL0 = 0, 1, {"[NLU]": 901, "[NLG]": 902, "[S2S]": 903}, 1000


class StubTok:
    """One id per marker, so rows can be parsed: mode tokens 901-903, sentinel k = 1000 + k, data ids in [3, 900)."""

    pad_token_id, eos_token_id = PAD, EOS

    def encode(self, text, add_special_tokens=False):
        return [MODE_IDS[text]] if text in MODE_IDS else [SENTINEL0 + int(text.strip("[]"))]

    def __len__(self):
        return 2000


def make(entry=None, seed=0, tokenizer=None):
    spec = build_spec({"methods": [{"name": "ul2", **(entry or {})}], "train": {"seed": seed}})
    method = build_methods(spec.methods)[0]
    ctx = Context(spec=spec, tokenizer=tokenizer or StubTok())
    ctx.generator.manual_seed(seed)
    return method, ctx


def rows(n_rows=4, length=40, prompt=0, seed=0, vocab=900):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n_rows, length), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
            "span_ids": (labels != -100).long()}


def parse(ids, labels):
    """(mode id, prompt+inputs, targets) of one rewritten row, pads dropped; checks labels == targets."""
    ids, labels = ids[ids != PAD].tolist(), labels[: int((ids != PAD).sum())].tolist()
    start = next(i for i, lab in enumerate(labels) if lab != -100)
    assert all(lab == -100 for lab in labels[:start]) and labels[start:] == ids[start:]  # loss exactly on targets
    return ids[0], ids[1:start], ids[start:]


@pytest.mark.parametrize("mu,r", [(3, 0.15), (8, 0.15), (3, 0.5), (8, 0.5), (64, 0.15), (64, 0.5)])
def test_noise_spans_have_the_configured_rate_and_mean_length(mu, r):
    g, length = torch.Generator().manual_seed(0), 2048
    sizes = []
    for _ in range(20):
        spans = noise_spans(length, mu, r, g)
        lengths = [z - a for a, z in spans]
        assert sum(lengths) == round(length * r)  # corrupted share = round(L·r)/L exactly
        assert spans[0][0] > 0 and spans[-1][1] == length  # starts with kept text, ends with a span
        assert all(z0 < a1 for (_, z0), (a1, _) in zip(spans, spans[1:]))  # disjoint, kept text between
        sizes += lengths
    assert sum(sizes) / len(sizes) == pytest.approx(mu, rel=0.05)
    if len(spans) > 1:
        assert len(set(sizes)) > 1  # random segmentation, not equal spans


def test_r_and_x_rows_rebuild_the_chunk_and_pair_sentinels():
    method, ctx = make({"s_share": 0.0})
    batch = rows(n_rows=64, length=60, prompt=7)
    out = method.corrupt_batch(batch, ctx)
    for b in range(64):
        mode, inputs, targets = parse(out["input_ids"][b], out["labels"][b])
        assert mode in (MODE_IDS["[NLU]"], MODE_IDS["[NLG]"])
        assert inputs[:7] == batch["input_ids"][b, :7].tolist()  # the prompt stays whole
        assert targets[-1] == EOS
        in_sent = [t for t in inputs if t >= SENTINEL0]
        tg_sent = [t for t in targets if t >= SENTINEL0]
        assert in_sent == tg_sent == list(range(SENTINEL0, SENTINEL0 + len(in_sent)))
        spans, cur = {}, None
        for t in targets[:-1]:
            cur = t if t >= SENTINEL0 else cur
            spans.setdefault(cur, []).extend([] if t >= SENTINEL0 else [t])
        rebuilt = [x for t in inputs[7:] for x in (spans[t] if t >= SENTINEL0 else [t])]
        assert rebuilt == batch["input_ids"][b, 7:].tolist()
        noise = sum(len(s) for s in spans.values())
        rates = (0.15,) if mode == MODE_IDS["[NLU]"] else (0.15, 0.5)
        assert noise in {round(53 * r) for r in rates}  # round(L·r) corrupted tokens
        assert out["span_ids"][b][out["labels"][b] != -100].eq(1).all()


def test_s_rows_are_prefix_plus_suffix_and_split_range():
    method, ctx = make({"r_share": 0.0, "x_share": 0.0})
    for prompt, lowest in ((0, 1), (5, 0)):
        splits = []
        for seed in range(30):
            batch = rows(n_rows=16, length=12, prompt=prompt, seed=seed)
            out = method.corrupt_batch(batch, ctx)
            for b in range(16):
                mode, inputs, targets = parse(out["input_ids"][b], out["labels"][b])
                assert mode == MODE_IDS["[S2S]"] and EOS not in targets
                assert inputs + targets == batch["input_ids"][b].tolist()
                splits.append(len(inputs) - prompt)
        assert min(splits) == lowest and max(splits) == 12 - prompt - 1  # uniform on [1 or 0, L-1]


def test_denoisers_are_drawn_with_their_mixture_probabilities():
    method, ctx = make()
    drawn = collections.Counter()
    rewrite = method._rewrite

    def record(cpu, b, n, d, ctx):
        drawn[d] += 1
        return rewrite(cpu, b, n, d, ctx)

    method._rewrite = record
    out = None
    for seed in range(10):
        out = method.corrupt_batch(rows(n_rows=1000, length=4, seed=seed), ctx)
    for d in mixture(UL2Config()):
        assert drawn[d] / 10_000 == pytest.approx(d.prob, abs=0.02)
    assert [round(d.prob, 3) for d in mixture(UL2Config())] == [0.2, 0.2, 0.1, 0.1, 0.1, 0.1, 0.2]
    modes = collections.Counter(out["input_ids"][:, 0].tolist())  # the last batch's mode tokens
    assert modes[MODE_IDS["[S2S]"]] / 1000 == pytest.approx(0.2, abs=0.05)


def test_same_seed_same_corruption_and_other_seed_differs():
    batch = rows(n_rows=8, length=50, prompt=3)
    a, b, c = (m.corrupt_batch(copy.deepcopy(batch), ctx) for m, ctx in (make(seed=1), make(seed=1), make(seed=2)))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["input_ids"].shape != c["input_ids"].shape or not torch.equal(a["input_ids"], c["input_ids"])


def test_short_or_unlabelled_rows_stay_plain_and_packing_is_refused():
    method, ctx = make({"s_share": 0.0})
    batch = rows(n_rows=2, length=6, prompt=5)  # a one-token chunk: no room for R/X
    batch["labels"][1] = -100
    out = method.corrupt_batch(copy.deepcopy(batch), ctx)
    assert torch.equal(out["input_ids"], batch["input_ids"]) and torch.equal(out["labels"], batch["labels"])
    with pytest.raises(SpecError, match="cannot split packed rows"):
        build_spec({"methods": ["ul2"], "data": {"packing": True}})  # check() runs at validation, before Ray


def test_mode_prompt_matches_the_training_layout(tiny_tokenizer):
    prompt = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                                add_generation_prompt=True, tokenize=False)
    enc = lambda s: tiny_tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    assert enc(mode_prompt(prompt, "S")) == enc(MODE_TOKENS["S"]) + enc(prompt)
    with pytest.raises(ValueError, match="mode"):
        mode_prompt(prompt, "Q")
    # real tokenizer: markers are plain text, so the row decodes to a readable UL2 example
    method, ctx = make({"s_share": 0.0, "x_share": 0.0}, tokenizer=tiny_tokenizer)
    ids = torch.tensor([enc("Sam has 23 eggs and sells 4 cartons of 7 eggs.")])
    out = method.corrupt_batch({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}, ctx)
    text = tiny_tokenizer.decode(out["input_ids"][0])
    assert text.startswith("[NLU]") and "[0]" in text and text.endswith(tiny_tokenizer.eos_token)


def test_prefix_lm_mask_makes_inputs_bidirectional_but_never_sees_targets():
    model = tiny_llama(vocab=2000).eval()
    batch = rows(n_rows=1, length=20, prompt=4)
    for prefix_lm in (False, True):
        method, ctx = make({"r_share": 0.0, "x_share": 0.0, "prefix_lm": prefix_lm}, seed=3)
        method.prepare_model(model, ctx)
        out = method.corrupt_batch(copy.deepcopy(batch), ctx)
        start = int((out["labels"][0] != -100).nonzero()[0])
        logits = lambda ids: model(input_ids=ids, attention_mask=out["attention_mask"]).logits[0]  # noqa: E731
        base = logits(out["input_ids"])
        late_input, target = out["input_ids"].clone(), out["input_ids"].clone()
        late_input[0, start - 1] = 7
        target[0, start + 1] = 7
        saw_later_input = not torch.allclose(logits(late_input)[1], base[1])
        assert saw_later_input == prefix_lm
        assert torch.allclose(logits(target)[: start + 1], base[: start + 1])  # targets stay causal


@pytest.mark.parametrize("shares", [(1, 0, 0), (0, 1, 0), (0, 0, 1)])
def test_training_loss_falls_for_each_mode(shares):
    r, x, s = shares
    spec = build_spec({"methods": [{"name": "ul2", "r_share": r, "x_share": x, "s_share": s}],
                       "train": {"lr": 1e-2, "warmup_ratio": 0}})
    method = build_methods(spec.methods)[0]
    ctx = Context(spec=spec, tokenizer=StubTok(), max_steps=8)
    model = tiny_llama(vocab=2000, layers=2)
    opt = build_optimizer([p for p in model.parameters()], spec.train)
    sched = build_scheduler(opt, spec.train, 8)
    losses = []
    for step in range(8):
        ctx.step = step
        ctx.generator.manual_seed(step)
        losses.append(train_step(model, [rows(n_rows=4, length=16, prompt=2, vocab=40)], [method], opt, sched, ctx, None)["loss"])
    assert sum(losses[-2:]) / 2 < 0.9 * sum(losses[:2]) / 2  # from ~ln(vocab)
