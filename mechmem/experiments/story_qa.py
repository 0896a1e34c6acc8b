"""Synthetic story comprehension, generated offline from a seed: short stories of facts about a
few people, one question each, a one-word answer scored by exact match of the first word.

Every story names ``n_people`` people and gives each of them ``facts_per_person`` facts of
different kinds (where they live, the colour of something they own, their pet, their job, how
many of something they have), in shuffled order, so every question has distractors of its own
kind in the same story. Item ``i`` depends only on ``(seed, i)``.

Example:
    >>> item = story_items(1, seed=0)[0]
    >>> item.prompt.startswith("Story: ") and item.prompt.endswith("Answer:")
    True
    >>> is_correct(" " + item.answer.capitalize() + ".", item.answer)
    True
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

NAMES = [
    "Mara", "Tom", "Ines", "Kofi", "Lena", "Ravi", "Sofia", "Omar", "Yuki", "Nils", "Ada",
    "Bruno", "Chloe", "Dev", "Elif", "Felix", "Greta", "Hugo", "Iris", "Jonas",
]  # fmt: skip
CITIES = ["Paris", "Lisbon", "Cairo", "Tokyo", "Oslo", "Lima", "Dublin", "Vienna", "Delhi"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
OBJECTS = ["kite", "bicycle", "car", "hat", "umbrella", "boat", "scarf"]
ANIMALS = ["cat", "dog", "parrot", "horse", "rabbit", "goat", "turtle"]
JOBS = ["baker", "teacher", "doctor", "farmer", "pilot", "painter", "nurse", "lawyer"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine"]
COUNTED = ["books", "apples", "coins", "shirts", "chairs", "lamps"]
FILLERS = [
    "It was a quiet week in the town.",
    "The weather changed twice that afternoon.",
    "Nobody remembered who had organised the party.",
    "The market was busy on Saturday morning.",
    "A letter arrived late in the evening.",
]
KINDS = ("city", "colour", "pet", "job", "count")


@dataclass(frozen=True)
class StoryItem:
    """One comprehension item: ``prompt`` ends with ``Answer:``; ``answer`` is one word."""

    prompt: str
    answer: str
    kind: str


def _fact(kind: str, name: str, rng: random.Random, used: dict[str, set]) -> tuple[str, str, str]:
    """``(sentence, question, answer)`` of one fact, its answer unused by others in the story."""

    def pick(options: list[str]) -> str:
        value = rng.choice([o for o in options if o not in used[kind]] or options)
        used[kind].add(value)
        return value

    if kind == "city":
        city = pick(CITIES)
        return f"{name} lives in {city}.", f"Where does {name} live?", city
    if kind == "colour":
        colour, thing = pick(COLOURS), rng.choice(OBJECTS)
        return (
            f"{name} has a {colour} {thing}.",
            f"What colour is {name}'s {thing}?",
            colour,
        )
    if kind == "pet":
        animal = pick(ANIMALS)
        return f"{name} owns a {animal}.", f"What animal does {name} own?", animal
    if kind == "job":
        job = pick(JOBS)
        return f"{name} works as a {job}.", f"What is {name}'s job?", job
    number, counted = pick(NUMBERS), rng.choice(COUNTED)
    return (
        f"{name} has {number} {counted}.",
        f"How many {counted} does {name} have?",
        number,
    )


def _story(rng: random.Random, n_people: int, facts_per_person: int, fillers: int):
    """``(story, question, answer, kind)`` drawn from ``rng``."""
    names = rng.sample(NAMES, n_people)
    kinds = rng.sample(KINDS, facts_per_person)  # the same kinds for everyone: distractors
    used: dict[str, set] = {kind: set() for kind in KINDS}
    facts = [_fact(kind, name, rng, used) for name in names for kind in kinds]
    sentences = [sentence for sentence, _, _ in facts] + rng.sample(FILLERS, fillers)
    rng.shuffle(sentences)
    asked = rng.randrange(len(facts))
    _, question, answer = facts[asked]
    return " ".join(sentences), question, answer, kinds[asked % facts_per_person]


def story_item(
    index: int,
    *,
    seed: int = 0,
    n_people: int = 2,
    facts_per_person: int = 2,
    fillers: int = 1,
    shots: int = 1,
) -> StoryItem:
    """Item ``index`` of the seeded sequence (see the module docs), after ``shots`` solved
    examples of the same form (drawn from the same seed) that show the one-word answer format.

    Example:
        >>> story_item(3, seed=1) == story_item(3, seed=1)
        True
    """
    rng = random.Random(f"{seed}:{index}")
    blocks = []
    for _ in range(shots):
        story, question, answer, _ = _story(rng, n_people, facts_per_person, fillers)
        blocks.append(f"Story: {story}\nQuestion: {question}\nAnswer: {answer}\n\n")
    story, question, answer, kind = _story(rng, n_people, facts_per_person, fillers)
    prompt = "".join(blocks) + f"Story: {story}\nQuestion: {question}\nAnswer:"
    return StoryItem(prompt=prompt, answer=answer.lower(), kind=kind)


def story_items(n: int, *, seed: int = 0, **options) -> list[StoryItem]:
    """Items ``0 .. n-1`` of the seeded sequence.

    Example:
        >>> len(story_items(5, seed=2))
        5
    """
    return [story_item(index, seed=seed, **options) for index in range(n)]


def first_word(text: str) -> str:
    """The first word of ``text``, lower-cased, without punctuation.

    Example:
        >>> first_word("  Lisbon, of course.")
        'lisbon'
    """
    match = re.search(r"[A-Za-z0-9']+", text)
    return match.group(0).lower() if match else ""


def is_correct(generated: str, answer: str) -> bool:
    """Exact match of the generated text's first word with the answer.

    Example:
        >>> is_correct(" blue kite", "blue"), is_correct(" The blue one", "blue")
        (True, False)
    """
    return first_word(generated) == answer.lower()
