"""The project's own built-in task, `builtin_recall`: LAMBADA-style last-word recall, from code.

Every document is a short story built from templates and the small word lists below. An entity
(a name, an object, a place, a city, a colour, a pet's name) is introduced early, next to a
distractor of the same kind, and must be recalled as the story's final word. The final word is a
single alphabetic word that already occurred in the story, so the answer is recoverable from
context. Documents have the lambada format `{"text": ...}` and run through lm-eval's own
`lambada_openai` definition (prompt = text minus its last word, target = " " + last word).

Evaluation and training documents never coincide: each story's skeleton (template and entities,
without the filler sentences) is hashed into 10 buckets; evaluation documents come only from
bucket 0 and training documents only from buckets 1-9. The two also use different random
streams (string seeds "…/eval/<seed>" and "…/train/<seed>"). Python's `random.Random` with a
string seed is stable across platforms and versions, so a seed always gives the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from pathlib import Path

from quamba_layers.io_utils import atomic_write_bytes

__all__ = [
    "BUILTIN_TASK_NAME",
    "DEFAULT_N_DOCS",
    "DEFAULT_SEED",
    "generate_documents",
    "task_file_bytes",
    "training_documents",
    "training_text",
    "write_task_file",
]

BUILTIN_TASK_NAME = "builtin_recall"
DEFAULT_N_DOCS = 500
DEFAULT_SEED = 1234

NAMES = (
    "Alice", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ingrid", "Jonas",
    "Keiko", "Liam", "Maya", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Samir", "Tessa",
    "Umar", "Vera", "Walter", "Ximena", "Yusuf", "Zoe", "Anton", "Beatrix", "Cyrus", "Delia",
)  # fmt: skip
OBJECTS = (
    "lantern", "violin", "teapot", "compass", "umbrella", "notebook", "kettle", "camera",
    "helmet", "blanket", "ladder", "basket", "trumpet", "wallet", "telescope", "hammer",
    "mirror", "scarf", "candle", "bucket", "globe", "saddle", "anchor", "backpack",
)  # fmt: skip
PLACES = (
    "kitchen", "garage", "attic", "basement", "cellar", "garden", "hallway", "office",
    "closet", "barn", "shed", "pantry", "library", "studio",
)  # fmt: skip
CITIES = (
    "Lisbon", "Oslo", "Cairo", "Lima", "Dublin", "Prague", "Nairobi", "Quito", "Hanoi",
    "Vienna", "Tunis", "Bergen", "Krakow", "Porto", "Seville", "Riga", "Tallinn", "Zagreb",
)  # fmt: skip
PET_NAMES = (
    "Biscuit", "Pepper", "Mango", "Ziggy", "Waffles", "Noodle", "Pickles", "Sprout",
    "Cricket", "Pumpkin", "Juniper", "Marble",
)  # fmt: skip
ANIMALS = ("cat", "dog", "parrot", "rabbit", "turtle", "hamster")
COLORS = (
    "red", "blue", "green", "yellow", "purple", "orange", "silver", "golden", "brown",
    "white", "black", "pink",
)  # fmt: skip
# Neutral sentences put between the introduction and the recall; they use none of the words above.
FILLERS = (
    "The weather had been mild for most of the week.",
    "Nobody in the street seemed to be in a hurry.",
    "A light rain started in the afternoon and stopped before dinner.",
    "The radio played quiet music in the background.",
    "It was the kind of day that people forget quickly.",
    "Somewhere nearby, a bell rang twice.",
    "The bus was late again, as it often was.",
    "Most of the shops closed early that evening.",
    "There was still a lot of work to do.",
    "A neighbor was mowing the lawn across the road.",
    "The tea had gone cold on the table.",
    "Outside, the wind moved the leaves around.",
)

_N_BUCKETS = 10
_EVAL_BUCKET = 0


def _pick(rng: random.Random, words: tuple[str, ...], count: int) -> list[str]:
    return rng.sample(words, count)


def _fillers(rng: random.Random) -> str:
    return " ".join(rng.sample(FILLERS, rng.randint(0, 3)))


# Each template draws its entities (the story skeleton) and returns (skeleton, introduction, recall);
# the story is the introduction, 0-3 filler sentences, then the recall ending in the answer.
def _object_place(rng: random.Random):
    a, b = _pick(rng, NAMES, 2)
    obj, obj2 = _pick(rng, OBJECTS, 2)
    place, place2 = _pick(rng, PLACES, 2)
    return (
        (a, b, obj, obj2, place, place2),
        f"{a} put the {obj} in the {place} and the {obj2} in the {place2}.",
        f"Later, {b} asked where the {obj} was, and {a} said it was in the {place}",
    )


def _home_city(rng: random.Random):
    (a,) = _pick(rng, NAMES, 1)
    city, city2 = _pick(rng, CITIES, 2)
    return (
        (a, city, city2),
        f"{a} was born in {city} and later moved to {city2} for work.",
        f"When asked about the town of their childhood, {a} always named {city}",
    )


def _pet_name(rng: random.Random):
    a, b = _pick(rng, NAMES, 2)
    animal, animal2 = _pick(rng, ANIMALS, 2)
    pet, pet2 = _pick(rng, PET_NAMES, 2)
    (color,) = _pick(rng, COLORS, 1)
    return (
        (a, b, animal, animal2, pet, pet2, color),
        f"{a} has a {color} {animal} called {pet}, and the neighbor {b} has a {animal2} "
        f"called {pet2}.",
        f"Every evening, {a} opens the door and calls the {animal} by its name, {pet}",
    )


def _first_guest(rng: random.Random):
    a, b, host = _pick(rng, NAMES, 3)
    (city,) = _pick(rng, CITIES, 1)
    return (
        (a, b, host, city),
        f"At the party in {city}, the first guest to arrive was {a} and the second was {b}.",
        f"Years later, {host} still remembered that the very first guest had been {a}",
    )


def _fence_color(rng: random.Random):
    a, b = _pick(rng, NAMES, 2)
    color, color2 = _pick(rng, COLORS, 2)
    return (
        (a, b, color, color2),
        f"{a} painted the fence {color} and the door {color2}.",
        f"When {b} walked by, {b} stopped to admire the fence, which was now {color}",
    )


def _gift(rng: random.Random):
    a, b, c = _pick(rng, NAMES, 3)
    obj, obj2 = _pick(rng, OBJECTS, 2)
    return (
        (a, b, c, obj, obj2),
        f"On the birthday of {a}, {b} brought a {obj} and {c} brought a {obj2}.",
        f"Of all the presents, {a} kept the one from {b} the longest: the {obj}",
    )


_TEMPLATES: tuple[Callable, ...] = (
    _object_place,
    _home_city,
    _pet_name,
    _first_guest,
    _fence_color,
    _gift,
)


def _bucket(template_index: int, skeleton: tuple[str, ...]) -> int:
    key = f"{template_index}|" + "|".join(skeleton)
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % _N_BUCKETS


def _documents(n: int, rng: random.Random, want_eval: bool) -> list[str]:
    """`n` distinct stories from the eval bucket (want_eval) or the training buckets."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"number of documents must be an int >= 0, got {n!r}")
    texts: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(texts) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"could not generate {n} distinct documents; ask for fewer")
        template_index = rng.randrange(len(_TEMPLATES))
        skeleton, introduction, recall = _TEMPLATES[template_index](rng)
        fill = _fillers(rng)
        if (_bucket(template_index, skeleton) == _EVAL_BUCKET) != want_eval:
            continue
        # Single spaces throughout: lambada's prompt/target split is on " ".
        text = " ".join(f"{introduction} {fill} {recall}".split())
        if text not in seen:
            seen.add(text)
            texts.append(text)
    return texts


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return seed


