"""Sample data for text-pair classification: is a claim supported by its context?

Faithfulness checking, the kind a retrieval-augmented assistant needs: text_a is a claim about
a (fictional) company, text_b a short profile of that company, and the label says whether the
profile backs the claim ("supported") or not ("unsupported"). An unsupported claim states one
fact differently from the profile: another founding year, city, founder, product or size, all
taken from the same lists, so no word is a giveaway on its own. Telling them apart takes
comparing the claim with the profile. Half the claims are supported. Deterministic; pure Python.
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
PRODUCTS = ["bicycles", "hearing aids", "garden tools", "solar lamps", "board games", "rain jackets", "espresso machines"]
YEARS = [str(year) for year in range(1952, 2020, 3)]
SIZES = ["40", "120", "350", "900", "2,500", "6,000"]

PROFILE = [
    "{company} was founded in {year} by {founder}.",
    "The company is based in {city}.",
    "It is best known for its {product}.",
    "Today it employs about {size} people.",
]
CLAIMS = {
    "year": ["{company} was founded in {year}.", "{company} has existed since {year}."],
    "founder": ["{founder} founded {company}.", "{company} was started by {founder}."],
    "city": ["{company} has its headquarters in {city}.", "{company} is a company from {city}."],
    "product": ["{company} makes {product}.", "{company}'s best-known products are {product}."],
    "size": ["{company} has around {size} employees.", "About {size} people work at {company}."],
}
CHOICES = {"year": YEARS, "founder": FOUNDERS, "city": CITIES, "product": PRODUCTS, "size": SIZES}
CLAIMS_PER_LABEL = 6
"""Supported and unsupported claims per company, each from a different claim template."""


def rows() -> list[dict[str, str]]:
    """288 distinct claims (12 per company, half supported), each with its company's profile."""
    rng = random.Random(0)
    templates = [(field, template) for field in CLAIMS for template in CLAIMS[field]]
    out = []
    for company in COMPANIES:
        facts = {"company": company} | {field: rng.choice(values) for field, values in CHOICES.items()}
        first, *rest = [sentence.format(**facts) for sentence in PROFILE]
        rng.shuffle(rest)  # the first sentence names the company; the others come in any order
        profile = " ".join([first, *rest])
        for label in ("supported", "unsupported"):
            for field, template in rng.sample(templates, CLAIMS_PER_LABEL):
                stated = dict(facts)
                if label == "unsupported":
                    stated[field] = rng.choice([value for value in CHOICES[field] if value != facts[field]])
                out.append({"text_a": template.format(**stated), "text_b": profile, "label": label})
    rng.shuffle(out)
    return out
