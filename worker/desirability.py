"""A KTO row's label: is its completion desirable? One reading, shared by the KTO recipe and the
web side's data checks (webapp/datasets/checks/kto.py). Pure Python: no torch, no Django.

The parser writes every label as text, JSON booleans as "true" / "false"; other files say 1 / 0,
desirable / undesirable, good / bad or yes / no. Case and surrounding whitespace do not matter.
"""

from __future__ import annotations

DESIRABLE = ("true", "1", "desirable", "good", "yes")
UNDESIRABLE = ("false", "0", "undesirable", "bad", "no")
ACCEPTED = "true/false, 1/0, desirable/undesirable, good/bad or yes/no"
"""The labels read, for messages."""


def is_desirable(label: str) -> bool | None:
    """True for a desirable completion, False for an undesirable one, None for a label that says neither."""
    word = label.strip().lower()
    if word in DESIRABLE:
        return True
    if word in UNDESIRABLE:
        return False
    return None
