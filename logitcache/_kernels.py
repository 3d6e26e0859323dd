"""numba kernels behind the codecs and the writer's row checks.

Kernels do no bounds checking of their own: every caller validates lengths and offsets
first (codecs.py, writer.py). numba has no CPU float16, so fp16 values travel as uint16 bits.
"""

from __future__ import annotations

import sys

import numpy as np
from numba import njit

if sys.byteorder != "little":  # the kernels view little-endian bytes as native integers
    raise ImportError("logitcache needs a little-endian host")

_JIT = {"cache": True, "nogil": True, "boundscheck": False}


@njit(**_JIT)
def byte_shuffle(src, elementsize, out):  # pragma: no cover - compiled
    """out[b * n + i] = src[i * elementsize + b]: byte b of every element, plane by plane."""
    n = src.shape[0] // elementsize
    if elementsize == 4:
        words = src[: n * 4].view(np.uint32)
        for i in range(n):
            w = words[i]
            out[i] = w & 0xFF
            out[n + i] = (w >> 8) & 0xFF
            out[2 * n + i] = (w >> 16) & 0xFF
            out[3 * n + i] = w >> 24
        return
    if elementsize == 2:
        halves = src[: n * 2].view(np.uint16)
        for i in range(n):
            h = halves[i]
            out[i] = h & 0xFF
            out[n + i] = h >> 8
        return
    for b in range(elementsize):
        base = b * n
        for i in range(n):
            out[base + i] = src[i * elementsize + b]


@njit(**_JIT)
def byte_unshuffle(src, elementsize, out):  # pragma: no cover - compiled
    n = src.shape[0] // elementsize
    if elementsize == 4:
        words = out[: n * 4].view(np.uint32)
        for i in range(n):
            words[i] = (
                np.uint32(src[i])
                | (np.uint32(src[n + i]) << 8)
                | (np.uint32(src[2 * n + i]) << 16)
                | (np.uint32(src[3 * n + i]) << 24)
            )
        return
    if elementsize == 2:
        halves = out[: n * 2].view(np.uint16)
        for i in range(n):
            halves[i] = np.uint16(src[i]) | (np.uint16(src[n + i]) << 8)
        return
    for b in range(elementsize):
        base = b * n
        for i in range(n):
            out[i * elementsize + b] = src[base + i]


@njit(**_JIT)
def fp16_key_delta_encode(bits, row_length, out):  # pragma: no cover - compiled
    """fp16 bits -> order-preserving keys -> per-row differences prev - cur (mod 2**16).

    The key of a non-negative value is bits | 0x8000, of a negative value ~bits: keys sort as
    the values do, so a row in descending order becomes one key and small non-negative gaps.
    A trailing partial row is treated as a row of its own.
    """
    n = bits.shape[0]
    for start in range(0, n, row_length):
        prev = np.uint16(0)
        for i in range(start, min(start + row_length, n)):
            b = bits[i]
            if b & 0x8000:
                key = np.uint16(~b & 0xFFFF)
            else:
                key = np.uint16(b | 0x8000)
            if i == start:
                out[i] = key
            else:
                out[i] = np.uint16((prev - key) & 0xFFFF)
            prev = key


@njit(**_JIT)
def fp16_key_delta_decode(deltas, row_length, out):  # pragma: no cover - compiled
    n = deltas.shape[0]
    for start in range(0, n, row_length):
        key = np.uint16(deltas[start])
        for i in range(start, min(start + row_length, n)):
            if i != start:
                key = np.uint16((key - deltas[i]) & 0xFFFF)
            if key & 0x8000:
                out[i] = np.uint16(key & 0x7FFF)
            else:
                out[i] = np.uint16(~key & 0xFFFF)


@njit(**_JIT)
def int32_delta_encode(values, out):  # pragma: no cover - compiled
    prev = np.int64(0)
    for i in range(values.shape[0]):
        v = np.int64(values[i])
        out[i] = np.int32(((v - prev + 2147483648) & 0xFFFFFFFF) - 2147483648)
        prev = v


