"""Rendered maths expressions with handwriting-like noise → their LaTeX (the `bundled:math_images` set).

A seeded generator draws a small expression tree (sums of atoms, powers, subscripts, fractions, square
roots, brackets), lays it out with PIL (fractions stacked, scripts raised or lowered at 60% size) and
adds the noise of handwritten-maths recognition data: per-glyph size and baseline jitter, random stroke
width, a slant (shear) and blur/speckle. The target is the space-tokenised LaTeX that CROHME-style
metrics (ExpRate) compare, e.g. `\\frac { x + 2 } { 3 }`; each row also keeps the tree (`tree`, a
prefix serialisation for tree-aware targets) and per-symbol counts (`symbols`, rows of {symbol, count}), which Uni-MuMER's
Tree-CoT and symbol-counting tasks are built from.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFilter, ImageFont

PROMPT = "Write the LaTeX of the expression in the image."
DIGITS, VARIABLES, OPERATORS = "0123456789", "xyabn", "+-="
BASE_SIZE = 28  # glyph size in pixels of top-level symbols


@dataclass
class Node:
    """An expression tree node: kind in sym | seq | sup | sub | frac | sqrt | paren."""

    kind: str
    text: str = ""
    children: list[Node] = field(default_factory=list)


def latex(n: Node) -> str:
    """Space-tokenised LaTeX of a tree (`\\frac { a } { b }`, `x ^ { 2 }`)."""
    c = [latex(k) for k in n.children]
    return {
        "sym": lambda: n.text,
        "seq": lambda: " ".join(c),
        "sup": lambda: f"{c[0]} ^ {{ {c[1]} }}",
        "sub": lambda: f"{c[0]} _ {{ {c[1]} }}",
        "frac": lambda: f"\\frac {{ {c[0]} }} {{ {c[1]} }}",
        "sqrt": lambda: f"\\sqrt {{ {c[0]} }}",
        "paren": lambda: f"( {c[0]} )",
    }[n.kind]()


def tree(n: Node) -> str:
    """Prefix serialisation of a tree: `(frac (seq x + 2) 3)`; a one-child seq is its child."""
    if n.kind == "sym":
        return n.text
    if n.kind == "seq" and len(n.children) == 1:
        return tree(n.children[0])
    return f"({n.kind} {' '.join(tree(k) for k in n.children)})"


def symbols(n: Node) -> dict[str, int]:
    """How often each leaf symbol occurs (structure tokens such as \\frac not counted)."""
    if n.kind == "sym":
        return {n.text: 1}
    total: Counter = Counter()
    for k in n.children:
        total.update(symbols(k))
    return dict(sorted(total.items()))


def random_tree(rng: random.Random, depth: int = 0) -> Node:
    """An expression: 1-3 terms joined by + or -, sometimes `= term` at the top level."""
    terms = [_term(rng, depth) for _ in range(rng.randint(1, 3 if depth == 0 else 2))]
    items = [terms[0]]
    for t in terms[1:]:
        items += [Node("sym", rng.choice("+-")), t]
    if depth == 0 and rng.random() < 0.25:
        items += [Node("sym", "="), _term(rng, depth + 1)]
    return Node("seq", children=items)


def _atom(rng: random.Random) -> Node:
    return Node("sym", rng.choice(DIGITS if rng.random() < 0.5 else VARIABLES))


def _term(rng: random.Random, depth: int) -> Node:
    roll = rng.random()
    if depth >= 1 or roll < 0.35:
        return _atom(rng)
    if roll < 0.5:
        return Node("sup", children=[_atom(rng), Node("sym", rng.choice("23n"))])
    if roll < 0.6:
        return Node("sub", children=[Node("sym", rng.choice(VARIABLES)), Node("sym", rng.choice("0123i"))])
    if roll < 0.8:
        return Node("frac", children=[random_tree(rng, depth + 1), random_tree(rng, depth + 1)])
    if roll < 0.9:
        return Node("sqrt", children=[random_tree(rng, depth + 1)])
    return Node("paren", children=[random_tree(rng, depth + 1)])


# Layout: every box is an "L" image with ink 255 on 0 and the y of its baseline.
Box = tuple[Image.Image, int]


def _glyph(text: str, size: int, rng: random.Random) -> Box:
    size = max(8, round(size * rng.uniform(0.88, 1.12)))  # per-glyph size jitter
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(text)
    stroke = rng.choice((0, 0, 1))  # stroke-width noise
    pad = 2 + stroke
    img = Image.new("L", (right - left + 2 * pad, size + 2 * pad), 0)
    ImageDraw.Draw(img).text((pad - left, pad), text, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    baseline = pad + round(size * 0.8) + rng.randint(-1, 1)  # baseline jitter
    return img, baseline


def _hcat(boxes: list[Box], gap: int) -> Box:
    above = max(b for _, b in boxes)
    below = max(img.height - b for img, b in boxes)
    out = Image.new("L", (sum(img.width for img, _ in boxes) + gap * (len(boxes) - 1), above + below), 0)
    x = 0
    for img, b in boxes:
        out.paste(img, (x, above - b))
        x += img.width + gap
    return out, above


def _layout(n: Node, size: int, rng: random.Random) -> Box:
    if n.kind == "sym":
        return _glyph(n.text, size, rng)
    if n.kind == "seq":
        return _hcat([_layout(k, size, rng) for k in n.children], gap=max(1, size // 10))
    if n.kind in ("sup", "sub"):
        (base, bb), (script, sb) = _layout(n.children[0], size, rng), _layout(n.children[1], round(size * 0.6), rng)
        shift = -round(size * 0.45) if n.kind == "sup" else round(size * 0.25)  # raise or lower the script's baseline
        top = min(0, bb + shift - sb)
        height = max(base.height, bb + shift - sb + script.height) - top
        out = Image.new("L", (base.width + script.width + 1, height), 0)
        out.paste(base, (0, -top))
        out.paste(script, (base.width + 1, bb + shift - sb - top))
        return out, bb - top
    if n.kind == "frac":
        (num, _), (den, _) = _layout(n.children[0], round(size * 0.8), rng), _layout(n.children[1], round(size * 0.8), rng)
        width, gap = max(num.width, den.width) + 4, 3
        out = Image.new("L", (width, num.height + den.height + 2 * gap + 2), 0)
        out.paste(num, ((width - num.width) // 2, 0))
        line_y = num.height + gap
        ImageDraw.Draw(out).line([(0, line_y), (width - 1, line_y)], fill=255, width=2)
        out.paste(den, ((width - den.width) // 2, line_y + gap + 2))
        return out, line_y + round(size * 0.3)  # the bar sits at the height of a minus sign
    if n.kind == "sqrt":
        inner, ib = _layout(n.children[0], size, rng)
        hook = max(6, size // 3)
        out = Image.new("L", (inner.width + hook + 3, inner.height + 4), 0)
        out.paste(inner, (hook + 2, 4))
        h = out.height - 1
        ImageDraw.Draw(out).line([(0, h * 0.6), (hook * 0.4, h), (hook, 1), (out.width - 1, 1)], fill=255, width=2)
        return out, ib + 4
    if n.kind == "paren":
        return _hcat([_glyph("(", size, rng), _layout(n.children[0], size, rng), _glyph(")", size, rng)], gap=2)
    raise ValueError(f"unknown node kind {n.kind!r}")


def render(n: Node, rng: random.Random) -> Image.Image:
    """The expression as black ink on white (RGB), slanted, blurred and speckled at random."""
    ink, _ = _layout(n, BASE_SIZE, rng)
    margin = 8
    canvas = Image.new("L", (ink.width + 2 * margin + ink.height // 2, ink.height + 2 * margin), 0)
    canvas.paste(ink, (margin + ink.height // 4, margin))
    slant = rng.uniform(-0.25, 0.25)  # handwriting slant as a horizontal shear
    canvas = canvas.transform(canvas.size, Image.Transform.AFFINE, (1, slant, -slant * canvas.height / 2, 0, 1, 0),
                              resample=Image.Resampling.BILINEAR)
    if rng.random() < 0.3:
        canvas = canvas.filter(ImageFilter.MaxFilter(3))  # a thicker pen
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.8)))
    px = canvas.load()
    for _ in range(canvas.width * canvas.height // 150):  # speckle noise
        px[rng.randrange(canvas.width), rng.randrange(canvas.height)] = rng.choice((0, 255))
    return Image.eval(canvas, lambda v: 255 - v).convert("RGB")


def generate(seed: int, n_train: int, n_test: int) -> tuple[list[tuple[Image.Image, dict]], list[tuple[Image.Image, dict]]]:
    """(train, test) lists of (image, row fields); test expressions never occur in train."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: list[list] = [[], []]
    for split, n in ((0, n_train), (1, n_test)):
        while len(splits[split]) < n:
            t = random_tree(rng)
            target = latex(t)
            if target in seen:
                continue
            seen.add(target)
            row = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
                                {"role": "assistant", "content": [{"type": "text", "text": target}]}],
                   "latex": target, "tree": tree(t),
                   "symbols": [{"symbol": k, "count": v} for k, v in symbols(t).items()]}
            splits[split].append((render(t, rng), row))
    return splits[0], splits[1]
