"""A file download streamed from disk in chunks, with HTTP Range.

Not FileResponse: under ASGI Django reads a synchronous file iterator into a list before the
first byte goes out, so a 1 GiB artifact cost the web process 2 GiB of memory. Here an async
generator reads one chunk at a time off the event loop, and the server sends it before the next
is read (uvicorn waits while the client's socket is full). Range lets an interrupted download
resume: one range is served (206); several, or one that does not parse, get the whole file.
"""

from __future__ import annotations

import asyncio
import mimetypes
import re
from collections.abc import AsyncIterator
from pathlib import Path

from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.utils.http import content_disposition_header

CHUNK_BYTES = 1024 * 1024
_SINGLE_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")


class RangeNotSatisfiable(ValueError):
    """The range starts past the end of the file."""


def file_download(request: HttpRequest, path: Path, filename: str) -> HttpResponse:
    """`path` as an attachment named `filename`: 200 whole, 206 one range, 416 past the end."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:  # deleted since the caller looked
        raise Http404("The file is gone.") from None
    try:
        wanted = requested_range(request.headers.get("Range", ""), size)
    except RangeNotSatisfiable:
        return _range_not_satisfiable(size)
    first, last = wanted or (0, size - 1)
    content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    response = StreamingHttpResponse(read_chunks(path, first, last - first + 1), content_type=content_type,
                                     status=206 if wanted else 200)
    if wanted:
        response["Content-Range"] = f"bytes {first}-{last}/{size}"
    response["Content-Length"] = str(last - first + 1)
    response["Content-Disposition"] = content_disposition_header(as_attachment=True, filename=filename)
    response["Accept-Ranges"] = "bytes"
    return response


def _range_not_satisfiable(size: int) -> HttpResponse:
    response = HttpResponse("The requested range is past the end of the file.", status=416, content_type="text/plain")
    response["Content-Range"] = f"bytes */{size}"
    return response


def requested_range(header: str, size: int) -> tuple[int, int] | None:
    """The (first, last) byte positions of a single `bytes=` range, clipped to the file.

    None for no header, a malformed one or several ranges (the whole file is the answer, as
    RFC 9110 allows); RangeNotSatisfiable for a range that selects nothing of the file.
    """
    match = _SINGLE_RANGE.fullmatch(header.strip())
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if not first:  # bytes=-n: the last n bytes
        if int(last) == 0 or size == 0:
            raise RangeNotSatisfiable(header)
        return max(0, size - int(last)), size - 1
    if last and int(last) < int(first):
        return None
    if int(first) >= size:
        raise RangeNotSatisfiable(header)
    return int(first), (min(int(last), size - 1) if last else size - 1)


async def read_chunks(path: Path, offset: int, length: int) -> AsyncIterator[bytes]:
    """`length` bytes of the file from `offset`, CHUNK_BYTES at a time, read in a thread."""
    file = await asyncio.to_thread(path.open, "rb")
    try:
        await asyncio.to_thread(file.seek, offset)
        while length > 0:
            chunk = await asyncio.to_thread(file.read, min(CHUNK_BYTES, length))
            if not chunk:  # the file shrank; Content-Length promised more, the client sees it short
                return
            length -= len(chunk)
            yield chunk
    finally:
        file.close()
