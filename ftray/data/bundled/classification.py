"""Four-topic text classification (sports, science, business, cooking) from templates and vocabularies.

Sentences mix topic phrases with neutral filler and, one time in five, a word from another topic,
so a bag-of-words lookup of one keyword is not enough; labels are always the sentence's main topic.
"""

from __future__ import annotations

import random

LABELS = ["sports", "science", "business", "cooking"]

TOPICS = {
    "sports": dict(
        subj=["the home team", "the striker", "the coach", "our goalkeeper", "the tennis champion",
              "the relay squad", "the visiting club", "the young sprinter"],
        verb=["won the final", "scored twice in the second half", "lost the match on penalties",
              "trained hard before the tournament", "signed a new contract", "broke the league record",
              "celebrated a late equalizer", "was knocked out in the semifinal"],
        extra=["in front of a packed stadium", "after a tense overtime", "during the championship",
               "despite a knee injury", "against the defending champions", "on a muddy pitch"],
        stray=["trophy", "referee", "season"]),
    "science": dict(
        subj=["researchers", "the lab team", "astronomers", "a biologist", "the physics department",
              "chemists", "a graduate student", "the research institute"],
        verb=["discovered a new species of beetle", "measured the mass of the particles",
              "published a study on cell growth", "observed a distant galaxy", "tested a new vaccine candidate",
              "sequenced the genome of a plant", "reported a faster way to split water",
              "confirmed the theory with new data"],
        extra=["using a powerful telescope", "in a peer-reviewed journal", "after years of experiments",
               "with funding from the university", "under the microscope", "at the national laboratory"],
        stray=["experiment", "hypothesis", "molecule"]),
    "business": dict(
        subj=["the company", "investors", "the startup", "the bank", "shareholders", "the retail chain",
              "the airline", "the board of directors"],
        verb=["reported record quarterly profits", "announced a merger with a rival",
              "cut prices to win customers", "raised new funding", "opened offices abroad",
              "saw its stock price fall", "hired a new chief executive", "missed its revenue target"],
        extra=["amid rising interest rates", "according to analysts", "this fiscal year",
               "after a strong holiday season", "on the stock exchange", "despite weak demand"],
        stray=["profit", "market", "revenue"]),
    "cooking": dict(
        subj=["the chef", "my grandmother", "the bakery", "home cooks", "the restaurant", "a food blogger",
              "the pastry team", "our neighbor"],
        verb=["simmered the tomato sauce for hours", "baked a loaf of sourdough bread",
              "seasoned the soup with fresh basil", "roasted vegetables with olive oil",
              "whisked eggs for a fluffy omelette", "shared a recipe for lemon cake",
              "grilled salmon with garlic butter", "kneaded the dough until smooth"],
        extra=["over low heat", "for a family dinner", "with a pinch of salt", "before serving it warm",
               "in a cast iron pan", "for the weekend market"],
        stray=["recipe", "oven", "flavor"]),
}

FILLER = ["reportedly", "on Tuesday", "last week", "in the city", "once again", "as expected",
          "this morning", "according to locals", "for the first time", "quietly"]


def make_text(rng: random.Random, topic: str) -> str:
    """One sentence about `topic`, with filler and sometimes a stray word from another topic."""
    vocab = TOPICS[topic]
    subj, verb, extra = rng.choice(vocab["subj"]), rng.choice(vocab["verb"]), rng.choice(vocab["extra"])
    if rng.random() < 0.5:
        text = f"{subj} {verb} {extra}"
    else:
        text = f"{extra}, {subj} {verb}"
    if rng.random() < 0.6:
        text = f"{text} {rng.choice(FILLER)}"
    if rng.random() < 0.2:
        other = rng.choice([t for t in LABELS if t != topic])
        text = f"{text}, and people kept talking about the {rng.choice(TOPICS[other]['stray'])}"
    return text[:1].upper() + text[1:] + "."


def generate(seed: int = 0, n_train: int = 1000, n_test: int = 200) -> tuple[list[dict], list[dict]]:
    """Train and test sets, disjoint by text, balanced across labels when the sizes are multiples of 4."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < n_train + n_test:
        label = len(rows) % len(LABELS)  # round-robin: any slice of 4k rows is exactly balanced
        text = make_text(rng, LABELS[label])
        if text in seen:
            continue
        seen.add(text)
        rows.append({"text": text, "label": label, "label_name": LABELS[label]})
    train, test = rows[n_test:], rows[:n_test]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def long_tailed(rows: list[dict], imbalance: float = 100.0, seed: int = 0) -> list[dict]:
    """Subsample `rows` to an exponential class profile: class k keeps n_max·imbalance^(-k/(C-1)) rows.

    n_max is the smallest class's size in `rows`, so class 0 is the head and class C-1 the tail
    (n_max / imbalance rows, at least 1). Row order is kept.
    """
    counts = [sum(r["label"] == k for r in rows) for k in range(len(LABELS))]
    n_max, c = min(counts), len(LABELS)
    keep = [max(1, round(n_max * imbalance ** (-k / (c - 1)))) for k in range(c)]
    taken = [0] * c
    out = []
    for r in random.Random(seed).sample(rows, len(rows)):
        if taken[r["label"]] < keep[r["label"]]:
            taken[r["label"]] += 1
            out.append(r)
    return sorted(out, key=rows.index)


def noisy(rows: list[dict], rate: float, kind: str, seed: int = 0) -> list[dict]:
    """Flip `rate` of the labels (exactly round(rate·n) rows): 'symmetric' to a uniformly drawn other
    class, 'asymmetric' to the next class (k → k+1 mod C, a fixed confusion pair as in CIFAR-10's
    asymmetric noise). Each row keeps its true label as `clean_label`."""
    rng = random.Random(seed)
    flip = set(rng.sample(range(len(rows)), round(rate * len(rows))))
    out = []
    for i, r in enumerate(rows):
        label = r["label"]
        if i in flip:
            others = [k for k in range(len(LABELS)) if k != label]
            label = rng.choice(others) if kind == "symmetric" else (label + 1) % len(LABELS)
        out.append({**r, "label": label, "label_name": LABELS[label], "clean_label": r["label"]})
    return out
