"""A small dense-retrieval set built from the factual-QA tables: a corpus, queries and hard negatives.

Every fact (a capital, an element's symbol or atomic number, a planet's position, a unit conversion,
a weekday or month offset) is stated by exactly one passage, its positive; both directions of a fact
("capital of France?", "Paris is the capital of which country?") share that passage. The rest of
the corpus is templated distractors that name an entity without stating any asked fact ("The capital
of France is a busy place ...", "Convert 7 meters to centimeters carefully ..."), so the nearest
negatives are hard: same entity with another attribute, same attribute of another entity, or the
same words without the answer. Weekday offsets stop at 3 and month offsets at 5 so that no passage
answers a question by wrap-around (4 days after Thursday is also Monday).

Facts, not questions, are split between train and test, as in factual_qa.py. Each row's 7 negatives
are chosen lexically and structurally (up to 3 of the same entity, up to 3 of the same attribute,
the rest by IDF-weighted word overlap); teacher scores for the train rows come from teacher.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

from ftray.data.bundled.factual_qa import CAPITALS, DAYS, ELEMENTS, MONTHS, ORDINALS, PLANETS, UNITS

N_NEGATIVES = 7
_WORD = re.compile(r"[a-z0-9]+")
_STOP = {"a", "an", "the", "of", "is", "are", "in", "to", "which", "what", "how", "many", "does", "do",
         "it", "its", "as", "on", "for", "and", "be", "will", "was", "with", "from", "by", "this", "that"}

FILLER = ["This is a common quiz question.", "Teachers often mention it in class.", "Many people learn this at school.",
          "Reference books list it as well.", "It comes up in trivia games.", "Students are often asked about it."]

PLANET_FACTS = [  # (planet, passage, questions); "how many planets" is left out: "the eighth planet" would half-answer it
    ("Jupiter", "Jupiter is the largest planet in the solar system.",
     ["Which planet is the largest in the solar system?", "What is the biggest planet?", "Name the largest planet orbiting the Sun."]),
    ("Mercury", "Mercury is the smallest planet in the solar system.",
     ["Which planet is the smallest in the solar system?", "What is the tiniest planet?", "Name the smallest planet orbiting the Sun."]),
    ("Mars", "Mars is known as the Red Planet because of its rusty soil.",
     ["Which planet is known as the Red Planet?", "What planet is called the Red Planet?", "Which planet has the nickname Red Planet?"]),
    ("Saturn", "Saturn is famous for its bright rings of ice and rock.",
     ["Which planet is famous for its bright rings?", "What planet is best known for its rings?", "Name the planet famous for its rings."]),
    ("Venus", "Venus is the hottest planet in the solar system.",
     ["Which planet is the hottest in the solar system?", "What is the hottest planet?", "Name the planet with the highest surface temperature."]),
    ("Earth", "Earth is the planet we live on.",
     ["Which planet do we live on?", "What planet is home to people?", "Name the planet humans live on."]),
]

# distractor templates per entity kind: they name the entity (and often the attribute) but state no asked fact
DISTRACTORS = {
    "country": ["{C} attracts many visitors each summer, and its markets sell local crafts.",
                "The capital of {c} is a busy place with museums, parks and crowded trains.",
                "Travellers to {c} often ask which city to visit first.",
                "Maps of {c} show its rivers, mountains and major roads.",
                "Many people confuse the capital of {c} with its largest city.",
                "The government of {c} meets in its capital city.",
                "Students learning about {c} study its history, language and capital.",
                "{y} is a large city with old streets, busy cafes and a lively night market.",
                "{y} hosts festivals, concerts and sporting events throughout the year.",
                "Visitors to {y} often take the train from the airport.",
                "Schools in {c} teach children the names of every region.",
                "A guidebook to {c} lists hotels, beaches and the capital's best restaurants.",
                "Rents in {y} have risen quickly over the last ten years."],
    "element": ["{N} is listed on the periodic table with its symbol and atomic number.",
                "Chemists handle {n} samples carefully in the laboratory.",
                "The symbol for {n} appears on every periodic table poster.",
                "An atom of {n} has a nucleus surrounded by electrons.",
                "Questions about {n} often come up in chemistry exams.",
                "The symbol {s} is printed in large letters on the classroom chart.",
                "Element number {z} sits in its own box on the periodic table.",
                "The atomic number of {n} is printed above its symbol on the chart.",
                "Factories use {n} in a surprising number of everyday products.",
                "A sample of {n} was shown to the class during the chemistry lesson.",
                "Some students write the symbol {s} in their notes next to a drawing."],
    "planet": ["{p} can sometimes be seen in the night sky with a small telescope.",
               "Space probes have sent back pictures of {p}.",
               "Astronomers study the atmosphere of {p}.",
               "The {o} planet from the Sun has been visited by several space missions.",
               "Counting planets from the Sun is a common exercise, and {p} is a favourite example.",
               "{p} orbits the Sun along with the other planets."],
    "unit": ["Engineers often convert {big} to {small} when they draw plans.",
             "Convert {n} {big_n} to {small} carefully before you start.",
             "A table of {big} and {small} is printed at the back of the workbook.",
             "Both {big} and {small} are units people use every day.",
             "The recipe asked for {n} {big_n}, which confused the new cook.",
             "How many {small} fit in {n} {big_n} is a question on the worksheet.",
             "The label says {n} {big_n}, but the scale reads in {small}.",
             "She wrote down {n} {big_n} and then forgot to change it into {small}."],
    "calendar": ["Many people plan a trip {k} {unit} after {start}.",
                 "The meeting was moved to {k} {unit} after {start}.",
                 "{start} is a busy time for many families.",
                 "The deadline falls {k} {unit} before {end}, according to the notice.",
                 "{end} is often a quiet time in the office.",
                 "The calendar on the wall shows {start} and {end} in bold.",
                 "The shop reopens {k} {unit} after {end}, the sign says.",
                 "A parcel sent on {start} usually arrives within {k} {unit}."],
}


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _fact(kind: str, entities: set[str], text: str, queries: list[str], slots: dict) -> dict:
    return {"kind": kind, "entities": entities, "text": text, "queries": queries, "slots": slots}


def facts(rng: random.Random) -> list[dict]:
    """Every fact as {kind, entities, text (its one passage), queries (its phrasings), slots (for distractors)}."""
    out = []
    for c, y in CAPITALS.items():
        text = rng.choice([f"{y} is the capital of {c}.", f"The capital of {c} is {y}.", f"{_cap(c)}'s capital city is {y}."])
        out.append(_fact("capital", {c, y}, text, [
            f"What is the capital of {c}?", f"Which city is the capital of {c}?", f"Name the capital city of {c}.",
            f"Which country has {y} as its capital?", f"{y} is the capital of which country?",
            f"Of which country is {y} the capital?"], {"c": c, "C": _cap(c), "y": y}))
    for name, sym, num in ELEMENTS:
        slots = {"n": name, "N": _cap(name), "s": sym, "z": num}
        text = rng.choice([f"The chemical symbol for {name} is {sym}.", f"{_cap(name)} is written with the chemical symbol {sym}."])
        out.append(_fact("symbol", {name, sym}, text, [
            f"What is the chemical symbol for {name}?", f"Which symbol stands for {name} on the periodic table?",
            f"How is {name} abbreviated in chemistry?", f"Which element has the chemical symbol {sym}?",
            f"The symbol {sym} stands for which element?", f"What element is written as {sym}?"], slots))
        text = rng.choice([f"{_cap(name)} has the atomic number {num}.", f"The atomic number of {name} is {num}."])
        out.append(_fact("atomic_number", {name, str(num)}, text, [
            f"What is the atomic number of {name}?", f"How many protons are in an atom of {name}?",
            f"{_cap(name)} has which atomic number?", f"Which element has atomic number {num}?",
            f"Element number {num} on the periodic table is which element?", f"Which element has {num} protons?"], slots))
    for i, p in enumerate(PLANETS):
        o = ORDINALS[i]
        out.append(_fact("planet_order", {p}, f"{p} is the {o} planet from the Sun.", [
            f"Which planet is the {o} from the Sun?", f"Counting from the Sun, which planet comes {o}?",
            f"What is the {o} planet from the Sun?", f"Counting from the Sun, what is the position of {p}?",
            f"Where does {p} sit in the order of planets from the Sun?"], {"p": p, "o": o}))
    for p, text, questions in PLANET_FACTS:
        out.append(_fact("planet_fact", {p}, text, questions, {"p": p, "o": ORDINALS[PLANETS.index(p)]}))
    for big, small, factor, top in UNITS:
        for n in range(1, top + 1):
            big_n = big if big == "dozen" or n > 1 else big[:-1]
            m, verb = n * factor, "equals" if n == 1 else "equal"
            out.append(_fact("units", {f"{big}/{small}"}, f"{n} {big_n} {verb} {m} {small}.", [
                f"How many {small} are in {n} {big_n}?", f"Convert {n} {big_n} to {small}.", f"{n} {big_n} is how many {small}?",
                f"How many {big} are in {m} {small}?", f"Convert {m} {small} to {big}.", f"{m} {small} make how many {big}?"],
                {"big": big, "small": small, "n": n, "big_n": big_n}))
    for names, unit, kind, top in ((DAYS, "day", "weekdays", 3), (MONTHS, "month", "months", 5)):
        what = "day" if unit == "day" else "month"
        for i, start in enumerate(names):
            for k in range(1, top + 1):
                end, units = names[(i + k) % len(names)], unit + ("s" if k > 1 else "")
                out.append(_fact(kind, {start, end}, f"{k} {units} after {start} comes {end}.", [
                    f"What {what} comes {k} {units} after {start}?", f"If it is {start} now, what {what} will it be in {k} {units}?",
                    f"Which {what} is {k} {units} after {start}?", f"What {what} comes {k} {units} before {end}?",
                    f"If it is {end} now, what {what} was it {k} {units} ago?"],
                    {"start": start, "end": end, "k": k, "unit": units}))
    return out


def _distractor_kind(fact: dict) -> str:
    return {"capital": "country", "symbol": "element", "atomic_number": "element", "planet_order": "planet",
            "planet_fact": "planet", "units": "unit", "weekdays": "calendar", "months": "calendar"}[fact["kind"]]


def _with_filler(rng: random.Random, text: str) -> str:
    # half the passages of every kind get a filler sentence, so length does not give the positive away
    return f"{text} {rng.choice(FILLER)}" if rng.random() < 0.5 else text


def build_corpus(rng: random.Random, all_facts: list[dict], n_corpus: int) -> list[dict]:
    """Passages {text, kind, entities, fact}: one per fact (fact = its index), then distractors up to n_corpus."""
    seen = {f["text"] for f in all_facts}  # without filler: no two passages differ only by their filler
    if len(seen) != len(all_facts):
        raise AssertionError("two facts share a passage text")  # would give a query two positives
    passages = [{"text": _with_filler(rng, f["text"]), "kind": f["kind"], "entities": f["entities"], "fact": i}
                for i, f in enumerate(all_facts)]
    tries = 0
    while len(passages) < n_corpus:
        tries += 1
        if tries > 50 * n_corpus:
            raise ValueError(f"cannot make {n_corpus} distinct passages from the templates; ask for fewer")
        f = rng.choice(all_facts)
        text = _cap(rng.choice(DISTRACTORS[_distractor_kind(f)]).format(**f["slots"]))
        if text not in seen:
            seen.add(text)
            passages.append({"text": _with_filler(rng, text), "kind": "distractor", "entities": f["entities"], "fact": None})
    return passages


def _words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


class _Index:
    """IDF-weighted word overlap between a query and every passage (an inverted index, no dependencies)."""

    def __init__(self, passages: list[dict]) -> None:
        self.postings: dict[str, list[int]] = defaultdict(list)
        for j, p in enumerate(passages):
            for w in set(_words(p["text"])):
                self.postings[w].append(j)
        self.idf = {w: math.log(len(passages) / len(js)) for w, js in self.postings.items()}

    def scores(self, query: str) -> Counter:
        out: Counter = Counter()
        for w in set(_words(query)):
            for j in self.postings.get(w, ()):
                out[j] += self.idf[w]
        return out


def hard_negatives(rng: random.Random, pos: int, query: str, passages: list[dict], index: _Index,
                   by_entity: dict, by_kind: dict) -> list[int]:
    """7 passage indices other than `pos`: up to 3 of the same entity, up to 3 of the same attribute, then by word overlap."""
    lexical = index.scores(query)
    salt = rng.getrandbits(32)  # ties (e.g. "2 weeks equal 14 days" vs "3 weeks ...") broken at random, not by position

    def rank(js) -> list[int]:
        return sorted((j for j in js if j != pos), key=lambda j: (-round(lexical.get(j, 0.0), 9), (j * 2654435761 ^ salt) % 2**32))

    same_entity = {j for e in passages[pos]["entities"] for j in by_entity[e]}
    chosen: list[int] = []
    for pool, cap in ((same_entity, 3), (set(by_kind[passages[pos]["kind"]]) - same_entity, 3)):
        chosen += [j for j in rank(pool) if j not in chosen][:cap]
    chosen += [j for j in rank(lexical) if j not in chosen][: N_NEGATIVES - len(chosen)]
    if len(chosen) < N_NEGATIVES:  # a query sharing no word with the corpus: any passages will do
        chosen += [j for j in range(len(passages)) if j != pos and j not in chosen][: N_NEGATIVES - len(chosen)]
    return chosen


PHRASINGS = {"capital": 5, "symbol": 4, "atomic_number": 4, "planet_order": 4, "planet_fact": 3, "units": 3,
             "weekdays": 5, "months": 5}  # questions kept per fact, so that no category swamps the rest


def generate(seed: int = 0, n_train: int = 1500, n_test: int = 300, n_corpus: int = 3000
             ) -> tuple[list[dict], list[dict], list[dict]]:
    """(train rows, test rows, corpus rows); facts (hence queries) are disjoint between train and test."""
    rng = random.Random(seed)
    all_facts = facts(rng)
    passages = build_corpus(rng, all_facts, n_corpus)
    order = list(range(len(passages)))
    rng.shuffle(order)  # pids in shuffled order: a passage's id says nothing about whether it is a positive
    pid = {j: f"p{k:04d}" for k, j in enumerate(order)}
    by_entity: dict[str, list[int]] = defaultdict(list)
    by_kind: dict[str, list[int]] = defaultdict(list)
    for j, p in enumerate(passages):
        for e in p["entities"]:
            by_entity[e].append(j)
        by_kind[p["kind"]].append(j)
    index = _Index(passages)

    groups = list(range(len(all_facts)))
    rng.shuffle(groups)
    splits: dict[str, list[dict]] = {"test": [], "train": []}
    for fi in groups:
        f = all_facts[fi]
        queries = rng.sample(f["queries"], min(PHRASINGS[f["kind"]], len(f["queries"])))
        split = next((s for s, n in (("test", n_test), ("train", n_train)) if len(splits[s]) < n), None)
        if split is None:
            break
        queries = queries[: (n_test if split == "test" else n_train) - len(splits[split])]  # exact sizes
        pos = fi  # build_corpus puts fact i's passage at index i
        for q in queries:
            negs = hard_negatives(rng, pos, q, passages, index, by_entity, by_kind)
            splits[split].append({"query": q, "positive": passages[pos]["text"], "positive_id": pid[pos],
                                  "negatives": [passages[j]["text"] for j in negs], "negative_ids": [pid[j] for j in negs]})
    for split, rows in splits.items():
        for k, row in enumerate(rows):
            row["qid"] = f"{split}-{k:04d}"
            rows[k] = {"qid": row.pop("qid"), **row}
    corpus = sorted(({"pid": pid[j], "text": p["text"]} for j, p in enumerate(passages)), key=lambda r: r["pid"])
    return splits["train"], splits["test"], corpus


def candidates(row: dict) -> list[str]:
    """A row's candidate list as the teacher scores it: [positive, *negatives]."""
    return [row["positive"], *row["negatives"]]


def fingerprint(row: dict) -> str:
    """A short hash of a row's query and candidates: a cached teacher score is only reused for the same list."""
    return hashlib.sha1(json.dumps([row["query"], *candidates(row)]).encode()).hexdigest()[:12]


def with_teacher_scores(train: list[dict], teacher_file: Path) -> list[dict]:
    """Train rows with `teacher_scores` from the cached teacher file; unchanged rows when there is no file yet.

    A file that does not cover every row, or was computed for other candidates, is stale: rerun the teacher.
    """
    if not teacher_file.exists():
        return train
    with open(teacher_file, encoding="utf-8") as f:
        cached = {r["qid"]: r for r in map(json.loads, f)}
    stale = [r["qid"] for r in train if r["qid"] not in cached or cached[r["qid"]]["fingerprint"] != fingerprint(r)]
    if stale:
        raise ValueError(f"{teacher_file.name} is stale for {len(stale)} train rows (first {stale[0]}): the generator "
                         "changed; rerun `python -m ftray.data.bundled.teacher` (or delete the file to build without scores)")
    return [{**r, "teacher_scores": cached[r["qid"]]["teacher_scores"]} for r in train]
