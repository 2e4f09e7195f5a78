"""Sample data for embedding training: support tickets → help-centre articles.

The support team files tickets in its own shorthand: a tag for the problem and the product
("PWR-DRAIN / Aurora kettle"). Each ticket's positive is the help-centre article on that problem
for that product; its negative is an article on another problem for the same product, which a
general-purpose model finds just as close because it shares the product name. The tags are
house jargon: a general model half understands a few of them, and training teaches the rest.
Tags and products are shared between training and held-out tickets, combinations are not.
Deterministic; pure Python.
"""

from __future__ import annotations

import random

BRANDS = ["Aurora", "Brisa", "Crumb", "Dawn", "Ember", "Fjord", "Gale", "Harbor", "Iris", "Juno"]
KINDS = ["kettle", "toaster", "blender", "vacuum cleaner", "hair dryer", "coffee maker"]

# house tag → the article about that problem ({product} is filled in).
TOPICS = {
    "PWR-DRAIN": "{product}: why the battery empties quickly and how to make a charge last longer.",
    "CLN-SCALE": "{product}: how to clean it and remove limescale with water and vinegar.",
    "WTY-CLAIM": "{product}: what the two-year guarantee covers and how to have it repaired for free.",
    "NSE-RATTLE": "{product}: what to do when it makes a loud rattling or buzzing sound.",
    "RMA-REFUND": "{product}: how to send it back within 30 days and get your money back.",
    "SPR-ORDER": "{product}: how to order a replacement lid, filter or cable for it.",
}
TICKET_FORMS = ["{tag} / {product}", "{product} - {tag}", "ticket {tag}: {product}"]


def rows() -> list[dict]:
    """240 tickets: 40 products (10 brands x 4 of 6 kinds) x 6 problem tags."""
    rng = random.Random(11)
    out = []
    for brand in BRANDS:
        for kind in rng.sample(KINDS, 4):
            product = f"{brand} {kind}"
            for tag, article in TOPICS.items():
                other = rng.choice([other for other in TOPICS if other != tag])
                out.append(
                    {
                        "query": rng.choice(TICKET_FORMS).format(tag=tag, product=product),
                        "positive": article.format(product=product),
                        "negative": TOPICS[other].format(product=product),
                    }
                )
    rng.shuffle(out)
    return out