@njit(**_JIT)
def int32_delta_decode(deltas, out):  # pragma: no cover - compiled
    acc = np.int64(0)
    for i in range(deltas.shape[0]):
        acc = ((acc + np.int64(deltas[i]) + 2147483648) & 0xFFFFFFFF) - 2147483648
        out[i] = np.int32(acc)


@njit(**_JIT)
def varint_encode(values, out):  # pragma: no cover - compiled
    """LEB128 of uint32 values; `out` holds at least 5 bytes per value. Returns bytes used."""
    pos = 0
    for i in range(values.shape[0]):
        v = np.uint32(values[i])
        while v >= 0x80:
            out[pos] = np.uint8((v & 0x7F) | 0x80)
            v >>= 7
            pos += 1
        out[pos] = np.uint8(v)
        pos += 1
    return pos


@njit(**_JIT)
def varint_decode(src, out):  # pragma: no cover - compiled
    """Decode all of `src` into `out`; returns the number of values, or -1 when the input is
    malformed (longer than 5 bytes, above 2^32 - 1, or not minimal: a last byte of 0 after
    others), ends inside a value, or holds more values than `out` has room for.

    The reads are checked here because the length of each value is data-dependent.
    """
    pos = 0
    n = src.shape[0]
    count = 0
    while pos < n:
        if count >= out.shape[0]:
            return -1
        v = np.uint64(0)
        shift = 0
        while True:
            if pos >= n or shift > 28:
                return -1
            b = src[pos]
            pos += 1
            v |= np.uint64(b & 0x7F) << np.uint64(shift)
            if b < 0x80:
                if b == 0 and shift > 0:
                    return -1  # non-minimal: a value has exactly one encoding
                break
            shift += 7
        if v > 0xFFFFFFFF:
            return -1
        out[count] = np.uint32(v)
        count += 1
    return count


@njit(**_JIT)
def fp16_keys(bits, out):  # pragma: no cover - compiled
    for i in range(bits.shape[0]):
        b = bits[i]
        if b & 0x8000:
            out[i] = np.uint16(~b & 0xFFFF)
        else:
            out[i] = np.uint16(b | 0x8000)


# Status codes of check_and_canonicalize_rows.
ROW_OK = 0
ROW_ID_OUT_OF_RANGE = 1
ROW_NOT_FINITE = 2
ROW_POSITIVE = 3
ROW_DUPLICATE_ID = 4
ROW_MASS_TOO_LARGE = 5


@njit(**_JIT)
def check_and_canonicalize_rows(
    ids, bits, vocab_size, stamp, stamp_base, exp_table, max_mass, result
):  # pragma: no cover - compiled
    """Validate teacher rows and sort each into canonical order, in place.

    ids: int32 [n, k]; bits: uint16 [n, k] (fp16 logprobs); stamp: int64 [vocab_size], a
    scratch array for duplicate detection that is never cleared: row r marks ids with
    stamp_base + r. On the first bad value writes (status, row, col) into `result` and stops.
    Canonical order: logprob descending, ties by token id ascending.
    """
    n, k = ids.shape
    for r in range(n):
        mark = stamp_base + r + 1
        mass = 0.0
        ordered = True
        for c in range(k):
            t = ids[r, c]
            if t < 0 or t >= vocab_size:
                result[0] = ROW_ID_OUT_OF_RANGE
                result[1] = r
                result[2] = c
                return
            if stamp[t] == mark:
                result[0] = ROW_DUPLICATE_ID
                result[1] = r
                result[2] = c
                return
            stamp[t] = mark
            b = bits[r, c]
            if (b & 0x7C00) == 0x7C00:
                result[0] = ROW_NOT_FINITE
                result[1] = r
                result[2] = c
                return
            if b != 0 and (b & 0x8000) == 0:
                result[0] = ROW_POSITIVE
                result[1] = r
                result[2] = c
                return
            mass += exp_table[b]
            if c > 0 and ordered:
                # Compare as keys: key order is value order for finite fp16.
                pb = bits[r, c - 1]
                pk = (~pb & 0xFFFF) if pb & 0x8000 else (pb | 0x8000)
                ck = (~b & 0xFFFF) if b & 0x8000 else (b | 0x8000)
                if pk < ck or (pk == ck and ids[r, c - 1] > t):
                    ordered = False
        if mass > max_mass:
            result[0] = ROW_MASS_TOO_LARGE
            result[1] = r
            result[2] = 0
            return
        if not ordered:
            # Insertion sort: rows from torch.topk are sorted or nearly so.
            for c in range(1, k):
                t = ids[r, c]
                b = bits[r, c]
                ck = (~b & 0xFFFF) if b & 0x8000 else (b | 0x8000)
                j = c - 1
                while j >= 0:
                    pb = bits[r, j]
                    pk = (~pb & 0xFFFF) if pb & 0x8000 else (pb | 0x8000)
                    if pk < ck or (pk == ck and ids[r, j] > t):
                        ids[r, j + 1] = ids[r, j]
                        bits[r, j + 1] = pb
                        j -= 1
                    else:
                        break
                ids[r, j + 1] = t
                bits[r, j + 1] = b
    result[0] = ROW_OK


