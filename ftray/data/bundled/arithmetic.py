"""Multi-step arithmetic word problems with a step-by-step rationale (the bundled chain-of-thought task).

Every problem has 2 or 3 steps (+, -, *, or "g groups of s" added/removed) on numbers <= 100 with
non-negative results; the rationale always has the same shape, one sentence per step ending in an
equation ("He buys 5 more: 12 + 5 = 17."), so a 135M model can learn it in a few hundred steps.
"""

from __future__ import annotations

import random

# (name, subject pronoun, object pronoun, possessive)
NAMES = [
    ("Tom", "he", "him", "his"), ("Anna", "she", "her", "her"), ("Liam", "he", "him", "his"),
    ("Maya", "she", "her", "her"), ("Omar", "he", "him", "his"), ("Sofia", "she", "her", "her"),
    ("Ben", "he", "him", "his"), ("Chloe", "she", "her", "her"), ("Ravi", "he", "him", "his"),
    ("Emma", "she", "her", "her"), ("Lucas", "he", "him", "his"), ("Nora", "she", "her", "her"),
    ("Diego", "he", "him", "his"), ("Aisha", "she", "her", "her"), ("Kenji", "he", "him", "his"),
    ("Lily", "she", "her", "her"), ("Sam", "he", "him", "his"), ("Grace", "she", "her", "her"),
    ("Noah", "he", "him", "his"), ("Zara", "she", "her", "her"),
]

