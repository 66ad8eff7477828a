"""RULER (Hsieh et al. 2024, NVIDIA/RULER) tasks that need no outside data, with RULER's templates, answer
prefixes, haystack kinds and its string_match_all metric; word lists are generated here instead of
wonderwords / Paul Graham essays, so everything is offline and seeded.

    niah_single_1    noise haystack, word key, 7-digit number value
    niah_multikey_2  haystack of distractor needles (word keys, numbers); find the one asked for
    niah_multikey_3  haystack of distractor needles with uuid keys and uuid values
    vt               variable tracking: one chain of 4 hops hidden in noise, one-shot example in front
    cwe              common words extraction: the 10 most repeated words of a numbered list (one-shot)
    fwe              frequent words extraction: the 3 most frequent coded words of a Zipf-sampled text
"""
from __future__ import annotations

import random
import string
import uuid
from collections.abc import Callable

from . import NOISE, CountTokens, Sample, fit_units, string_match_all
from .words import distinct_words, pseudo_word, word_pair

NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize "
                 "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special "
                 "magic {type_needle_v} for {query} mentioned in the provided text?")
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."

VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_ANSWER_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
                    "are assigned the value {query}, they are: ")

CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above "
                "list?")
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"

FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                "the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

VT_HOPS = 4                # RULER's vt: one chain, four hops -> five variables
VT_EXAMPLE_NOISE = 5       # noise lines in the one-shot example (RULER sizes it to ~500 tokens)
CWE_COMMON = 10
FWE_ALPHA = 2.0


def _singular_niah_template() -> str:
    """RULER rewrites its plural template when one value is asked for (num_needle_q * num_needle_v == 1)."""
    text = NIAH_TEMPLATE + NIAH_ANSWER_PREFIX
    return text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


class _Stream:
    """A seeded, growing list: take(n) always starts with the same items, so prompts grow monotonically."""

    def __init__(self, seed: int, item: Callable[[random.Random], str]):
        self.rng, self.item, self.items = random.Random(seed), item, []

    def take(self, n: int) -> list[str]:
        while len(self.items) < n:
            self.items.append(self.item(self.rng))
        return self.items[:n]


def _niah(count_tokens: CountTokens, length: int, seed: int, reserve: int, task: str, haystack: str,
          key_kind: str, value_kind: str) -> Sample:
    rng = random.Random(seed)
    make = {"words": word_pair, "numbers": _number, "uuids": _uuid}
    key, value = make[key_kind](rng), make[value_kind](rng)
    needle = NIAH_NEEDLE.format(type_needle_v=value_kind, key=key, value=value)
    depth = rng.random()
    if haystack == "noise":
        def lines(n: int) -> list[str]:
            return [NOISE] * n
    else:   # "needle": every haystack line is a distractor needle with another key
        def distractor(r: random.Random) -> str:
            other = make[key_kind](r)
            while other == key:
                other = make[key_kind](r)
            return NIAH_NEEDLE.format(type_needle_v=value_kind, key=other, value=make[value_kind](r))
        lines = _Stream(rng.getrandbits(63), distractor).take
    template = _singular_niah_template()

    def build(n: int) -> str:
        hay = lines(n)
        split = round(depth * n)
        context = "\n".join(hay[:split] + [needle] + hay[split:])
        return template.format(type_needle_v=value_kind[:-1], context=context, query=key)

    units, prompt = fit_units(build, count_tokens, length, reserve, task)
    return Sample(prompt, [value], {"task": task, "length": length, "seed": seed, "depth": depth, "key": key,
                                    "haystack_lines": units, "needle": needle, "needle_char": prompt.index(needle),
                                    "prompt_tokens": count_tokens(prompt)})


def niah_single_1(count_tokens: CountTokens, length: int, seed: int, reserve: int) -> Sample:
    return _niah(count_tokens, length, seed, reserve, "niah_single_1", "noise", "words", "numbers")


def niah_multikey_2(count_tokens: CountTokens, length: int, seed: int, reserve: int) -> Sample:
    return _niah(count_tokens, length, seed, reserve, "niah_multikey_2", "needle", "words", "numbers")


def niah_multikey_3(count_tokens: CountTokens, length: int, seed: int, reserve: int) -> Sample:
    return _niah(count_tokens, length, seed, reserve, "niah_multikey_3", "needle", "uuids", "uuids")


def _vt_instance(rng: random.Random, noise: int,
                 fractions: list[float] | None = None) -> tuple[str, list[str], str]:
    """One variable-tracking prompt (template + answer prefix) with `noise` noise lines, its answers (the
    chain's variables) and the value they all hold."""
    names: dict[str, None] = {}
    while len(names) < VT_HOPS + 1:
        names.setdefault("".join(rng.choices(string.ascii_uppercase, k=5)), None)
    variables = list(names)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {variables[0]} = {value}"]
    chain += [f"VAR {variables[j + 1]} = VAR {variables[j]} " for j in range(VT_HOPS)]
    fractions = sorted(rng.random() for _ in chain) if fractions is None else fractions
    lines = [NOISE] * noise
    for j, (line, fraction) in enumerate(zip(chain, fractions)):
        lines.insert(round(fraction * noise) + j, line)
    prompt = (VT_TEMPLATE + VT_ANSWER_PREFIX).format(context="\n".join(lines), query=value, num_v=VT_HOPS + 1)
    return prompt, variables, value


