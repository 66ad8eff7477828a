"""Phonebook lookup (as in "Repeat After Me", Jelassi et al. 2024): N lines "Name Surname: 555-0123-4567",
then the number of one listed person. Every line looks alike, so a fixed-size state must either keep all
N numbers or guess; this is where recurrent layers and attention part ways."""
from __future__ import annotations

import random
import re

from . import CountTokens, Sample, assemble, check_copies
from .words import FIRST_NAMES, SURNAMES

HEADER = "Below is a phonebook. Each line gives a person's name and their phone number."
MAX_NEW_TOKENS = 16
NUMBER = re.compile(r"\d{3}-\d{4}-\d{4}")


def question(name: str) -> str:
    return f"What is the phone number of {name}? The phone number of {name} is"


def make_sample(count_tokens: CountTokens, entries: int, seed: int, repeat_context: int = 1) -> Sample:
    """A phonebook of `entries` distinct people and a question about one of them, chosen by `seed`;
    repeat_context > 1: the phonebook that many times, JRT-Prompt style (`assemble`)."""
    check_copies(repeat_context)
    names_available = len(FIRST_NAMES) * len(SURNAMES)
    if not 1 <= entries <= names_available:
        raise ValueError(f"--entries: {entries} is outside [1, {names_available}] (the distinct names available)")
    rng = random.Random(seed)
    people = rng.sample(range(names_available), entries)
    names = [f"{FIRST_NAMES[p // len(SURNAMES)]} {SURNAMES[p % len(SURNAMES)]}" for p in people]
    numbers: dict[str, None] = {}
    while len(numbers) < entries:
        numbers.setdefault(f"555-{rng.randint(0, 9999):04d}-{rng.randint(0, 9999):04d}", None)
    lines = [f"{name}: {number}" for name, number in zip(names, numbers)]
    query = rng.randrange(entries)
    ask = question(names[query])
    prompt = assemble(HEADER, "\n".join(lines), ask, copies=repeat_context, lead=ask.split("?")[0] + "?")
    answer = list(numbers)[query]
    return Sample(prompt, [answer], {"task": "phonebook", "entries": entries, "seed": seed, "name": names[query],
                                     "repeat_context": repeat_context,
                                     "query_index": query, "needle": lines[query],
                                     "needle_char": prompt.index(lines[query] + "\n"),
                                     "prompt_tokens": count_tokens(prompt)})


def score(prediction: str, answers: list[str]) -> float:
    """1.0 when the first phone number the model writes is the person's."""
    found = NUMBER.search(prediction)
    return float(found is not None and found.group(0) in answers)
