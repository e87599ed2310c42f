"""The framing every bonsai compressed file shares: ``magic | header length (uint64) | header JSON | payload``.

>>> packed = frame(b"TEST", {"n": 1}, b"abc")
>>> header, pos = unframe(packed, b"TEST", "a test file", "t.bin")
>>> header, packed[pos:]
({'n': 1}, b'abc')
"""

from __future__ import annotations

import json
import struct

from bonsai.errors import BonsaiError

_LENGTH = struct.Struct("<Q")


def frame(magic: bytes, header: dict, *payload: bytes) -> bytes:
    head = json.dumps(header).encode()
    return magic + _LENGTH.pack(len(head)) + head + b"".join(payload)


def unframe(packed: bytes, magic: bytes, what: str, source: str) -> tuple[dict, int]:
    """(header, offset of the payload). A file without ``magic`` is "not a ``what``"; a header that cannot be read
    is "damaged"; both name ``source``."""
    if not packed.startswith(magic):
        raise BonsaiError(f"{source}: not a {what}")
    try:
        (n,) = _LENGTH.unpack_from(packed, len(magic))
        start = len(magic) + _LENGTH.size
        header = json.loads(packed[start : start + n])
    except (struct.error, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BonsaiError(f"{source}: damaged ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise BonsaiError(f"{source}: damaged (its header is not a JSON object)")
    return header, start + n
