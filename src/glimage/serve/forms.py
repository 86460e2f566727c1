"""multipart/form-data for the edits endpoint, parsed by python-multipart with the server's own rules.

Starlette's form reader turns a text field that is not valid UTF-8 into Latin-1 (or U+FFFD) silently; here a
text field is decoded strictly, so that a multipart prompt with invalid UTF-8 is a 400 like the same bytes in
JSON. Fields and files are counted while the body streams in (the body's size is the Guard middleware's).
"""

from __future__ import annotations

from dataclasses import dataclass

try:
    from python_multipart.multipart import MultipartParser, parse_options_header
except ImportError:  # python-multipart before 0.0.13
    from multipart.multipart import MultipartParser, parse_options_header

from starlette.requests import ClientDisconnect

from .api import ApiError


@dataclass
class Part:
    name: str
    filename: str | None  # None: a text field
    data: bytearray


async def read_form(request, max_fields: int, max_files: int) -> list[tuple[str, str | Part]]:
    """[(name, text)] for text fields and [(name, Part)] for files, in the order sent."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise ApiError(400, "the multipart body has no boundary in its Content-Type", None, "invalid_multipart")
    parts: list[Part] = []
    header: dict = {"name": b"", "value": b"", "disposition": b""}

    def on_part_begin():
        header["disposition"] = b""

    def on_header_field(data, start, end):
        header["name"] += data[start:end]

    def on_header_value(data, start, end):
        header["value"] += data[start:end]

    def on_header_end():
        if header["name"].strip().lower() == b"content-disposition":
            header["disposition"] = header["value"]
        header["name"], header["value"] = b"", b""

    def on_headers_finished():
        _, options = parse_options_header(header["disposition"])
        if b"name" not in options:
            raise ApiError(400, "a multipart part has no name in its Content-Disposition", None, "invalid_multipart")
        filename = options.get(b"filename")
        part = Part(_text("a field name", options[b"name"]), None if filename is None else
                    _text("a file name", filename), bytearray())
        parts.append(part)
        files = sum(p.filename is not None for p in parts)
        if files > max_files or len(parts) - files > max_fields:
            raise ApiError(400, f"too many parts: at most {max_files} files and {max_fields} fields", None,
                           "invalid_multipart")

    def on_part_data(data, start, end):
        parts[-1].data += data[start:end]

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data})
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except (ApiError, ClientDisconnect):
        raise
    except Exception as e:  # noqa: BLE001 - python-multipart's parse errors (their classes vary by version)
        raise ApiError(400, f"the multipart body is not readable: {e}", None, "invalid_multipart") from None
    return [(p.name, p if p.filename is not None else _text(f"field {p.name!r}", bytes(p.data), p.name))
            for p in parts]


def _text(what: str, raw: bytes, param: str | None = None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"{what} is not valid UTF-8: byte(s) {raw[e.start:e.end].hex(' ')} at byte {e.start}; "
                       "send text in UTF-8", param, "invalid_value") from None
