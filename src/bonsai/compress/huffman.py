"""Huffman coding of 8-bit values (Deep Compression's last stage): exact, lossless, canonical codes.

A blob is ``magic | count (uint64) | 256 code lengths (uint8) | bitstream``. Codes are canonical (assigned in order
of (length, symbol)), so the lengths alone define them, and at most 16 bits long, so decoding uses one 64 Ki-entry
table. Lengths are limited by halving the counts (rounding up, never to zero) until the tree is shallow enough.

>>> import numpy as np
>>> v = np.array([3, 3, 3, 7, 200], dtype=np.uint8)
>>> bool((decode(encode(v)) == v).all())
True
"""

from __future__ import annotations

import heapq
import struct

import numpy as np

from bonsai.errors import BonsaiError

MAX_BITS = 16
_MAGIC = b"BHF1"
_HEADER = struct.Struct("<4sQ")


def code_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code length (bits) per symbol for ``counts`` (256 non-negative integers); 0 for absent symbols,
    1 for a lone symbol; never longer than MAX_BITS."""
    counts = np.asarray(counts, dtype=np.int64).copy()
    present = np.flatnonzero(counts)
    lengths = np.zeros(len(counts), dtype=np.uint8)
    if len(present) == 0:
        return lengths
    if len(present) == 1:
        lengths[present[0]] = 1
        return lengths
    while True:
        heap = [(int(counts[s]), int(s), (int(s),)) for s in present]  # (weight, tie-break, symbols below)
        heapq.heapify(heap)
        depth = np.zeros(len(counts), dtype=np.int64)
        while len(heap) > 1:
            w1, t1, a = heapq.heappop(heap)
            w2, t2, b = heapq.heappop(heap)
            for s in a + b:
                depth[s] += 1
            heapq.heappush(heap, (w1 + w2, min(t1, t2), a + b))
        if depth.max() <= MAX_BITS:
            lengths[present] = depth[present]
            return lengths
        counts[present] = (counts[present] + 1) // 2  # flatter counts, shallower tree


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code (an integer of ``lengths[s]`` bits) of every symbol."""
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, prev = 0, 0
    for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev
        codes[s] = code
        prev = int(lengths[s])
        code += 1
    return codes


def encode(values: np.ndarray) -> bytes:
    """Huffman-code a uint8/int8 array (flattened; its shape and dtype are the caller's to keep)."""
    v = np.ascontiguousarray(values).view(np.uint8).reshape(-1)
    lengths = code_lengths(np.bincount(v, minlength=256))
    codes = canonical_codes(lengths)
    n_bits = lengths[v].astype(np.int64)
    total = int(n_bits.sum())
    bits = np.zeros(total, dtype=np.uint8)
    start = np.cumsum(n_bits) - n_bits
    sym_code = codes[v]
    for j in range(int(lengths.max()) if len(v) else 0):  # bit j (from the most significant) of every code
        has = n_bits > j
        bits[start[has] + j] = (sym_code[has] >> (n_bits[has] - 1 - j)) & 1
    return _HEADER.pack(_MAGIC, len(v)) + lengths.tobytes() + np.packbits(bits).tobytes()


def decode(blob: bytes) -> np.ndarray:
    """The uint8 values ``encode`` was given, exactly; a clear error for a blob that is not one."""
    if len(blob) < _HEADER.size + 256:
        raise BonsaiError("Huffman blob: too short")
    magic, n = _HEADER.unpack_from(blob)
    if magic != _MAGIC:
        raise BonsaiError("Huffman blob: bad magic")
    lengths = np.frombuffer(blob, dtype=np.uint8, count=256, offset=_HEADER.size)
    if lengths.max(initial=0) > MAX_BITS:
        raise BonsaiError("Huffman blob: code longer than 16 bits")
    payload = np.frombuffer(blob, dtype=np.uint8, offset=_HEADER.size + 256)
    if n > 8 * len(payload):  # every value takes at least one bit
        raise BonsaiError("Huffman blob: bitstream ends early")
    if n == 0:
        return np.zeros(0, dtype=np.uint8)
    codes = canonical_codes(lengths)
    # table: every 16-bit window -> (symbol, length) of the code it starts with
    sym_of = np.full(1 << MAX_BITS, -1, dtype=np.int64)
    len_of = np.zeros(1 << MAX_BITS, dtype=np.int64)
    for s in np.flatnonzero(lengths):
        L = int(lengths[s])
        lo = int(codes[s]) << (MAX_BITS - L)
        sym_of[lo : lo + (1 << (MAX_BITS - L))] = s
        len_of[lo : lo + (1 << (MAX_BITS - L))] = L
    bits = np.concatenate([np.unpackbits(payload), np.zeros(MAX_BITS, dtype=np.uint8)]).astype(np.int64)
    windows = np.zeros(len(bits) - MAX_BITS, dtype=np.int64)
    for k in range(MAX_BITS):
        windows = (windows << 1) | bits[k : k + len(windows)]
    windows_l, sym_l, len_l = windows.tolist(), sym_of.tolist(), len_of.tolist()
    out = np.empty(n, dtype=np.uint8)
    pos = 0
    try:
        for i in range(n):
            w = windows_l[pos]
            s = sym_l[w]
            if s < 0:
                raise BonsaiError("Huffman blob: invalid code in the bitstream")
            out[i] = s
            pos += len_l[w]
    except IndexError:
        raise BonsaiError("Huffman blob: bitstream ends early") from None
    return out


def bits_per_value(blob: bytes) -> float:
    n = _HEADER.unpack_from(blob)[1]
    return 8.0 * (len(blob) - _HEADER.size - 256) / max(n, 1)
