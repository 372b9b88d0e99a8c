"""Scenes of coloured shapes with questions whose answers can be checked (the `bundled:shapes_vqa` set).

Each 96×96 scene places 1-4 shapes (circle, square, triangle; red, green, blue, yellow) in distinct
cells of a 3×3 grid, on a lightly noisy background. Questions ask for a count ("How many shapes are
there?", "How many red shapes are there?"), a colour ("What colour is the circle?", asked only when that
shape is unique in the scene) or a position ("Where is the blue square?" → "top left"), so an answer is
one short string compared by exact match. Each row keeps the scene (`objects`: kind, colour, cell,
box) so occlusion and masked-content tasks can name what a box hides.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

SIZE, GRID = 96, 3
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
KINDS = ("circle", "square", "triangle")
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")


def position(cell: int) -> str:
    """The words for a grid cell: 'top left', …, 'center' for the middle cell."""
    r, c = divmod(cell, GRID)
    return "center" if (r, c) == (1, 1) else f"{ROWS[r]} {COLS[c]}"


def random_scene(rng: random.Random) -> list[dict]:
    """1-4 objects {kind, colour, cell, box} in distinct cells, each shape with a random size and offset."""
    cells = rng.sample(range(GRID * GRID), rng.randint(1, 4))
    step = SIZE // GRID
    objects = []
    for cell in sorted(cells):
        r, c = divmod(cell, GRID)
        half = rng.randint(9, 13)
        cx, cy = c * step + step // 2 + rng.randint(-2, 2), r * step + step // 2 + rng.randint(-2, 2)
        objects.append({"kind": rng.choice(KINDS), "colour": rng.choice(list(COLOURS)), "cell": cell,
                        "box": [cx - half, cy - half, cx + half, cy + half]})
    return objects


def draw(objects: list[dict], rng: random.Random) -> Image.Image:
    """The scene as an RGB image on a light, slightly noisy background."""
    img = Image.new("RGB", (SIZE, SIZE), tuple(rng.randint(225, 255) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for o in objects:
        x0, y0, x1, y1 = o["box"]
        fill = tuple(max(0, min(255, v + rng.randint(-15, 15))) for v in COLOURS[o["colour"]])
        if o["kind"] == "circle":
            d.ellipse(o["box"], fill=fill)
        elif o["kind"] == "square":
            d.rectangle(o["box"], fill=fill)
        else:
            d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    px = img.load()
    for _ in range(SIZE * SIZE // 40):  # sensor-like speckle
        x, y = rng.randrange(SIZE), rng.randrange(SIZE)
        px[x, y] = tuple(max(0, min(255, v + rng.randint(-40, 40))) for v in px[x, y])
    return img


def question(objects: list[dict], rng: random.Random) -> tuple[str, str, str]:
    """(question type, question, answer) about the scene: count, colour_count, colour or position."""
    kinds = [o["kind"] for o in objects]
    unique = [o for o in objects if kinds.count(o["kind"]) == 1]
    pairs = [(o["colour"], o["kind"]) for o in objects]
    located = [o for o in objects if pairs.count((o["colour"], o["kind"])) == 1]
    options = ["count", "colour_count"] + (["colour"] if unique else []) + (["position"] if located else [])
    kind = rng.choice(options)
    if kind == "count":
        return kind, "How many shapes are there?", str(len(objects))
    if kind == "colour_count":
        colour = rng.choice(list(COLOURS))
        return kind, f"How many {colour} shapes are there?", str(sum(o["colour"] == colour for o in objects))
    if kind == "colour":
        o = rng.choice(unique)
        return kind, f"What colour is the {o['kind']}?", o["colour"]
    o = rng.choice(located)
    return kind, f"Where is the {o['colour']} {o['kind']}?", position(o["cell"])


def generate(seed: int, n_train: int, n_test: int) -> tuple[list[tuple[Image.Image, dict]], list[tuple[Image.Image, dict]]]:
    """(train, test) lists of (image, row fields): messages, answer, question_type, objects."""
    rng = random.Random(seed)
    splits: list[list] = [[], []]
    for split, n in ((0, n_train), (1, n_test)):
        for _ in range(n):
            objects = random_scene(rng)
            img = draw(objects, rng)
            qtype, q, a = question(objects, rng)
            row = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
                                {"role": "assistant", "content": [{"type": "text", "text": a}]}],
                   "answer": a, "question_type": qtype, "objects": objects}
            splits[split].append((img, row))
    return splits[0], splits[1]
