"""Sample data for reranking: a help centre for a small appliance shop.

Each query asks about one topic (battery, cleaning, warranty, ...) of one product, named by its
model code ("KT-220: how do I descale it?"). Each query comes with six articles: the one about
that topic for that product (relevance 1), and five that are not the answer (relevance 0): the
same topic for other products, other topics for the same product, and an unrelated article.
Telling them apart takes matching the model code *and* the topic, which a reranker learns from
the training queries and applies to held-out ones. Deterministic; pure Python.
"""

from __future__ import annotations

import random

PRODUCTS = [
    ("KT-220", "Aurora kettle"),
    ("KT-310", "Brisa kettle"),
    ("TS-140", "Crumb toaster"),
    ("TS-260", "Dawn toaster"),
    ("BL-500", "Ember blender"),
    ("BL-720", "Fjord blender"),
    ("VC-110", "Gale vacuum"),
    ("VC-330", "Harbor vacuum"),
    ("HD-050", "Iris hair dryer"),
    ("HD-090", "Juno hair dryer"),
    ("CM-400", "Kestrel coffee maker"),
    ("CM-650", "Lumen coffee maker"),
    ("FN-210", "Mistral desk fan"),
    ("FN-380", "Nimbus desk fan"),
    ("IR-120", "Orbit steam iron"),
    ("IR-240", "Pebble steam iron"),
]

# topic → (query phrasings, article template); {code} and {name} are filled in per product.
TOPICS = {
    "battery": (
        ["how long does a full charge last?", "the battery runs out quickly, is that normal?"],
        "{name} {code} battery: a full charge lasts about {a} hours.",
    ),
    "cleaning": (
        ["how do I clean it?", "what is the right way to descale or wash it?"],
        "{name} {code} cleaning: wipe it with a damp cloth, descale every {a} weeks.",
    ),
    "warranty": (
        ["how long is the warranty?", "is a broken part covered by the guarantee?"],
        "{name} {code} warranty: {a} years on parts and labour.",
    ),
    "noise": (
        ["it makes a loud noise, what should I do?", "why is it rattling or buzzing?"],
        "{name} {code} noise: a rattle means a loose part; tighten the {a} base screws.",
    ),
    "returns": (
        ["can I return it?", "how do I send it back for a refund?"],
        "{name} {code} returns: send it back within {a} days in its original box.",
    ),
    "spare parts": (
        ["where can I buy a spare part?", "I lost a piece, can I order a replacement?"],
        "{name} {code} spare parts: lids, filters and cables ship in {a} working days.",
    ),
}

UNRELATED = [
    "Our stores are open from 9 to 18 on weekdays.",
    "Gift cards never expire and work online and in every store.",
    "Orders above 50 euros ship for free.",
    "Sign up for the newsletter to hear about seasonal sales.",
]


def article(code: str, name: str, topic: str, rng: random.Random) -> str:
    return TOPICS[topic][1].format(code=code, name=name, a=rng.randint(2, 9))


def rows() -> list[dict]:
    """576 rows: 96 queries (16 products x 6 topics) x 6 articles, one of them relevant."""
    rng = random.Random(7)
    out = []
    for code, name in PRODUCTS:
        for topic, (phrasings, _) in TOPICS.items():
            query = f"{code}: {rng.choice(phrasings)}"
            others = [product for product in PRODUCTS if product[0] != code]
            other_topics = [other for other in TOPICS if other != topic]
            candidates = [(article(code, name, topic, rng), 1.0)]
            candidates += [(article(*other, topic, rng), 0.0) for other in rng.sample(others, 2)]
            candidates += [(article(code, name, other, rng), 0.0) for other in rng.sample(other_topics, 2)]
            candidates.append((rng.choice(UNRELATED), 0.0))
            rng.shuffle(candidates)
            out += [
                {"query": query, "document": document, "relevance": relevance} for document, relevance in candidates
            ]
    return out
