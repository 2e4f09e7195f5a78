"""Plain-text documents as dataset records: a .txt or .md file is one document, a .zip holds many.

Domain adaptation trains on raw text. parsing.py turns each document this module reads into one
canonical record {"text": ...} whose line is the document's number. Pure Python, no Django.

A zip is read member by member straight from the archive, in chunks (zipfile.ZipFile.open), and
never extracted, so no name in it is ever used as a path. What the members inflate to is counted
while they are read: the sizes the zip's headers claim are not trusted. It is refused, with the
member named, when:
- a name would leave the folder it were extracted to (a `..` part, an absolute name, a drive letter);
- its index lists more than MAX_MEMBERS entries, or is larger than MAX_INDEX_BYTES;
- it inflates past the dataset's limit on decoded text, or a member inflates more than
  MOST_COMPRESSION times its packed size beyond BOMB_BYTES (a zip bomb: real text compresses
  perhaps tenfold);
- a member is binary (a NUL byte, or bytes that are not UTF-8; the offset is given), is a zip
  itself, is encrypted, or is packed with a method Python cannot read.
Directories, macOS's __MACOSX/ folder and dot-files (.DS_Store, .git/...) are skipped: they are not
the user's documents. Any other member that is not .txt or .md is a row problem ("skipped"), so
the user sees which files were not used.

A document longer than `max_document_chars` is split at a line break into parts of at most that
many characters, each a record with the document's number: a part is still far longer than a
training sequence, and those are cut from the packed documents anyway.
"""

from __future__ import annotations

import codecs
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO

DOCUMENT_FORMATS = ("text", "zip")
"""The formats (parsing._EXTENSIONS) this module reads."""
SUFFIXES = (".txt", ".md")
MAX_MEMBERS = 10_000
MAX_INDEX_BYTES = 16 << 20
"""The zip's central directory is read whole by zipfile; real ones of MAX_MEMBERS files are ~1 MB."""
BOMB_BYTES = 8 << 20
MOST_COMPRESSION = 100
_CHUNK = 64 << 10
_END_OF_INDEX = b"PK\x05\x06"
_ZIP_MAGIC = b"PK\x03\x04"
_READABLE_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError)


class DocumentError(ValueError):
    """A problem with the whole upload; the message is shown to the user as is."""


@dataclass(frozen=True)
class Document:
    number: int
    """1-based, counting the files that are not skipped."""
    name: str
    """How messages name it: "The file", or the member's name in the zip."""
    text: str
    problem: str = ""
    """Why this member gave no text (then `text` is empty)."""
    kind: str = ""
    """The problem's kind, as the parse report counts it."""


def read_documents(fmt: str, path: str | os.PathLike, max_document_chars: int, max_decoded_bytes: int) -> Iterator[Document]:
    """The documents of the file at `path` ("text": one; "zip": each member); DocumentError for a
    problem with the whole upload."""
    if fmt == "text":
        with open(path, "rb") as f:
            meter = _Meter("the file", 0, 0, max_decoded_bytes)
            yield from _documents_of(f, 1, "The file", max_document_chars, meter)
        return
    yield from _zip_documents(path, max_document_chars, max_decoded_bytes)


def declared_size(path: str | os.PathLike) -> int:
    """What the zip's headers say its members inflate to (0 when they cannot be read), so that a
    small zip of much text is read on the queue, not in the request; reading counts the real bytes."""
    try:
        _check_index(path)
        with zipfile.ZipFile(path) as archive:
            return sum(info.file_size for info in archive.infolist())
    except (DocumentError, *_READ_ERRORS):
        return 0


# Zips -----------------------------------------------------------------------------------------


def _zip_documents(path: str | os.PathLike, max_document_chars: int, max_decoded_bytes: int) -> Iterator[Document]:
    _check_index(path)
    try:
        archive = zipfile.ZipFile(path)
    except _READ_ERRORS as error:
        raise DocumentError(f"The zip could not be read: {error}.") from None
    with archive:
        members = archive.infolist()
        for info in members:
            _check_name(info.filename)
        number, inflated = 0, 0
        for info in members:
            if _skipped(info):
                continue
            number += 1
            if not info.filename.lower().endswith(SUFFIXES):
                yield _not_a_document(number, info.filename)
                continue
            meter = _Meter(info.filename, info.compress_size, inflated, max_decoded_bytes)
            try:
                with archive.open(_readable(info)) as member:
                    yield from _documents_of(member, number, info.filename, max_document_chars, meter)
            except _READ_ERRORS as error:
                raise DocumentError(f"{info.filename} in the zip could not be read: {error}.") from None
            inflated += meter.read
    if number == 0:
        raise DocumentError(
            f"The zip holds no .txt or .md documents: its {len(members)} entries are folders or hidden files."
        )