# A scene is one story: how the quantity starts (question and rationale wording), phrases that add,
# remove, add/remove "g groups of s", or multiply it, and the final question. Placeholders: {N} name,
# {p}/{obj}/{pos} pronouns, {o} object, {a} start, {k} amount, {g} groups, {s} group size,
# {times} doubles/triples. An empty list means the scene has no such step.
SCENES = [
    dict(objs=["apples", "oranges", "pears", "plums", "peaches"],
         start="{N} has {a} {o}.", start_r="{N} starts with {a} {o}.",
         add=["{p} buys {k} more", "{p} picks {k} more from the garden"],
         sub=["{p} gives {k} to a neighbor", "{p} eats {k}", "{p} uses {k} to bake a pie"],
         gadd=["{p} buys {g} bags with {s} {o} in each"],
         gsub=["{p} gives {s} {o} to each of {g} friends"],
         mul=[], ask="How many {o} does {N} have now?"),
    dict(objs=["marbles"], start="{N} has {a} marbles.", start_r="{N} starts with {a} marbles.",
         add=["{p} wins {k} more in a game"], sub=["{p} loses {k}", "{p} gives {k} to {pos} cousin"],
         gadd=["{p} wins {g} rounds and gets {s} marbles for each round"],
         gsub=["{p} gives {s} marbles to each of {g} cousins"],
         mul=["a lucky trade {times} {pos} marbles"], ask="How many marbles does {N} have now?"),
    dict(objs=["stickers"], start="{N} collects stickers and has {a}.", start_r="{N} starts with {a} stickers.",
         add=["{p} gets {k} more from a friend"], sub=["{p} gives {k} to {pos} sister"],
         gadd=["{p} buys {g} sheets with {s} stickers on each"],
         gsub=["{p} gives {s} stickers to each of {g} classmates"],
         mul=["a swap day {times} {pos} collection"], ask="How many stickers does {N} have now?"),
    dict(objs=["books"], start="A library shelf holds {a} books.", start_r="The shelf starts with {a} books.",
         add=["the librarian adds {k} new books"], sub=["readers borrow {k}"],
         gadd=["{g} boxes of {s} books each arrive"], gsub=["{g} classes each borrow {s} books"],
         mul=[], ask="How many books are on the shelf now?"),
    dict(objs=["cookies", "muffins", "cupcakes"], start="{N} bakes {a} {o}.", start_r="{N} starts with {a} {o}.",
         add=["{p} bakes {k} more"], sub=["{p} sells {k}", "{p} eats {k}"],
         gadd=["{p} bakes {g} trays with {s} {o} on each"],
         gsub=["{p} packs {g} boxes with {s} {o} in each for a party"],
         mul=[], ask="How many {o} does {N} have now?"),
    dict(objs=["passengers"], start="A bus has {a} passengers.", start_r="The bus starts with {a} passengers.",
         add=["{k} people get on at the next stop"], sub=["{k} people get off"],
         gadd=["{g} groups of {s} tourists get on"], gsub=["{g} families of {s} get off"],
         mul=[], ask="How many passengers are on the bus now?"),
    dict(objs=["dollars"], start="{N} has {a} dollars in {pos} piggy bank.", start_r="{N} starts with {a} dollars.",
         add=["{p} earns {k} dollars mowing lawns", "{p} gets {k} dollars as a gift"],
         sub=["{p} spends {k} dollars on a book"],
         gadd=["{p} saves {s} dollars a week for {g} weeks"],
         gsub=["{p} buys {g} tickets that cost {s} dollars each"],
         mul=[], ask="How many dollars does {N} have now?"),
    dict(objs=["eggs"], start="A farmer named {N} has {a} eggs.", start_r="{N} starts with {a} eggs.",
         add=["{p} collects {k} more from the henhouse"], sub=["{p} uses {k} to make breakfast", "{k} eggs break"],
         gadd=["{g} hens each lay {s} eggs"], gsub=["{p} sells {g} cartons of {s} eggs"],
         mul=[], ask="How many eggs does {N} have now?"),
    dict(objs=["flowers"], start="{N} has {a} flowers in {pos} garden.", start_r="The garden starts with {a} flowers.",
         add=["{p} plants {k} more"], sub=["{p} picks {k} for a bouquet"],
         gadd=["{p} plants {g} rows of {s} flowers"], gsub=["{p} gives away {g} bouquets of {s} flowers"],
         mul=["the number of flowers {times} in spring"], ask="How many flowers are in the garden now?"),
    dict(objs=["toy cars"], start="{N} owns {a} toy cars.", start_r="{N} starts with {a} toy cars.",
         add=["{p} gets {k} more for {pos} birthday"],
         sub=["{p} gives {k} to {pos} brother", "{p} loses {k} at the park"],
         gadd=["{p} buys {g} sets of {s} cars"], gsub=["{p} donates {g} boxes of {s} cars"],
         mul=["a toy fair {times} {pos} collection"], ask="How many toy cars does {N} have now?"),
    dict(objs=["pages"], start="{N} reads {a} pages of a book on Monday.", start_r="{N} starts with {a} pages.",
         add=["on Tuesday {p} reads {k} more pages", "{p} reads {k} more pages before bed"], sub=[],
         gadd=["{p} reads {s} pages a day for {g} days"], gsub=[],
         mul=["a long weekend {times} {pos} total"], ask="How many pages has {N} read in total?"),
    dict(objs=["shells"], start="{N} finds {a} shells on the beach.", start_r="{N} starts with {a} shells.",
         add=["{p} finds {k} more"], sub=["{p} drops {k} on the way home"],
         gadd=["{g} friends each give {obj} {s} shells"], gsub=["{p} puts {s} shells into each of {g} jars as gifts"],
         mul=[], ask="How many shells does {N} have now?"),
    dict(objs=["cars"], start="A parking lot has {a} cars.", start_r="The lot starts with {a} cars.",
         add=["{k} more cars arrive"], sub=["{k} cars leave"],
         gadd=["{g} car carriers each unload {s} cars"], gsub=["{g} rows of {s} cars drive away"],
         mul=[], ask="How many cars are in the lot now?"),
    dict(objs=["pencils", "erasers", "crayons"], start="A teacher named {N} has {a} {o}.",
         start_r="{N} starts with {a} {o}.",
         add=["{p} finds {k} more in a drawer"], sub=["{p} hands out {k}"],
         gadd=["{p} buys {g} packs of {s} {o}"], gsub=["{p} gives {s} {o} to each of {g} students"],
         mul=[], ask="How many {o} does {N} have now?"),
    dict(objs=["boxes"], start="A warehouse holds {a} boxes.", start_r="The warehouse starts with {a} boxes.",
         add=["a truck delivers {k} more"], sub=["workers ship {k}"],
         gadd=["{g} trucks each deliver {s} boxes"], gsub=["{g} stores each order {s} boxes"],
         mul=["the stock {times} before the holidays"], ask="How many boxes are in the warehouse now?"),
    dict(objs=["fish"], start="{N} has {a} fish in a tank.", start_r="{N} starts with {a} fish.",
         add=["{p} adds {k} more"], sub=["{p} moves {k} to a pond"],
         gadd=["{p} buys {g} bags with {s} fish in each"], gsub=["{p} gives {s} fish to each of {g} friends"],
         mul=["the number of fish {times} after the eggs hatch"], ask="How many fish does {N} have now?"),
    dict(objs=["points"], start="{N} scores {a} points in a game.", start_r="{N} starts with {a} points.",
         add=["{p} scores {k} more in the second round"], sub=["{p} loses {k} points for a penalty"],
         gadd=["{p} hits {g} targets worth {s} points each"],
         gsub=["{p} misses {g} shots and loses {s} points for each"],
         mul=["a bonus {times} {pos} score"], ask="How many points does {N} have now?"),
    dict(objs=["candies"], start="{N} has {a} candies.", start_r="{N} starts with {a} candies.",
         add=["{p} gets {k} more at a party"], sub=["{p} eats {k}"],
         gadd=["{p} gets {g} bags with {s} candies in each"], gsub=["{p} shares {s} candies with each of {g} friends"],
         mul=[], ask="How many candies does {N} have now?"),
]

