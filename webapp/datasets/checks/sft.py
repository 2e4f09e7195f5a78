"""Is this data usable for instruction tuning (SFT)? Pure Python, one pass, bounded memory.

Rows are canonical {"instruction", "response", optional "system", optional "input"}, or a
conversation {"messages", optional "tools"} (worker.conversations). The data is refused when:
- it has no rows;
- an instruction or response is missing or empty, or a conversation does not end with an
  assistant turn (the recipe would stop at that row);
- every row (two or more) has the same response (a conversation's last reply), compared with surrounding whitespace trimmed:
  the model would learn to give that one answer whatever it is asked, which is almost always a
  wrongly mapped column.
Repeated instructions with different responses are not refused: noisy, but trainable.
"""

from __future__ import annotations

from collections.abc import Iterable

from webapp.datasets.checks import is_text, quote
from worker.conversations import reply_text

EXAMPLES = 3  # how many offending rows a message quotes


def check(rows: Iterable[dict]) -> list[str]:
    """Human-readable problems that make `rows` unusable for instruction tuning; empty when usable."""
    count = 0
    missing: list[str] = []
    missing_count = 0
    first_response: str | None = None
    same_response = True
    for number, row in enumerate(rows, start=1):
        count += 1
        if "messages" in row:
            instruction, response = _conversation_ends(row["messages"])
        else:
            instruction, response = row.get("instruction"), row.get("response")
        if not is_text(instruction) or not is_text(response):
            missing_count += 1
            if len(missing) < EXAMPLES:
                missing.append(f"row {number}")
            continue
        if first_response is None:
            first_response = response.strip()
        same_response = same_response and response.strip() == first_response

    if count == 0:
        return ["The dataset has no rows."]
    problems = []
    if missing_count:
        problems.append(f"{missing_count} row(s) have no instruction or no response text, e.g. {', '.join(missing)}.")
    if count - missing_count >= 2 and same_response:
        problems.append(
            f"Every row has the same response ({quote(first_response)}); the model would learn to give "
            "that answer to everything. Check that the response column holds each row's own answer."
        )
    return problems


def _conversation_ends(messages: object) -> tuple[str | None, str | None]:
    """(the first user text, the last reply as trained) of a conversation; None where missing."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return None, None
    user = next((m.get("content") for m in messages if m.get("role") == "user"), None)
    last = messages[-1]
    return user, reply_text(last) if last.get("role") == "assistant" else None
