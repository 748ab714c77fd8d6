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
    file_fields, text_fields = set(file_fields), set(text_fields)
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise ServiceError(400, "the request must be multipart/form-data (an HTML form with files)")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise ServiceError(413, f"the upload is {int(length) / 2**20:.1f} MiB, more than this server's limit of "
                                f"{max_bytes / 2**20:g} MiB (--max-upload-mb)")
    directory.mkdir(parents=True)
    form = Form(directory)
    state: dict = {"headers": {}, "name": None, "header": b"", "value": b"", "sink": None, "text": None,
                   "error": None}

    def fail(status: int, message: str, name: Optional[str] = None) -> None:
        if state["error"] is None:
            state["error"] = ServiceError(status, message, name)

    def on_part_begin():
        state["headers"] = {}
        state["header"], state["value"] = b"", b""

    def on_header_field(data, start, end):
        state["header"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        state["headers"][state["header"].decode("latin-1").lower()] = state["value"]
        state["header"], state["value"] = b"", b""

    def on_headers_finished():
        disposition, p = parse_options_header(state["headers"].get("content-disposition", b""))
        name = p.get(b"name", b"").decode("utf-8", "replace")
        state["name"] = name
        is_file = b"filename" in p
        if name in form.fields or name in form.files:
            return fail(400, f"field '{name}' is given twice", name)
        if name in file_fields:
            if not is_file:
                return fail(422, f"field '{name}' must be a file upload", name)
            upload = Upload(name, display_name(p[b"filename"].decode("utf-8", "replace"), name), directory / name)
            form.files[name] = upload
            state["sink"] = open(upload.path, "wb")
        elif name in text_fields:
            if is_file:
                return fail(422, f"field '{name}' must be a value, not a file", name)
            state["text"] = bytearray()
        else:
            known = ", ".join(sorted(file_fields | text_fields))
            fail(422, f"unknown field '{name}' (this endpoint takes {known})", name)

    def on_part_data(data, start, end):
        if state["error"] is not None:
            return
        if state["sink"] is not None:
            state["sink"].write(data[start:end])
            form.files[state["name"]].size += end - start
        elif state["text"] is not None:
            state["text"] += data[start:end]
            if len(state["text"]) > MAX_TEXT_FIELD:
                fail(422, f"field '{state['name']}' is longer than {MAX_TEXT_FIELD} bytes", state["name"])

    def on_part_end():
        if state["sink"] is not None:
            state["sink"].close()
            state["sink"] = None
        if state["text"] is not None and state["error"] is None:
            try:
                form.fields[state["name"]] = state["text"].decode("utf-8").strip()
            except UnicodeDecodeError:
                fail(422, f"field '{state['name']}' is not UTF-8 text", state["name"])
        state["text"] = None

    callbacks = dict(on_part_begin=on_part_begin, on_header_field=on_header_field,
                     on_header_value=on_header_value, on_header_end=on_header_end,
                     on_headers_finished=on_headers_finished, on_part_data=on_part_data, on_part_end=on_part_end)
    parser = MultipartParser(params[b"boundary"], callbacks)
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise ServiceError(413, f"the upload is more than this server's limit of {max_bytes / 2**20:g} MiB "
                                        "(--max-upload-mb)")
            try:
                parser.write(chunk)
            except Exception as e:  # python-multipart's MultipartParseError and its kin
                raise ServiceError(400, f"malformed multipart body ({e})") from None
            if state["error"] is not None:
                raise state["error"]
        parser.finalize()
        if state["error"] is not None:
            raise state["error"]
        if state["sink"] is not None:
            raise ServiceError(400, "the multipart body ended inside a file (truncated upload)")
    except BaseException:
        if state["sink"] is not None:
            state["sink"].close()
        form.discard()
        raise
    return form


def replace_path(message: str, path: Path, display: str) -> str:
    """``message`` with the server's file path replaced by what the client called the file."""
    for text in (str(path), os.fspath(path.resolve())):
        message = message.replace(text, display)
    return message