CONNECTORS = ["", "then ", "after that, ", "later, ", "next, "]
MAX_VALUE = 200  # keeps every intermediate result a small number


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _step(rng: random.Random, scene: dict, x: int, used: set[str]) -> tuple[str, dict, str, int] | None:
    """Pick one applicable operation on the running value x: (phrase, slots, equation, new value)."""
    applicable = {"add": x <= MAX_VALUE - 10, "sub": x >= 4, "gadd": x <= MAX_VALUE - 20, "gsub": x >= 8,
                  "mul": 3 <= x <= 40}
    # a phrase is used at most once per problem, so no story repeats the same sentence
    ops = [op for op, ok in applicable.items() if ok and any(p not in used for p in scene[op])]
    if not ops:
        return None
    op = rng.choice(ops)
    phrase = rng.choice([p for p in scene[op] if p not in used])
    used.add(phrase)
    if op == "add":
        k = rng.randint(2, min(40, MAX_VALUE - x))
        return phrase, {"k": k}, f"{x} + {k} = {x + k}", x + k
    if op == "sub":
        k = rng.randint(1, min(40, x - 1))
        return phrase, {"k": k}, f"{x} - {k} = {x - k}", x - k
    if op == "mul":
        f = rng.choice([2, 3]) if x <= MAX_VALUE // 3 else 2
        return phrase, {"times": "doubles" if f == 2 else "triples"}, f"{x} * {f} = {x * f}", x * f
    g = rng.randint(2, 5)
    if op == "gadd":
        s = rng.randint(2, min(12, (MAX_VALUE - x) // g))
        return phrase, {"g": g, "s": s}, f"{g} * {s} = {g * s}, and {x} + {g * s} = {x + g * s}", x + g * s
    g = rng.randint(2, min(5, x // 2))
    s = rng.randint(2, min(12, x // g))
    return phrase, {"g": g, "s": s}, f"{g} * {s} = {g * s}, and {x} - {g * s} = {x - g * s}", x - g * s


def make_problem(rng: random.Random) -> dict:
    """One problem: {'question', 'rationale', 'answer'} with 2 or 3 steps."""
    scene = rng.choice(SCENES)
    name, p, obj, pos = rng.choice(NAMES)
    slots = {"N": name, "p": p, "obj": obj, "pos": pos, "o": rng.choice(scene["objs"]), "a": rng.randint(5, 60)}
    x = slots["a"]
    question = [scene["start"].format(**slots)]
    rationale = [scene["start_r"].format(**slots)]
    used: set[str] = set()
    for i in range(rng.choice([2, 3])):
        step = _step(rng, scene, x, used)
        if step is None:
            break
        phrase, extra, equation, x = step
        text = phrase.format(**slots, **extra)
        connector = "" if i == 0 else rng.choice(CONNECTORS)
        question.append(_cap(connector + text) + ".")
        rationale.append(f"{_cap(text)}: {equation}.")
    question.append(scene["ask"].format(**slots))
    return {"question": " ".join(question), "rationale": " ".join(rationale), "answer": str(x)}


def generate(seed: int = 0, n_train: int = 2000, n_test: int = 200) -> tuple[list[dict], list[dict]]:
    """Train and test problems, disjoint by question text."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < n_train + n_test:
        row = make_problem(rng)
        if row["rationale"].count(": ") < 2 or row["question"] in seen:  # keep 2-3 step problems only
            continue
        seen.add(row["question"])
        rows.append(row)
    return rows[n_test:], rows[:n_test]
