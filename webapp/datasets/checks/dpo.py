"""Is this data usable for preference tuning (DPO)? Pure Python, one pass, bounded memory.

Rows are canonical {"prompt", "chosen", "rejected", optional "system"}; a multi-turn prompt is
{"prompt_messages"} instead of "prompt" (worker.conversations). The data is refused when:
- it has no rows;
- a prompt, chosen or rejected answer is missing or empty (the recipe would stop at that row);
- more than half of the rows have the same chosen and rejected answer (compared with surrounding
  whitespace trimmed). Such a pair states no preference: its loss is the same whatever the model
  does, so it teaches nothing. A few of them are harmless, but most rows being so means the
  columns were mapped wrongly (chosen and rejected read from the same column) or the file was
  built wrongly, and the training would learn nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from webapp.datasets.checks import is_text, quote

EXAMPLES = 3  # how many offending rows a message quotes
ANSWERS = ("chosen", "rejected")


def check(rows: Iterable[dict]) -> list[str]:
    """Human-readable problems that make `rows` unusable for DPO; empty when usable."""
    count = 0
    missing: list[str] = []
    missing_count = 0
    same: list[str] = []
    same_count = 0
    for number, row in enumerate(rows, start=1):
        count += 1
        has_prompt = bool(row.get("prompt_messages")) or is_text(row.get("prompt"))
        if not has_prompt or not all(is_text(row.get(name)) for name in ANSWERS):
            missing_count += 1
            if len(missing) < EXAMPLES:
                missing.append(f"row {number}")
            continue
        if row["chosen"].strip() == row["rejected"].strip():
            same_count += 1
            if len(same) < EXAMPLES:
                same.append(f"row {number} ({quote(row['chosen'])})")

    if count == 0:
        return ["The dataset has no rows."]
    problems = []
    if missing_count:
        problems.append(
            f"{missing_count} row(s) lack a prompt, a chosen or a rejected answer, e.g. {', '.join(missing)}."
        )
    usable = count - missing_count
    if usable and same_count * 2 > usable:
        everywhere = "Every row has" if same_count == usable else f"{same_count} of {usable} rows have"
        problems.append(
            f"{everywhere} the same chosen and rejected answer, e.g. {', '.join(same)}. Such a pair states no "
            "preference, so there is little or nothing to learn. Check that chosen and rejected come from "
            "different columns."
        )
    return problems