def _check_index(path: str | os.PathLike) -> None:
    """Refuse, from the end of the file alone, a zip whose index lists too many entries or is too
    large: zipfile reads the whole index into memory before anything else."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(max(0, size - 22 - 0xFFFF))  # the end record (22 bytes) and a comment of up to 64 KiB
        tail = f.read()
    at = tail.rfind(_END_OF_INDEX)
    if at < 0 or len(tail) - at < 22:
        raise DocumentError("The .zip file is not a zip archive, or it is cut short: its index at the end is missing.")
    entries, index_bytes = struct.unpack_from("<HL", tail, at + 10)
    if entries > MAX_MEMBERS:  # 0xFFFF: a zip64 archive of at least that many
        raise DocumentError(
            f"The zip holds {entries:,} entries or more; at most {MAX_MEMBERS:,} are read. Split it into several zips."
        )
    if index_bytes > MAX_INDEX_BYTES:
        raise DocumentError(
            f"The zip's index is {index_bytes:,} bytes, more than {MAX_INDEX_BYTES:,} for at most {MAX_MEMBERS:,} "
            "entries. Make the zip again with the documents alone."
        )


def _check_name(name: str) -> None:
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or name[1:2] == ":" or ".." in parts:
        raise DocumentError(
            f"The zip holds '{name}', a name that points outside the folder it would be unpacked in "
            "(an absolute path, a drive letter or '..'). Zip the documents again from inside their folder."
        )


def _skipped(info: zipfile.ZipInfo) -> bool:
    """Directories, macOS's resource forks and hidden files: never the user's documents."""
    parts = PurePosixPath(info.filename).parts
    return info.is_dir() or any(part.startswith(".") or part == "__MACOSX" for part in parts)


def _not_a_document(number: int, name: str) -> Document:
    if name.lower().endswith(".zip"):
        raise DocumentError(f"{name} is a zip inside the zip; put its documents in the outer zip instead.")
    return Document(number, name, "", f"{name} is not a .txt or .md document, so it was skipped", "not a document")


def _readable(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    if info.flag_bits & 0x1:
        raise DocumentError(f"{info.filename} in the zip is encrypted; zip the documents without a password.")
    if info.compress_type not in _READABLE_METHODS:
        raise DocumentError(
            f"{info.filename} in the zip is packed with a method that cannot be read here (method "
            f"{info.compress_type}); zip it again with the usual Deflate."
        )
    return info


class _Meter:
    """Counts the bytes a document inflates to as they are read, and stops a zip bomb."""

    def __init__(self, name: str, packed: int, before: int, limit: int):
        self.name, self.packed, self.before, self.limit = name, packed, before, limit
        self.read = 0

    def add(self, size: int) -> None:
        self.read += size
        if self.before + self.read > self.limit:
            raise DocumentError(
                f"The upload unpacks to more than {self.limit:,} bytes of text (by {self.name}), the limit for one "
                "dataset. Upload fewer documents, or split them into several datasets."
            )
        if self.packed and self.read > BOMB_BYTES and self.read > MOST_COMPRESSION * self.packed:
            raise DocumentError(
                f"{self.name} in the zip: {self.packed:,} bytes inflate to more than {self.read:,}, over "
                f"{self.read // self.packed:,} times as many. Real text does not compress like that, so the zip "
                "is refused (a zip bomb?)."
            )


# Reading one document -------------------------------------------------------------------------


def _documents_of(stream: IO[bytes], number: int, name: str, max_chars: int, meter: _Meter) -> Iterator[Document]:
    """The document's text in parts of at most max_chars; a problem Document when it is empty."""
    empty = True
    for part in _parts(stream, name, max_chars, meter):
        if part.strip():
            empty = False
            yield Document(number, name, part)
    if empty:
        yield Document(number, name, "", f"{name} is empty", "empty document")


def _parts(stream: IO[bytes], name: str, max_chars: int, meter: _Meter) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, pending = 0, ""
    while True:
        data = stream.read(_CHUNK)
        meter.add(len(data))
        _refuse_binary(data, offset, name)
        text = _decode(decoder, data, offset, name)
        pending += text.removeprefix("\ufeff") if offset == 0 else text
        offset += len(data)
        while len(pending) > max_chars:
            cut = pending.rfind("\n", 0, max_chars) + 1 or max_chars
            yield pending[:cut]
            pending = pending[cut:]
        if not data:
            yield pending
            return


def _refuse_binary(data: bytes, offset: int, name: str) -> None:
    if offset == 0 and data.startswith(_ZIP_MAGIC):
        raise DocumentError(f"{name} is a zip archive, not text; put its documents in the upload instead.")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise DocumentError(
            f"{name} is binary, not text: it has a NUL byte at offset {offset + nul:,}. Upload plain text "
            "documents (.txt, .md) saved as UTF-8."
        )


def _decode(decoder: codecs.IncrementalDecoder, data: bytes, offset: int, name: str) -> str:
    try:
        return decoder.decode(data, final=not data)
    except UnicodeDecodeError as error:
        carried = len(error.object) - len(data)  # bytes of a character split across chunks
        at = offset - carried + error.start
        raise DocumentError(
            f"{name} is not UTF-8 text: byte 0x{error.object[error.start]:02X} at offset {at:,} is not valid "
            "UTF-8. Save it as UTF-8 and upload it again."
        ) from None