@njit(**_JIT)
def byte_bit_shuffle(src, elementsize, byte_planes, out):  # pragma: no cover - compiled
    """Low `byte_planes` bytes of each element as byte planes, the rest as bit planes.

    Bit plane q (q = 0 is the element's most significant bit) holds one bit per element,
    8 elements a byte, the first element in the byte's most significant bit. `out` must be
    zeroed by the caller. Ids are mostly far below 2**24, so their high bits are rare ones
    that zstd stores in well under a bit each, where a byte plane would cost a bit or more.
    """
    n = src.shape[0] // elementsize
    nb = (n + 7) // 8
    base = byte_planes * n
    if elementsize == 4 and byte_planes == 2:
        words = src[: n * 4].view(np.uint32)
        for i in range(n):
            w = words[i]
            out[i] = w & 0xFF
            out[n + i] = (w >> 8) & 0xFF
            high = np.int64(w >> 16)
            while high != 0:
                s = 0
                while ((high >> s) & 1) == 0:
                    s += 1
                high = high & (high - 1)
                q = 15 - s
                out[base + q * nb + (i >> 3)] |= np.uint8(0x80 >> (i & 7))
        return
    for b in range(byte_planes):
        for i in range(n):
            out[b * n + i] = src[i * elementsize + b]
    top = elementsize * 8 - 1
    for i in range(n):
        for b in range(byte_planes, elementsize):
            v = src[i * elementsize + b]
            if v == 0:
                continue
            for s in range(8):
                if v & (1 << s):
                    q = top - (b * 8 + s)
                    out[base + q * nb + (i >> 3)] |= np.uint8(0x80 >> (i & 7))


@njit(**_JIT)
def byte_bit_unshuffle(src, elementsize, byte_planes, out):  # pragma: no cover - compiled
    """Inverse of byte_bit_shuffle into a zeroed `out`; returns -1 if a padding bit is set."""
    n = out.shape[0] // elementsize
    nb = (n + 7) // 8
    base = byte_planes * n
    if elementsize == 4 and byte_planes == 2:
        words = out[: n * 4].view(np.uint32)
        for i in range(n):
            words[i] = np.uint32(src[i]) | (np.uint32(src[n + i]) << 8)
    else:
        for b in range(byte_planes):
            for i in range(n):
                out[i * elementsize + b] = src[b * n + i]
    # The bit planes are mostly zero bytes, skipped at once.
    high_bits = (elementsize - byte_planes) * 8
    top = elementsize * 8 - 1
    for q in range(high_bits):
        bit = top - q
        byte_index = bit // 8
        mask = np.uint8(1 << (bit % 8))
        off = base + q * nb
        for blk in range(nb):
            v = src[off + blk]
            if v == 0:
                continue
            for j in range(8):
                if v & (0x80 >> j):
                    i = blk * 8 + j
                    if i >= n:
                        return -1
                    out[i * elementsize + byte_index] |= mask
    return 0
