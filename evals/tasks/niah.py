"""Needle in a haystack: one fact ("The special magic number for Lisbon is 4821907.") hidden at a chosen
depth in varied, generated prose. Unlike passkey's repeated noise, the filler changes every sentence, so
the model cannot find the needle merely as the one line that breaks a pattern."""
from __future__ import annotations

import random

from . import CountTokens, Sample, assemble, check_copies, check_depth, contains_score, fit_units
from .words import ADJECTIVES, ADVERBS, CITIES, NOUNS, VERBS

HEADER = ("Below is a long text with one important fact hidden in it. "
          "Read it carefully; you will be asked about that fact afterwards.")
MAX_NEW_TOKENS = 16          # a 7-digit number and its period

_TEMPLATES = (
    "The {a} {n} {v} the {b} {m}.",
    "A {a} {n} {v} a {m} near the {b} {k}.",
    "Every {n} {v} the {a} {m} {d}.",
    "Nobody knows why the {a} {n} {v} the {m}.",
    "In the {a} {k}, a {b} {n} {v} the {m} {d}.",
)


class Filler:
    """An endless, seeded stream of generated sentences; take(n) always starts with the same sentences,
    so a prompt grows by whole sentences while the search for its size goes on."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.sentences: list[str] = []

    def sentence(self) -> str:
        r = self.rng
        return r.choice(_TEMPLATES).format(a=r.choice(ADJECTIVES), b=r.choice(ADJECTIVES), n=r.choice(NOUNS),
                                           m=r.choice(NOUNS), k=r.choice(NOUNS), v=r.choice(VERBS),
                                           d=r.choice(ADVERBS))

    def take(self, n: int) -> list[str]:
        while len(self.sentences) < n:
            self.sentences.append(self.sentence())
        return self.sentences[:n]


def needle_sentence(key: str, value: str) -> str:
    return f"The special magic number for {key} is {value}."


def question(key: str) -> str:
    return (f"What is the special magic number for {key} mentioned in the text above? "
            f"The special magic number for {key} is")


def build_prompt(filler: Filler, key: str, value: str, units: int, depth: float,
                 copies: int = 1) -> tuple[str, int, tuple[int, int]]:
    """(prompt, character offset of the needle, (start, end) characters of the haystack: all its copies)."""
    sentences = filler.take(units)
    split = round(depth * units)
    needle = needle_sentence(key, value)
    haystack = " ".join(sentences[:split] + [needle] + sentences[split:])
    ask = question(key)
    prompt = assemble(HEADER, haystack, ask, copies=copies, lead=ask.split("?")[0] + "?")
    end = len(prompt) - len(ask) - 2
    start = end - (len(haystack) + 2) * copies + 2
    return prompt, prompt.index(needle, start), (start, end)


def make_sample(count_tokens: CountTokens, length: int, depth: float, seed: int,
                reserve: int = MAX_NEW_TOKENS, repeat_context: int = 1) -> Sample:
    """The longest needle-in-a-haystack prompt within `length - reserve` tokens, needle at `depth`;
    repeat_context > 1: the haystack that many times within the same length (JRT-Prompt)."""
    depth, copies = check_depth(depth), check_copies(repeat_context)
    rng = random.Random(seed)
    key, value = rng.choice(CITIES), str(rng.randint(1_000_000, 9_999_999))
    filler = Filler(rng.getrandbits(63))
    units, prompt = fit_units(lambda n: build_prompt(filler, key, value, n, depth, copies)[0], count_tokens,
                              length, reserve, "niah", minimum=1)
    _, needle_char, span = build_prompt(filler, key, value, units, depth, copies)
    return Sample(prompt, [value], {"task": "niah", "length": length, "depth": depth, "seed": seed, "key": key,
                                    "repeat_context": copies, "filler_sentences": units,
                                    "needle": needle_sentence(key, value), "needle_char": needle_char,
                                    "haystack_span": span, "prompt_tokens": count_tokens(prompt)})


def score(prediction: str, answers: list[str]) -> float:
    """Substring match: the number anywhere in the continuation counts."""
    return contains_score(prediction, answers)
