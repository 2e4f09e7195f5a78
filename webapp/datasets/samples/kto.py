"""Sample data for preference tuning (KTO): concise answers are desirable, rambling ones are not.

The questions of the DPO sample (capitals, opposites, sums), each asked once, unpaired: half of
them (a seeded choice) come with a desirable completion in a fixed format, "Answer: <answer>.",
the others with an undesirable one that gives the same answer buried in filler. Both are
correct, so what the model learns is which format is wanted: held out, the desirable completions
become more likely than under the base and the undesirable ones less, which an instruction model
picks up in a few dozen LoRA steps. Labels are text, as the parser writes JSON booleans.
Deterministic, pure Python.
"""

from __future__ import annotations

import random

from webapp.datasets.samples.dpo import CAPITALS, OPPOSITES, RAMBLING


def rows() -> list[dict[str, str]]:
    """300 rows {"prompt", "completion", "label"}, 150 of each label, shuffled."""
    pick = random.Random(0)
    questions = [(f"What is the capital of {country}?", capital) for country, capital in CAPITALS]
    questions += [(f"What is the opposite of '{word}'?", opposite) for word, opposite in OPPOSITES]
    questions += [(f"What is the opposite of '{opposite}'?", word) for word, opposite in OPPOSITES]
    sums = sorted({(pick.randint(2, 60), pick.randint(2, 60)) for _ in range(400)})[: 300 - len(questions)]
    questions += [(f"What is {a} plus {b}?", str(a + b)) for a, b in sums]
    labels = [True, False] * (len(questions) // 2)
    pick.shuffle(labels)
    data = [
        {
            "prompt": question,
            "completion": f"Answer: {answer}." if desirable else pick.choice(RAMBLING).format(answer=answer),
            "label": "true" if desirable else "false",
        }
        for (question, answer), desirable in zip(questions, labels, strict=True)
    ]
    pick.shuffle(data)
    return data
