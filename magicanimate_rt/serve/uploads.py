"""Multipart uploads streamed to files under the data directory, and sniffed by content.

We parse the body ourselves with python-multipart's streaming ``MultipartParser`` rather than
Starlette's ``Request.form()``: Starlette spools each file to a ``SpooledTemporaryFile``
(memory up to 1 MiB, then the system temp dir), and we want every byte on disk under
``--data-dir`` as it arrives, the byte limit enforced while reading (413 at the first byte
too many, not after the whole body), and text fields bounded.

The client's file names are kept only to name the file in error messages; files are stored
as ``<incoming>/<field>`` whatever the client called them, so no name becomes a path.
"""

from __future__ import annotations

import os
import re
import shutil
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from python_multipart.multipart import MultipartParser, parse_options_header

from .errors import ServiceError

#: the longest text field we accept (numbers and ids are far shorter)
MAX_TEXT_FIELD = 1024


@dataclass
class Upload:
    field: str
    display: str  #: the client's file name, cleaned, for messages only
    path: Path
    size: int = 0


@dataclass
class Form:
    directory: Path  #: where the files are; the caller moves or deletes it
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, Upload] = field(default_factory=dict)

    def discard(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def display_name(filename: Optional[str], fallback: str) -> str:
    """A file name safe to show: its last path component, printable, at most 80 characters."""
    if not filename:
        return fallback
    name = re.split(r"[\\/]", filename)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] not in "CZ" or c == " ").strip()
    return (name[:77] + "...") if len(name) > 80 else (name or fallback)


async def read_form(request, directory: Path, max_bytes: int, file_fields: Iterable[str],
                    text_fields: Iterable[str]) -> Form:
    """Stream the multipart body of ``request`` into ``directory`` (created here; deleted on
    any error). Only the named fields are accepted; a file field's part goes to
    ``directory/<field>``. Raises ServiceError: 400 (not multipart, malformed, a field
    twice), 413 (more than ``max_bytes``), 422 (unknown field, a file where text belongs
    or the reverse, a text field too long)."""
    boundary = _boundary(request.headers, max_bytes)
    directory.mkdir(parents=True)
    parts = _Parts(Form(directory), set(file_fields), set(text_fields))
    parser = MultipartParser(boundary, parts.callbacks())
    try:
        await _feed(request, parser, parts, max_bytes)
    except BaseException:
        parts.close_sink()
        parts.form.discard()
        raise
    return parts.form


def _boundary(headers, max_bytes: int) -> bytes:
    """The multipart boundary of a request with these headers; 400 if it is not multipart,
    413 if its declared length is over ``max_bytes``."""
    ctype, params = parse_options_header(headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise ServiceError(400, "the request must be multipart/form-data (an HTML form with files)")
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise ServiceError(413, f"the upload is {int(length) / 2**20:.1f} MiB, more than this server's limit of "
                                f"{max_bytes / 2**20:g} MiB (--max-upload-mb)")
    return params[b"boundary"]


async def _feed(request, parser: MultipartParser, parts: "_Parts", max_bytes: int) -> None:
    """The body into ``parser`` chunk by chunk: 413 at the first byte over ``max_bytes``, the
    first problem a part met raised as soon as it is met, 400 for a body cut inside a file."""
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise ServiceError(413, f"the upload is more than this server's limit of {max_bytes / 2**20:g} MiB "
                                    "(--max-upload-mb)")
        try:
            parser.write(chunk)
        except Exception as e:  # python-multipart's MultipartParseError and its kin
            raise ServiceError(400, f"malformed multipart body ({e})") from None
        parts.raise_error()
    parser.finalize()
    parts.raise_error()
    if parts.sink is not None:
        raise ServiceError(400, "the multipart body ended inside a file (truncated upload)")


class _Parts:
    """python-multipart's callbacks for one body: each part's headers read, a file part
    written to ``form.directory/<field>``, a text part collected (bounded) into
    ``form.fields``. The first problem is kept in ``error`` (the parser's callbacks cannot
    raise through it cleanly) and later parts are then ignored."""

    def __init__(self, form: Form, file_fields: set[str], text_fields: set[str]):
        self.form, self.file_fields, self.text_fields = form, file_fields, text_fields
        self.headers: dict[str, bytes] = {}
        self.name: Optional[str] = None
        self.header, self.value = b"", b""
        self.sink = None  #: the open file of the file part being read
        self.text: Optional[bytearray] = None  #: the text part being read
        self.error: Optional[ServiceError] = None

    def callbacks(self) -> dict:
        return dict(on_part_begin=self.on_part_begin, on_header_field=self.on_header_field,
                    on_header_value=self.on_header_value, on_header_end=self.on_header_end,
                    on_headers_finished=self.on_headers_finished, on_part_data=self.on_part_data,
                    on_part_end=self.on_part_end)

    def fail(self, status: int, message: str, name: Optional[str] = None) -> None:
        if self.error is None:
            self.error = ServiceError(status, message, name)

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def close_sink(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink = None

    def on_part_begin(self):
        self.headers = {}
        self.header, self.value = b"", b""

    def on_header_field(self, data, start, end):
        self.header += data[start:end]

    def on_header_value(self, data, start, end):
        self.value += data[start:end]

    def on_header_end(self):
        self.headers[self.header.decode("latin-1").lower()] = self.value
        self.header, self.value = b"", b""

    def on_headers_finished(self):
        _, p = parse_options_header(self.headers.get("content-disposition", b""))
        name = self.name = p.get(b"name", b"").decode("utf-8", "replace")
        is_file = b"filename" in p
        form = self.form
        if name in form.fields or name in form.files:
            return self.fail(400, f"field '{name}' is given twice", name)
        if name in self.file_fields:
            if not is_file:
                return self.fail(422, f"field '{name}' must be a file upload", name)
            upload = Upload(name, display_name(p[b"filename"].decode("utf-8", "replace"), name),
                            form.directory / name)
            form.files[name] = upload
            self.sink = open(upload.path, "wb")
        elif name in self.text_fields:
            if is_file:
                return self.fail(422, f"field '{name}' must be a value, not a file", name)
            self.text = bytearray()
        else:
            known = ", ".join(sorted(self.file_fields | self.text_fields))
            self.fail(422, f"unknown field '{name}' (this endpoint takes {known})", name)

    def on_part_data(self, data, start, end):
        if self.error is not None:
            return
        if self.sink is not None:
            self.sink.write(data[start:end])
            self.form.files[self.name].size += end - start
        elif self.text is not None:
            self.text += data[start:end]
            if len(self.text) > MAX_TEXT_FIELD:
                self.fail(422, f"field '{self.name}' is longer than {MAX_TEXT_FIELD} bytes", self.name)

    def on_part_end(self):
        self.close_sink()
        if self.text is not None and self.error is None:
            try:
                self.form.fields[self.name] = self.text.decode("utf-8").strip()
            except UnicodeDecodeError:
                self.fail(422, f"field '{self.name}' is not UTF-8 text", self.name)
        self.text = None


def replace_path(message: str, path: Path, display: str) -> str:
    """``message`` with the server's file path replaced by what the client called the file."""
    for text in (str(path), os.fspath(path.resolve())):
        message = message.replace(text, display)
    return message
