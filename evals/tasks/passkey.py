"""Passkey retrieval (Mohtashami & Jaggi 2023, Landmark Attention): a 5-digit key hidden at a chosen
depth in repetitive noise. It tests whether the model can fetch one token span from anywhere in its
context, with no distracting content at all."""
from __future__ import annotations

import random
import re

from . import NOISE_SENTENCES, CountTokens, Sample, assemble, check_copies, check_depth, fit_units

TASK_DESCRIPTION = ("There is an important info hidden inside a lot of irrelevant text. "
                    "Find it and memorize them. I will quiz you about the important information there.")
QUESTION = "What is the pass key? The pass key is"
MAX_NEW_TOKENS = 10          # " 12345." with room for a tokenizer that splits digits


def key_line(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def build_prompt(key: str, units: int, depth: float, copies: int = 1) -> tuple[str, int, tuple[int, int]]:
    """(prompt, character offset of the key line, (start, end) characters of the filler region: all its
    copies)."""
    filler = [NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(units)]
    split = round(depth * units)
    before, after = " ".join(filler[:split]), " ".join(filler[split:])
    context = "\n".join(part for part in (before, key_line(key), after) if part)
    prompt = assemble(TASK_DESCRIPTION, context, QUESTION, "\n", copies, lead=QUESTION.split("?")[0] + "?")
    end = len(prompt) - len(QUESTION) - 1
    start = end - (len(context) + 1) * copies + 1
    return prompt, prompt.index(key_line(key), start), (start, end)


def make_sample(count_tokens: CountTokens, length: int, depth: float, seed: int,
                reserve: int = MAX_NEW_TOKENS, repeat_context: int = 1) -> Sample:
    """The longest passkey prompt within `length - reserve` tokens, key line at `depth` of the filler;
    repeat_context > 1: the filler (with its key line) that many times within the same length (JRT-Prompt)."""
    depth, copies = check_depth(depth), check_copies(repeat_context)
    key = str(random.Random(seed).randint(10000, 99999))
    units, prompt = fit_units(lambda n: build_prompt(key, n, depth, copies)[0], count_tokens, length, reserve,
                              "passkey", minimum=1)
    _, needle_char, span = build_prompt(key, units, depth, copies)
    return Sample(prompt, [key], {"task": "passkey", "length": length, "depth": depth, "seed": seed,
                                  "repeat_context": copies, "filler_sentences": units, "needle": key_line(key),
                                  "needle_char": needle_char, "haystack_span": span,
                                  "prompt_tokens": count_tokens(prompt)})


def score(prediction: str, answers: list[str]) -> float:
    """1.0 when the first number the model writes is the key: a longer or shorter number is wrong."""
    found = re.search(r"\d+", prediction)
    return float(found is not None and found.group(0) in answers)
