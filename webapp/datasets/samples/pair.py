"""Sample data for text-pair classification: is a claim supported by its context?

Faithfulness checking, the kind a retrieval-augmented assistant needs: text_a is a claim about
a (fictional) company, text_b a short profile of that company, and the label says whether the
profile backs the claim ("supported") or not ("unsupported"). Each profile tells three of five
facts (founding year, founder, city, best-known product, size); an unsupported claim states one
of the two facts the profile does not mention, the way a model's answer adds a detail its source
never gave. Claims are worded differently from the profile ("has its headquarters in" against
"is based in"), and every company has claims of both kinds, so neither text alone gives the
label away: the classifier has to compare them. Half the claims are supported.

Learnable, not instant: all-MiniLM-L6-v2 with LoRA on all linear layers (learning rate 2e-3,
batch 16) stays at chance for a few dozen steps, then goes to about 0.97 held-out accuracy by
step 100 (a full fine-tune at 1e-4 does the same). Deterministic; pure Python.
"""

from __future__ import annotations

import random

COMPANIES = [
    "Alderbank", "Brightwell", "Cobalt Forge", "Dunmore Labs", "Elmstead", "Fernhill Foods",
    "Glasswing", "Harrowgate", "Ironvale", "Juniper & Co", "Kestrel Works", "Larkspur",
    "Meadowlight", "Northwind Tools", "Oakhurst", "Pinecrest", "Quarry Bay", "Redfern Audio",
    "Silverlake", "Thornbury", "Umberfield", "Vantage Row", "Westmoor", "Yarrow Textiles",
]  # fmt: skip
CITIES = ["Leeds", "Tampere", "Graz", "Porto", "Ghent", "Bilbao", "Aarhus", "Turin", "Cork", "Brno"]
FOUNDERS = ["Ada Moreno", "Lars Berg", "Nia Okoro", "Tomas Novak", "Mei Lin", "Omar Haddad", "Ines Costa"]
PRODUCTS = ["bicycles", "hearing aids", "garden tools", "solar lamps", "board games", "rain jackets", "coffee grinders"]
YEARS = [str(year) for year in range(1952, 2020, 3)]
SIZES = ["40", "120", "350", "900", "2,500", "6,000"]

PROFILE = {
    "year": "It was founded in {year}.",
    "founder": "Its founder is {founder}.",
    "city": "The company is based in {city}.",
    "product": "It is best known for its {product}.",
    "size": "Today it employs about {size} people.",
}
CLAIMS = {
    "year": ["{company} was founded in {year}.", "{company} has existed since {year}."],
    "founder": ["{founder} founded {company}.", "{company} was started by {founder}."],
    "city": ["{company} has its headquarters in {city}.", "{company} is a company from {city}."],
    "product": ["{company} makes {product}.", "{company}'s best-known products are {product}."],
    "size": ["{company} has around {size} employees.", "About {size} people work at {company}."],
}
CHOICES = {"year": YEARS, "founder": FOUNDERS, "city": CITIES, "product": PRODUCTS, "size": SIZES}
CLAIMS_PER_LABEL = 6
"""Supported and unsupported claims per company."""


def rows() -> list[dict[str, str]]:
    """288 distinct claims (12 per company, half supported), each with a profile of its company."""
    rng = random.Random(0)
    out: list[dict[str, str]] = []
    for company in COMPANIES:
        facts = {"company": company} | {field: rng.choice(values) for field, values in CHOICES.items()}
        counts = {"supported": 0, "unsupported": 0}
        while min(counts.values()) < CLAIMS_PER_LABEL:
            told = rng.sample(sorted(PROFILE), 3)  # each profile tells three of the five facts
            profile = f"{company}: " + " ".join(PROFILE[field].format(**facts) for field in told)
            for label, fields in (("supported", told), ("unsupported", sorted(set(PROFILE) - set(told)))):
                claim = rng.choice(CLAIMS[rng.choice(fields)]).format(**facts)
                row = {"text_a": claim, "text_b": profile, "label": label}
                if counts[label] < CLAIMS_PER_LABEL and row not in out:
                    out.append(row)
                    counts[label] += 1
    rng.shuffle(out)
    return out