def vt(count_tokens: CountTokens, length: int, seed: int, reserve: int) -> Sample:
    rng = random.Random(seed)
    example, example_answers, _ = _vt_instance(random.Random(rng.getrandbits(63)), VT_EXAMPLE_NOISE)
    shot = example + " " + " ".join(example_answers) + "\n"
    instance_seed = rng.getrandbits(63)
    fractions = sorted(rng.random() for _ in range(VT_HOPS + 1))
    units, prompt = fit_units(lambda n: shot + _vt_instance(random.Random(instance_seed), n, fractions)[0],
                              count_tokens, length, reserve, "vt")
    _, answers, value = _vt_instance(random.Random(instance_seed), units, fractions)
    return Sample(prompt, answers, {"task": "vt", "length": length, "seed": seed, "noise_lines": units,
                                    "value": value, "prompt_tokens": count_tokens(prompt)})


def _cwe_list(words: list[str], common_repeats: int, uncommon_repeats: int, shuffle_seed: int) -> str:
    common, uncommon = words[:CWE_COMMON], words[CWE_COMMON:]
    entries = common * common_repeats + uncommon * uncommon_repeats
    random.Random(shuffle_seed).shuffle(entries)
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(entries))


def cwe(count_tokens: CountTokens, length: int, seed: int, reserve: int) -> Sample:
    rng = random.Random(seed)
    template = CWE_TEMPLATE + CWE_ANSWER_PREFIX
    # RULER's repetitions: below 4096 tokens the common words appear 6 times (3 in the example), else 30 (10).
    short = length < 4096
    (ex_words, ex_common, ex_uncommon), (common_repeats, uncommon_repeats) = (
        ((20, 3, 1), (6, 1)) if short else ((40, 10, 3), (30, 3)))
    example = distinct_words(random.Random(rng.getrandbits(63)), ex_words, syllables=2)
    shot = (template.format(context=_cwe_list(example, ex_common, ex_uncommon, rng.getrandbits(63)))
            + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(example[:CWE_COMMON])))
    word_rng, pool, seen = random.Random(rng.getrandbits(63)), [], set()
    shuffle_seed = rng.getrandbits(63)

    def take(n: int) -> list[str]:
        """The first n distinct words of this sample's stream (growing n keeps the earlier words)."""
        while len(pool) < n:
            word = pseudo_word(word_rng, syllables=2)
            if word not in seen:
                seen.add(word)
                pool.append(word)
        return pool[:n]

    def build(n: int) -> str:
        return shot + "\n" + template.format(context=_cwe_list(take(n), common_repeats, uncommon_repeats,
                                                                shuffle_seed))

    units, prompt = fit_units(build, count_tokens, length, reserve, "cwe", minimum=CWE_COMMON + 1)
    return Sample(prompt, take(units)[:CWE_COMMON], {"task": "cwe", "length": length, "seed": seed,
                                                     "distinct_words": units, "prompt_tokens": count_tokens(prompt)})


def zeta(alpha: float, terms: int = 10_000) -> float:
    """Riemann zeta for alpha > 1: a partial sum plus its Euler-Maclaurin tail."""
    return (sum(k ** -alpha for k in range(1, terms + 1)) + terms ** (1 - alpha) / (alpha - 1)
            - 0.5 * terms ** -alpha)


def fwe_counts(num_words: int, vocab_size: int, alpha: float = FWE_ALPHA) -> list[int]:
    """How often each rank appears: num_words * k^-alpha / zeta(alpha), truncated (RULER's Zipf sample)."""
    z = zeta(alpha)
    return [int(num_words * k ** -alpha / z) for k in range(1, vocab_size + 1)]


def fwe(count_tokens: CountTokens, length: int, seed: int, reserve: int) -> Sample:
    rng = random.Random(seed)
    vocab_size = max((length - reserve) // 50, 10)
    vocab: dict[str, None] = {}
    while len(vocab) < vocab_size:
        vocab.setdefault("".join(rng.choices(string.ascii_lowercase, k=6)), None)
    words = list(vocab)
    words[0] = "..."                     # the most frequent "word" is noise, as in RULER
    shuffle_seed = rng.getrandbits(63)

    def build(n: int) -> str:
        text = [w for w, c in zip(words, fwe_counts(n, vocab_size)) for _ in range(c)]
        random.Random(shuffle_seed).shuffle(text)
        return (FWE_TEMPLATE + FWE_ANSWER_PREFIX).format(context=" ".join(text))

    units, prompt = fit_units(build, count_tokens, length, reserve, "fwe")
    counts = fwe_counts(units, vocab_size)
    if counts[3] <= counts[4]:
        raise ValueError(f"--lengths: {length} tokens are too few for fwe: its top three words are not distinct "
                         f"(counts {counts[1:5]})")
    return Sample(prompt, words[1:4], {"task": "fwe", "length": length, "seed": seed, "num_words": units,
                                       "counts": counts[:5], "prompt_tokens": count_tokens(prompt)})


# name -> (generator, RULER's tokens_to_generate)
TASKS: dict[str, tuple[Callable[[CountTokens, int, int, int], Sample], int]] = {
    "niah_single_1": (niah_single_1, 128),
    "niah_multikey_2": (niah_multikey_2, 128),
    "niah_multikey_3": (niah_multikey_3, 128),
    "vt": (vt, 30),
    "cwe": (cwe, 120),
    "fwe": (fwe, 50),
}


def check_tasks(tasks: list[str]) -> list[str]:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"--tasks: unknown ruler task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    return list(tasks)


def make_sample(task: str, count_tokens: CountTokens, length: int, seed: int, reserve: int) -> Sample:
    """One sample of a RULER task, at most `length - reserve` tokens."""
    return TASKS[check_tasks([task])[0]][0](count_tokens, length, seed, reserve)


def score(prediction: str, answers: list[str]) -> float:
    """RULER's string_match_all for one sample (fraction of references found)."""
    return string_match_all(prediction, answers)
