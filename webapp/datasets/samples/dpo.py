"""Sample data for preference tuning (DPO): concise answers over rambling ones.

Each prompt is a short question with one right answer. The chosen answer gives it in a fixed
format, "Answer: <answer>."; the rejected one gives the same answer buried in filler. Both are
correct, so what the model learns is the preference for the concise format, which an
instruction model picks up in a few dozen LoRA steps. Deterministic, pure Python.
"""

from __future__ import annotations

import random

CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
    ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"),
    ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Chile", "Santiago"),
    ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("Cuba", "Havana"), ("Denmark", "Copenhagen"), ("Hungary", "Budapest"), ("Belgium", "Brussels"),
    ("Australia", "Canberra"), ("Turkey", "Ankara"), ("Morocco", "Rabat"), ("Colombia", "Bogotá"),
]  # fmt: skip
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"), ("up", "down"),
    ("early", "late"), ("full", "empty"), ("open", "closed"), ("strong", "weak"), ("rich", "poor"),
    ("loud", "quiet"), ("wet", "dry"), ("young", "old"), ("hard", "soft"), ("thick", "thin"),
    ("push", "pull"), ("win", "lose"), ("buy", "sell"), ("day", "night"),
]  # fmt: skip

RAMBLING = [
    "Well, that's a great question, and a lot of people wonder about it! There are many things one "
    "could say here, and it really depends on how you look at it, but if I had to say something, "
    "I think it would probably be {answer}, although I could be wrong about that.",
    "Hmm, let me think about this for a moment. This is the kind of thing that comes up quite often, "
    "and there is a lot of background to it. Anyway, to make a long story short, I believe the "
    "answer you are looking for is most likely {answer}, if I remember correctly.",
    "Oh, interesting! So, before I answer, it's worth keeping in mind that these things can be "
    "surprisingly complicated, and different sources sometimes put it differently. That said, most "
    "people would tell you it is {answer}, more or less.",
    "Thanks for asking! I love questions like this one. There's a lot to unpack, and I could go on "
    "for quite a while about the history and the details, but the short version, as far as I know, "
    "is that it's {answer}. I hope that helps a little bit!",
]


def rows() -> list[dict[str, str]]:
    """300 rows {"prompt", "chosen", "rejected"}: capitals, opposites and sums, shuffled."""
    pick = random.Random(0)
    questions = [(f"What is the capital of {country}?", capital) for country, capital in CAPITALS]
    questions += [(f"What is the opposite of '{word}'?", opposite) for word, opposite in OPPOSITES]
    questions += [(f"What is the opposite of '{opposite}'?", word) for word, opposite in OPPOSITES]
    sums = sorted({(pick.randint(2, 60), pick.randint(2, 60)) for _ in range(400)})[: 300 - len(questions)]
    questions += [(f"What is {a} plus {b}?", str(a + b)) for a, b in sums]
    data = [
        {"prompt": question, "chosen": f"Answer: {answer}.", "rejected": pick.choice(RAMBLING).format(answer=answer)}
        for question, answer in questions
    ]
    pick.shuffle(data)
    return data
