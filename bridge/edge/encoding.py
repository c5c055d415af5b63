"""Decoding a body's `Content-Encoding` ourselves, so a body that lies about it is the
sender's error (400 `invalid`, raw bytes dead-lettered) and not an unexpected one.

aiohttp decompresses request bodies itself, and when a body labelled gzip or deflate
does not decompress it raises from deep inside `request.read()`: the bridge answered
503 "internal error" and the connection was left unusable. The callback listener
turns that off (`auto_decompress=False`) and decodes here, where a failure has a
name, the raw bytes are still at hand for the dead letter, and the decoded size is
bounded by the same `MAX_BODY_BYTES` as a plain body (a small gzip bomb cannot grow
into gigabytes). The stdlib's `zlib` is all this needs.
"""

from __future__ import annotations

import zlib

#: Content codings the bridge decodes. `identity` means none.
SUPPORTED = ("identity", "gzip", "x-gzip", "deflate")
#: More codings than this on one body is not something a webhook sender does.
MAX_CODINGS = 2


class UnsupportedEncoding(Exception):
    """A content coding the bridge does not decode (answered 415)."""


class UndecodableBody(Exception):
    """The body does not decode as its `Content-Encoding` says; never echoes the input."""

    def __init__(self, coding: str) -> None:
        super().__init__(f"body does not decode as its Content-Encoding ({coding}) says")
        self.reason = str(self)


class DecodedTooLarge(Exception):
    """The decoded body is larger than the body limit (answered 413)."""


def codings(header: str | None) -> list[str]:
    """The codings applied to a body, in the order they were applied; identity dropped.

    Raises `UnsupportedEncoding` for any coding not in `SUPPORTED`, or too many.
    """
    if not header:
        return []  # nearly every callback: no Content-Encoding
    names = [name.strip().lower() for name in header.split(",") if name.strip()]
    applied = [name for name in names if name != "identity"]
    if len(applied) > MAX_CODINGS or any(name not in SUPPORTED for name in applied):
        raise UnsupportedEncoding("content encoding must be gzip, deflate or identity")
    return applied


def decode_body(raw: bytes, header: str | None, *, max_bytes: int) -> bytes:
    """`raw` with every coding of `header` undone, at most `max_bytes` long.

    Raises `UnsupportedEncoding`, `UndecodableBody` or `DecodedTooLarge`.
    """
    body = raw
    for coding in reversed(codings(header)):
        body = _undo(coding, body, max_bytes)
    return body


def _undo(coding: str, data: bytes, max_bytes: int) -> bytes:
    # gzip: a gzip header; deflate: the zlib format as RFC 9110 says, though some
    # senders send a raw deflate stream, which is accepted as well (as browsers do).
    candidates = (zlib.MAX_WBITS | 16,) if coding in ("gzip", "x-gzip") else (zlib.MAX_WBITS, -15)
    for wbits in candidates:
        decompressor = zlib.decompressobj(wbits)
        try:
            decoded = decompressor.decompress(data, max_bytes + 1)
        except zlib.error:
            continue
        if len(decoded) > max_bytes:
            raise DecodedTooLarge(f"decoded body larger than {max_bytes} bytes")
        if not decompressor.eof or decompressor.unused_data:
            # Truncated, or something after the end of the compressed stream.
            continue
        return decoded
    raise UndecodableBody(coding)
