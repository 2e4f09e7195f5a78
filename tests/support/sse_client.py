"""A minimal Server-Sent Events reader for tests (what a browser's EventSource does)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import requests


def read_events(http: requests.Session, url: str, last_event_id: int | None = None, after: int | None = None,
                timeout: float = 120) -> Iterator[dict]:
    """Yield each event's data (with "seq" from its id) until the server sends `end`."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    params = {"after": after} if after is not None else None
    with http.get(url, headers=headers, params=params, stream=True, timeout=timeout) as reply:
        reply.raise_for_status()
        assert reply.headers["Content-Type"].startswith("text/event-stream")
        kind, data = "message", []
        for line in reply.iter_lines(decode_unicode=True):
            if line.startswith(":"):
                continue
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and data:
                if kind == "end":
                    return
                event = json.loads("\n".join(data))
                yield event
                kind, data = "message", []
