"""Is this data usable for preference tuning (KTO)? Pure Python, one pass, bounded memory.

Rows are canonical {"prompt", "completion", "label", optional "system"}; a multi-turn prompt is
{"prompt_messages"} instead of "prompt" (worker.conversations). The label is text (the parser
writes JSON booleans as "true" / "false"), read by worker.desirability as the recipe reads it.
The data is refused when:
- it has no rows;
- a prompt, completion or label is missing or empty (the recipe would stop at that row);
- a label says neither desirable nor undesirable ("maybe", "3"): which way the row should move
  the model is unknown, and guessing would train it the wrong way;
- every label is of one kind: KTO learns from the contrast between the two kinds (with only
  desirable completions, instruction tuning is the task).
"""

from __future__ import annotations

from collections.abc import Iterable

from webapp.datasets.checks import is_text, quote
from worker.desirability import ACCEPTED, is_desirable

EXAMPLES = 3  # how many offending rows a message quotes
ANSWER_FIELDS = ("completion", "label")


def check(rows: Iterable[dict]) -> list[str]:
    """Human-readable problems that make `rows` unusable for KTO; empty when usable."""
    count = 0
    missing: list[str] = []
    missing_count = 0
    unreadable: list[str] = []
    unreadable_count = 0
    kinds = {True: 0, False: 0}
    for number, row in enumerate(rows, start=1):
        count += 1
        has_prompt = bool(row.get("prompt_messages")) or is_text(row.get("prompt"))
        if not has_prompt or not all(is_text(row.get(name)) for name in ANSWER_FIELDS):
            missing_count += 1
            if len(missing) < EXAMPLES:
                missing.append(f"row {number}")
            continue
        desirable = is_desirable(row["label"])
        if desirable is None:
            unreadable_count += 1
            if len(unreadable) < EXAMPLES:
                unreadable.append(f"row {number} ({quote(row['label'])})")
            continue
        kinds[desirable] += 1

    if count == 0:
        return ["The dataset has no rows."]
    problems = []
    if missing_count:
        problems.append(f"{missing_count} row(s) lack a prompt, a completion or a label, e.g. {', '.join(missing)}.")
    if unreadable_count:
        problems.append(
            f"{unreadable_count} row(s) have a label that says neither desirable nor undesirable, e.g. "
            f"{', '.join(unreadable)}. A KTO label is one of {ACCEPTED}."
        )
    if kinds[True] + kinds[False] and not (kinds[True] and kinds[False]):
        kind = "desirable" if kinds[True] else "undesirable"
        problems.append(
            f"Every labelled row is {kind}. KTO learns from completions of both kinds: add rows of the other "
            "kind, or train on the desirable completions with instruction tuning."
        )
    return problems
