"""Synthetic long-context tasks: pure generators and scorers, no model and no downloads.

A generator turns (count_tokens, length, knobs, seed) into a Sample whose prompt fits `length - reserve`
tokens of the model's tokenizer; a scorer maps (prediction, answers) to a float in [0, 1]. The same seed
always gives the same prompt, so a score can be reproduced from results.json alone.

    from evals.tasks import passkey
    sample = passkey.make_sample(lm.count_tokens, length=4096, depth=0.5, seed=0, reserve=12)
    passkey.score(" 12345.", sample.answers)
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CountTokens = Callable[[str], int]

# The noise filler of Landmark attention's passkey test, also RULER's "noise" haystack.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NOISE_SENTENCES = [s.strip() + "." for s in NOISE.split(".") if s.strip()]


@dataclass
class Sample:
    prompt: str                  # ends with the answer prefix: the model continues it with the answer
    answers: list[str]           # what the scorer looks for in the continuation
    meta: dict[str, Any] = field(default_factory=dict)   # knobs, seed, needle position, prompt tokens


def derive_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed for one sample from the run's seed and the sample's coordinates (stable across runs,
    unlike hash())."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def check_depth(depth: float) -> float:
    if not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"--depths: {depth} is outside [0, 1] (0 = start of the context, 1 = its end)")
    return float(depth)


def fit_units(build: Callable[[int], str], count_tokens: CountTokens, length: int, reserve: int,
              what: str, minimum: int = 1) -> tuple[int, str]:
    """The largest filler size n >= minimum whose prompt build(n) takes at most length - reserve tokens.

    build(n) must grow with n (its first n filler units do not depend on n), so a doubling search then a
    bisection needs O(log n) tokenizations of the prompt. Raises ValueError when even `minimum` does not fit.
    """
    budget = length - reserve
    smallest = build(minimum)
    need = count_tokens(smallest)
    if need > budget:
        raise ValueError(f"--lengths: {length} tokens cannot hold a {what} prompt "
                         f"(the shortest takes {need} tokens + {reserve} kept for the answer)")
    lo, prompt = minimum, smallest          # lo always fits
    hi = max(2 * minimum, 2)
    while True:                             # find a size that does not fit
        candidate = build(hi)
        if count_tokens(candidate) > budget:
            break
        lo, prompt, hi = hi, candidate, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        candidate = build(mid)
        if count_tokens(candidate) <= budget:
            lo, prompt = mid, candidate
        else:
            hi = mid
    return lo, prompt


def check_copies(copies: int) -> int:
    if not isinstance(copies, int) or isinstance(copies, bool) or copies < 1:
        raise ValueError(f"--repeat-context: {copies!r} must be a positive integer (1 = the context once)")
    return copies


def assemble(header: str, context: str, question: str, separator: str = "\n\n", copies: int = 1,
             lead: str = "") -> str:
    """header, context, question joined by `separator`; with copies > 1, JRT-Prompt ("Just read twice",
    Arora et al. 2024, as their released prompts build it): `lead` (the question) first, then the header,
    the context `copies` times and the question, so that a recurrent model reads the context knowing what
    it will be asked, and reads it again having seen all of it."""
    prompt = separator.join([header, *[context] * check_copies(copies), question])
    return f"{lead}\n{prompt}" if copies > 1 and lead else prompt


def insert_at_depth(units: list[str], needle: str, depth: float) -> tuple[list[str], int]:
    """units with needle inserted after round(depth * len(units)) of them; returns (new list, index)."""
    index = round(check_depth(depth) * len(units))
    return units[:index] + [needle] + units[index:], index


def contains_score(prediction: str, answers: list[str]) -> float:
    """1.0 when any answer occurs in the prediction (case-insensitive), else 0.0."""
    text = prediction.lower()
    return float(any(a.lower() in text for a in answers))


def string_match_all(prediction: str, answers: list[str]) -> float:
    """RULER's metric for one sample: the fraction of references found as case-insensitive substrings."""
    if not answers:
        raise ValueError("string_match_all needs at least one reference answer")
    text = prediction.lower()
    return sum(a.lower() in text for a in answers) / len(answers)
