"""The framing every bonsai compressed file shares: ``magic | header length (uint64) | header | payload``.

The header is JSON, zlib-compressed (the architecture and tensor list repeat names and keys: 16 KB of JSON for a
resnet32 become about 1 KB). A header that starts with ``{`` is read as plain JSON, as files were first written.

>>> packed = frame(b"TEST", {"n": 1}, b"abc")
>>> header, pos = unframe(packed, b"TEST", "a test file", "t.bin")
>>> header, packed[pos:]
({'n': 1}, b'abc')
"""

from __future__ import annotations

import json
import struct
import zlib

from bonsai.errors import BonsaiError

_LENGTH = struct.Struct("<Q")


def frame(magic: bytes, header: dict, *payload: bytes) -> bytes:
    head = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    return magic + _LENGTH.pack(len(head)) + head + b"".join(payload)


def unframe(packed: bytes, magic: bytes, what: str, source: str) -> tuple[dict, int]:
    """(header, offset of the payload). A file without ``magic`` is "not a ``what``"; a header that cannot be read
    is "damaged"; both name ``source``."""
    if not packed.startswith(magic):
        raise BonsaiError(f"{source}: not a {what}")
    try:
        (n,) = _LENGTH.unpack_from(packed, len(magic))
        start = len(magic) + _LENGTH.size
        head = packed[start : start + n]
        header = json.loads(head if head.startswith(b"{") else zlib.decompress(head))
    except (struct.error, ValueError, zlib.error) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BonsaiError(f"{source}: damaged ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise BonsaiError(f"{source}: damaged (its header is not a JSON object)")
    return header, start + n
