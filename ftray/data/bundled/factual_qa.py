"""Short-answer factual questions from small built-in tables (the bundled knowledge / refusal task).

Facts, not questions, are split between train and test: both phrasings of a fact (e.g. "capital of
France?" and "which country has Paris as its capital?") land in the same split, so test accuracy
measures what the model knew or can compute, not what it memorised from the train file.
"""

from __future__ import annotations

import random

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Russia": "Moscow", "Canada": "Ottawa",
    "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Chile": "Santiago", "Peru": "Lima",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Nigeria": "Abuja", "Ethiopia": "Addis Ababa", "Morocco": "Rabat",
    "Ghana": "Accra", "Australia": "Canberra", "New Zealand": "Wellington", "Greece": "Athens",
    "Turkey": "Ankara", "Poland": "Warsaw", "Austria": "Vienna", "Hungary": "Budapest",
    "the Czech Republic": "Prague", "Sweden": "Stockholm", "Norway": "Oslo", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Ireland": "Dublin", "the Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Switzerland": "Bern", "South Korea": "Seoul", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "the Philippines": "Manila", "Iran": "Tehran", "Iraq": "Baghdad", "Saudi Arabia": "Riyadh",
    "Pakistan": "Islamabad", "Cuba": "Havana", "Ukraine": "Kyiv", "Romania": "Bucharest", "Bulgaria": "Sofia",
    "Iceland": "Reykjavik", "the United Kingdom": "London", "Jamaica": "Kingston", "Venezuela": "Caracas",
    "Uruguay": "Montevideo", "Afghanistan": "Kabul", "Nepal": "Kathmandu", "Malaysia": "Kuala Lumpur",
    "Croatia": "Zagreb", "Serbia": "Belgrade", "Slovakia": "Bratislava", "Slovenia": "Ljubljana",
    "Lithuania": "Vilnius", "Latvia": "Riga", "Estonia": "Tallinn", "Cambodia": "Phnom Penh",
    "Mongolia": "Ulaanbaatar", "Senegal": "Dakar", "Zimbabwe": "Harare", "Angola": "Luanda", "Qatar": "Doha",
    "Jordan": "Amman", "Lebanon": "Beirut",
}

# (name, symbol, atomic number)
ELEMENTS = [
    ("hydrogen", "H", 1), ("helium", "He", 2), ("lithium", "Li", 3), ("beryllium", "Be", 4), ("boron", "B", 5),
    ("carbon", "C", 6), ("nitrogen", "N", 7), ("oxygen", "O", 8), ("fluorine", "F", 9), ("neon", "Ne", 10),
    ("sodium", "Na", 11), ("magnesium", "Mg", 12), ("aluminum", "Al", 13), ("silicon", "Si", 14),
    ("phosphorus", "P", 15), ("sulfur", "S", 16), ("chlorine", "Cl", 17), ("argon", "Ar", 18),
    ("potassium", "K", 19), ("calcium", "Ca", 20), ("titanium", "Ti", 22), ("chromium", "Cr", 24),
    ("manganese", "Mn", 25), ("iron", "Fe", 26), ("cobalt", "Co", 27), ("nickel", "Ni", 28),
    ("copper", "Cu", 29), ("zinc", "Zn", 30), ("arsenic", "As", 33), ("bromine", "Br", 35),
    ("krypton", "Kr", 36), ("silver", "Ag", 47), ("tin", "Sn", 50), ("iodine", "I", 53), ("xenon", "Xe", 54),
    ("tungsten", "W", 74), ("platinum", "Pt", 78), ("gold", "Au", 79), ("mercury", "Hg", 80),
    ("lead", "Pb", 82), ("uranium", "U", 92),
]

PLANETS = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"]
PLANET_FACTS = [
    ("Which planet is the largest in the solar system?", "Jupiter"),
    ("Which planet is the smallest in the solar system?", "Mercury"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("Which planet is famous for its bright rings?", "Saturn"),
    ("Which planet is the hottest in the solar system?", "Venus"),
    ("Which planet do we live on?", "Earth"),
    ("How many planets are in the solar system?", "8"),
]

# (larger unit, smaller unit, factor, largest n asked)
UNITS = [
    ("meters", "centimeters", 100, 30), ("kilometers", "meters", 1000, 20), ("hours", "minutes", 60, 24),
    ("minutes", "seconds", 60, 20), ("days", "hours", 24, 14), ("weeks", "days", 7, 20),
    ("kilograms", "grams", 1000, 20), ("feet", "inches", 12, 20), ("yards", "feet", 3, 20),
    ("liters", "milliliters", 1000, 20), ("years", "months", 12, 20), ("dozen", "items", 12, 12),
]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]


def _qa(prompt: str, answer: str, category: str) -> dict:
    return {"prompt": prompt, "completion": answer, "answer": answer, "category": category}


def facts() -> list[list[dict]]:
    """Every fact as a group of its question phrasings (a group never straddles train and test)."""
    groups = [[_qa(f"What is the capital of {c}?", cap, "capitals"),
               _qa(f"Which country has {cap} as its capital?", c[:1].upper() + c[1:], "capitals")]
              for c, cap in CAPITALS.items()]
    for name, sym, num in ELEMENTS:
        groups.append([_qa(f"What is the chemical symbol for {name}?", sym, "elements"),
                       _qa(f"Which element has the chemical symbol {sym}?", name.capitalize(), "elements")])
        groups.append([_qa(f"What is the atomic number of {name}?", str(num), "atomic_numbers")])
    for i, planet in enumerate(PLANETS):
        groups.append([_qa(f"Which planet is the {ORDINALS[i]} from the Sun?", planet, "planets"),
                       _qa(f"Counting from the Sun, what is the position of {planet}?", str(i + 1), "planets")])
    groups += [[_qa(q, a, "planets")] for q, a in PLANET_FACTS]
    for big, small, factor, top in UNITS:
        for n in range(1, top + 1):
            big_n = big if big == "dozen" or n > 1 else big[:-1]
            groups.append([_qa(f"How many {small} are in {n} {big_n}?", str(n * factor), "units"),
                           _qa(f"How many {big} are in {n * factor} {small}?", str(n), "units")])
    for names, kind, category in ((DAYS, "day of the week", "weekdays"), (MONTHS, "month", "months")):
        unit = "days" if names is DAYS else "months"
        for i, start in enumerate(names):
            for k in range(1, len(names)):
                plural = unit if k > 1 else unit[:-1]
                groups.append([_qa(f"What {kind} comes {k} {plural} after {start}?",
                                   names[(i + k) % len(names)], category)])
                groups.append([_qa(f"What {kind} comes {k} {plural} before {start}?",
                                   names[(i - k) % len(names)], category)])
    return groups


def generate(seed: int = 0, n_train: int = 500, n_test: int = 200) -> tuple[list[dict], list[dict]]:
    """Train and test questions; facts are disjoint between the splits."""
    rng = random.Random(seed)
    groups = facts()
    # units and calendar questions outnumber the rest several times over; thin them so every
    # category is a visible share of both splits
    keep = {"units": 0.6, "months": 0.45}
    groups = [g for g in groups if rng.random() < keep.get(g[0]["category"], 1.0)]
    rng.shuffle(groups)
    test: list[dict] = []
    train: list[dict] = []
    for group in groups:
        if len(test) + len(group) <= n_test:
            test.extend(group)
        elif len(train) + len(group) <= n_train:
            train.extend(group)
    return train, test
