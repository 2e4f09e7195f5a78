"""OpenAI's cursor paging: newest first (or `order=asc`), `after` the id of the last object of the
previous page, `limit`, and `has_more`, which the official client's auto-paging follows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db.models import QuerySet
from django.http import HttpRequest, JsonResponse

from webapp.api.auth import error


class PagingError(Exception):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.message, self.param = message, param

    def response(self) -> JsonResponse:
        return error(400, self.message, param=self.param)


@dataclass
class Page:
    items: list
    has_more: bool

    def body(self, data: list[dict[str, Any]]) -> dict[str, Any]:
        return {"object": "list", "data": data, "has_more": self.has_more,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def page_of(request: HttpRequest, rows: QuerySet, prefix: str, *, key: str = "id", order_param: bool = False,
            default_limit: int = 20, max_limit: int = 100) -> Page:
    """One page of `rows`, ordered by `key` (an increasing integer: a primary key or a sequence
    number) newest first, ids written as `prefix` + key."""
    limit = _limit(request.GET.get("limit"), default_limit, max_limit)
    order = request.GET.get("order", "desc") if order_param else "desc"
    if order not in ("asc", "desc"):
        raise PagingError(f"order must be 'asc' or 'desc' (got '{order[:20]}').", "order")
    after = request.GET.get("after")
    if after:
        number = after.removeprefix(prefix)
        if not after.startswith(prefix) or not number.isdigit():
            raise PagingError(f"after must be the id of an object of the previous page ({prefix}...), "
                              f"got '{after[:60]}'.", "after")
        rows = rows.filter(**{f"{key}__{'lt' if order == 'desc' else 'gt'}": int(number)})
    found = list(rows.order_by(f"-{key}" if order == "desc" else key)[: limit + 1])
    return Page(found[:limit], len(found) > limit)


def _limit(value: str | None, default: int, most: int) -> int:
    if value in (None, ""):
        return default
    if not value.isdigit() or not 1 <= int(value) <= most:
        raise PagingError(f"limit must be a whole number from 1 to {most} (got '{value[:20]}').", "limit")
    return int(value)