def generate_documents(n: int = DEFAULT_N_DOCS, seed: int = DEFAULT_SEED) -> list[dict[str, str]]:
    """`n` evaluation documents `{"text": ...}`; the target is the last word (after a space)."""
    rng = random.Random(f"quamba-builtin-recall/eval/{_check_seed(seed)}")
    return [{"text": text} for text in _documents(n, rng, want_eval=True)]


def training_documents(n_docs: int, seed: int = 0) -> list[str]:
    """`n_docs` training stories: same generator, other random stream, disjoint skeletons."""
    rng = random.Random(f"quamba-builtin-recall/train/{_check_seed(seed)}")
    return _documents(n_docs, rng, want_eval=False)


def training_text(n_docs: int, seed: int = 0) -> str:
    """Training stories joined by newlines (for training a tiny model); never an eval story."""
    return "\n".join(training_documents(n_docs, seed))


def task_file_bytes(n: int = DEFAULT_N_DOCS, seed: int = DEFAULT_SEED) -> bytes:
    """The task file's bytes: one `{"text": ...}` JSON line (ASCII, sorted keys) per document."""
    return "".join(
        json.dumps(doc, ensure_ascii=True, sort_keys=True) + "\n"
        for doc in generate_documents(n, seed)
    ).encode("utf-8")


def write_task_file(
    path: str | os.PathLike, n: int = DEFAULT_N_DOCS, seed: int = DEFAULT_SEED
) -> str:
    """Write `generate_documents(n, seed)` as JSON lines to `path`; return the file's sha256.

    The bytes depend only on (n, seed). The file is written atomically (temporary file + rename).
    """
    payload = task_file_bytes(n, seed)
    atomic_write_bytes(Path(path), payload)
    return hashlib.sha256(payload).hexdigest()
