"""Receive a multipart upload by streaming it straight to a temporary file under the artifact root.

Starlette's form parser would spool the whole file to the system temp folder before any size check; this parser
counts bytes as they arrive, stops at the limit with 413, hashes while writing, and keeps only small text fields
in memory. Disk writes and hashing happen in a worker thread so the event loop keeps serving other requests.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from core.errors import InvalidRequest, PayloadTooLarge, ValidationFailed

MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 16
# Headers and boundaries around the file; a Content-Length above the file limit plus this is refused unread.
MULTIPART_OVERHEAD = 64 * 1024
FILE_FIELD = "file"


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)


@dataclass
class Upload:
    path: Path
    filename: str
    size: int
    sha256: str
    fields: dict[str, str]

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


class _Receiver:
    def __init__(self, tmp_path: Path, max_file_bytes: int) -> None:
        self.tmp_path = tmp_path
        self.max_file_bytes = max_file_bytes
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.size = 0
        self.digest = hashlib.sha256()
        self.pending: list[bytes] = []
        self.handle: IO[bytes] | None = None
        self._part = _Part()
        self._parts = 0
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""

    # Callbacks of python-multipart's push parser; they run inside parser.write() and must not block.
    def on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise InvalidRequest(f"At most {MAX_PARTS} form fields are accepted.", code="too_many_fields")
        self._part = _Part()
        self._disposition = b""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        if name is None:
            raise InvalidRequest("Every form part needs a Content-Disposition name.", code="invalid_multipart")
        self._part.name = name.decode("utf-8", errors="replace")
        if self._part.name == FILE_FIELD:
            if self.filename is not None:
                raise ValidationFailed("Send exactly one file.", param=FILE_FIELD, code="too_many_files")
            raw_name = options.get(b"filename")
            if raw_name is None:
                raise ValidationFailed("The 'file' field must be a file part (with a filename).", param=FILE_FIELD)
            self.filename = raw_name.decode("utf-8", errors="replace")
            self._part.filename = self.filename
        elif self._part.name in self.fields:
            raise ValidationFailed(f"'{self._part.name}' was sent twice.", param=self._part.name)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._part.filename is not None:
            self.size += len(chunk)
            if self.size > self.max_file_bytes:
                raise PayloadTooLarge(
                    f"The file is larger than the limit of {self.max_file_bytes} bytes.", param=FILE_FIELD
                )
            self.pending.append(chunk)
            return
        if len(self._part.data) + len(chunk) > MAX_FIELD_BYTES:
            raise PayloadTooLarge(
                f"The form field '{self._part.name}' is larger than {MAX_FIELD_BYTES} bytes.", param=self._part.name
            )
        self._part.data.extend(chunk)

    def on_part_end(self) -> None:
        if self._part.filename is None:
            try:
                self.fields[self._part.name] = self._part.data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValidationFailed(
                    f"The form field '{self._part.name}' is not UTF-8 text.", param=self._part.name
                ) from exc

    # Runs in a worker thread between parser writes.
    def flush(self) -> None:
        if not self.pending:
            return
        if self.handle is None:
            self.handle = self.tmp_path.open("xb")
        for chunk in self.pending:
            self.handle.write(chunk)
            self.digest.update(chunk)
        self.pending.clear()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def _boundary(content_type: str | None) -> bytes:
    if not content_type:
        raise InvalidRequest("Send the file as multipart/form-data.", code="invalid_content_type")
    media_type, options = parse_options_header(content_type)
    if media_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise InvalidRequest("Send the file as multipart/form-data.", code="invalid_content_type")
    return options[b"boundary"]


def check_declared_length(content_length: str | None, max_file_bytes: int) -> None:
    """Refuse an upload whose declared size is already too large, before reading a byte of it."""
    if content_length is None:
        return
    try:
        declared = int(content_length)
    except ValueError as exc:
        raise InvalidRequest("Content-Length is not a number.", code="invalid_content_length") from exc
    if declared > max_file_bytes + MULTIPART_OVERHEAD:
        raise PayloadTooLarge(f"The upload is larger than the limit of {max_file_bytes} bytes.", param=FILE_FIELD)


async def receive_upload(
    stream: AsyncIterator[bytes],
    *,
    content_type: str | None,
    folder: Path,
    max_file_bytes: int,
) -> Upload:
    """Stream the multipart body into ``folder``; on any failure nothing is left on disk."""
    boundary = _boundary(content_type)
    folder.mkdir(parents=True, exist_ok=True)
    tmp_path = folder / f".upload-{uuid.uuid4().hex}.tmp"
    receiver = _Receiver(tmp_path, max_file_bytes)
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": receiver.on_part_begin,
            "on_part_data": receiver.on_part_data,
            "on_part_end": receiver.on_part_end,
            "on_header_field": receiver.on_header_field,
            "on_header_value": receiver.on_header_value,
            "on_header_end": receiver.on_header_end,
            "on_headers_finished": receiver.on_headers_finished,
        },
    )
    try:
        async for chunk in stream:
            parser.write(chunk)
            await anyio.to_thread.run_sync(receiver.flush)
        parser.finalize()
        await anyio.to_thread.run_sync(receiver.flush)
        receiver.close()
        if receiver.filename is None:
            raise ValidationFailed("A 'file' part is required.", param=FILE_FIELD, code="missing")
        if receiver.handle is None:  # a file part with no bytes at all
            tmp_path.touch()
        return Upload(
            path=tmp_path,
            filename=receiver.filename,
            size=receiver.size,
            sha256=receiver.digest.hexdigest(),
            fields=receiver.fields,
        )
    except FormParserError as exc:
        receiver.close()
        tmp_path.unlink(missing_ok=True)
        raise InvalidRequest("The multipart body is malformed.", code="invalid_multipart") from exc
    except BaseException:
        receiver.close()
        tmp_path.unlink(missing_ok=True)
        raise
