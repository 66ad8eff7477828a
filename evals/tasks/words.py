"""Fixed word lists shipped with the code, and pseudo-words built from syllables, so that every task's
data is generated offline and identically on every machine."""
from __future__ import annotations

import random

ADJECTIVES = """able ancient angry bold brave bright broad busy calm careful cheap clean clever cold cool
curious dark deep distant dry eager early easy empty fair famous fancy fast fierce flat fresh friendly
gentle giant glad golden grand great green happy hard heavy hidden high hollow honest huge humble hungry
icy jolly keen kind large late lazy light little lively lonely long loud lucky mighty modern narrow neat
noble odd old orange pale plain polite proud purple quick quiet rapid rare red rich rough round royal rusty
sad safe sharp shiny short silent silver simple slow small smooth soft solid sour spare steep stiff strange
strong sunny sweet swift tall tame thin tiny tired tough warm weak wet whole wide wild wise young""".split()

NOUNS = """anchor apple arrow badge basket beach bell bicycle blanket boat book bottle bridge brush bucket
button cabin camera candle canyon carpet castle cellar chair cherry circle cloud coast coin comet compass
cookie copper cottage crayon crown desert diamond dragon drum eagle engine falcon feather fence field
forest fountain garden gate glacier glove harbor hammer helmet island jacket jungle kettle kitten ladder
lantern lemon library lizard magnet maple marble meadow mirror mountain needle ocean orchard owl paddle
palace panda parrot pebble pencil piano pillow planet pocket pond puzzle rabbit river robot rocket saddle
school shadow shell ship signal spoon statue storm stream tiger tower tractor tunnel valley violin wagon
whale window wizard""".split()

VERBS = """admires builds carries chases cleans covers crosses follows finds guards holds joins keeps
leaves lifts meets moves opens paints passes pulls pushes reaches sees shakes shares shows watches""".split()

ADVERBS = """slowly quickly quietly gently often rarely again soon later today early always""".split()

CITIES = """Amsterdam Athens Bangkok Barcelona Berlin Bogota Boston Brussels Budapest Cairo Chicago
Copenhagen Dakar Denver Dublin Edinburgh Geneva Havana Helsinki Istanbul Jakarta Kyoto Lagos Lima Lisbon
London Madrid Manila Melbourne Mumbai Montreal Munich Nairobi Oslo Paris Prague Quito Riga Rome Santiago
Seattle Seoul Sydney Tokyo Toronto Valencia Vienna Warsaw Zurich""".split()

FIRST_NAMES = """Aaron Abigail Adam Alice Amelia Andrew Anna Arthur Benjamin Bianca Caleb Carmen Charles
Chloe Daniel Diana Edward Elena Emily Ethan Fiona Frank Grace Gregory Hannah Henry Isaac Isabel Jack Jane
Julia Kevin Laura Leo Lucy Marcus Maria Martin Mia Nathan Nina Oliver Olivia Oscar Paula Peter Quinn Rachel
Robert Rosa Samuel Sarah Simon Sofia Thomas Tina Victor Vera Walter Zoe""".split()

SURNAMES = """Adams Alvarez Baker Bennett Brooks Campbell Carter Chen Collins Cooper Diaz Edwards Evans
Fischer Foster Garcia Gray Green Hall Harris Hayes Hughes Jensen Kelly Kim Larsen Lewis Lopez Martin Meyer
Miller Moore Morgan Murphy Nguyen Novak Olsen Parker Patel Perez Powell Reed Reyes Rivera Roberts Rossi
Russell Sanders Schmidt Scott Silva Stewart Sullivan Taylor Turner Walker Ward Watson Young Zimmerman""".split()

_ONSETS = "b d f g k l m n p r s t v z br dr gr kl pl st tr".split()
_VOWELS = "a e i o u".split()
_CODAS = ["", "", "", "n", "r", "l", "s"]


def pseudo_word(rng: random.Random, syllables: int = 3) -> str:
    """A pronounceable made-up word such as 'bralituns' (about 10^10 of them, so samples rarely repeat)."""
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def distinct_words(rng: random.Random, count: int, syllables: int = 3) -> list[str]:
    """`count` different pseudo-words, in the order drawn."""
    seen: dict[str, None] = {}
    while len(seen) < count:
        seen.setdefault(pseudo_word(rng, syllables), None)
    return list(seen)


def word_pair(rng: random.Random) -> str:
    """RULER's word keys are adjective-noun pairs such as 'golden-lantern'."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
