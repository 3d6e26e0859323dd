"""numba kernels behind the codecs and the writer's row checks.

Kernels do no bounds checking of their own: every caller validates lengths and offsets
first (codecs.py, writer.py). numba has no CPU float16, so fp16 values travel as uint16 bits.
"""

from __future__ import annotations

import sys

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ._numpy_kernels import (
    DEFAULT_CHUNK_BAD_BLOCK,
    DEFAULT_CHUNK_BAD_RECORDS,
    DEFAULT_CHUNK_WIDE_IDS,
    RECORD_STARTS_BAD_LENGTHS,
    RECORD_STARTS_BAD_MASK,
    RECORD_STARTS_MASKED_FIRST,
    RECORD_STARTS_OK,
)

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
    """Inverse of fp16_key_delta_encode, in two passes that each run at full speed.

    The first undoes the gaps (one dependent subtraction per value, the only serial part);
    the second maps keys back to fp16 bits without a branch, so it vectorises:
    key ^ 0x8000 when the key's top bit is set, else key ^ 0xFFFF.
    """
    n = deltas.shape[0]
    for start in range(0, n, row_length):
        key = deltas[start]
        out[start] = key
        for i in range(start + 1, min(start + row_length, n)):
            key = np.uint16(key - deltas[i])
            out[i] = key
    for i in range(n):
        key = out[i]
        out[i] = key ^ np.uint16(np.uint16(0xFFFF) - (key >> np.uint16(15)) * np.uint16(0x7FFF))


@njit(**_JIT)
def fp16_key_delta_planes(low, high, row_length, out):  # pragma: no cover - compiled
    """fp16_key_delta_decode of gaps stored as the two byte planes of `shuffle` (elementsize
    2): gap i is low[i] | high[i] << 8. One call where byte_unshuffle and
    fp16_key_delta_decode took two and a buffer between them, and a random read passes
    its rows' slices of the planes without gathering them. low, high and out have one
    length (checked by the caller)."""
    for i in range(out.shape[0]):
        out[i] = np.uint16(low[i]) | (np.uint16(high[i]) << np.uint16(8))
    fp16_key_delta_decode(out, row_length, out)


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


@njit(**_JIT, inline="always")
def _id_word(low, high, a, b, sa, sb, i, j):  # pragma: no cover - compiled
    """Id i from its low and high bytes and bit j of its byte in each of two bit planes."""
    bit = np.uint32(7 - j)
    return (
        np.uint32(low[i])
        | (np.uint32(high[i]) << np.uint32(8))
        | (((a >> bit) & np.uint32(1)) << sa)
        | (((b >> bit) & np.uint32(1)) << sb)
    )


@njit(**_JIT)
def unshuffle_ids(low, high, plane_a, shift_a, plane_b, shift_b, words):  # pragma: no cover
    """byte_bit_unshuffle(elementsize=4, byte_planes=2) when at most two bit planes hold a
    set bit (every vocabulary up to 2**18 ids): words = low | high << 8 | the two planes' bits.

    An unused plane is passed as zeros. Blocks of 8 ids (one byte of each plane) are written
    in straight-line code that the compiler vectorises: 4x the generic kernel's speed. The
    caller checks the padding bits of the planes' last byte.
    """
    n = words.shape[0]
    full = n // 8
    sa = np.uint32(shift_a)
    sb = np.uint32(shift_b)
    for blk in range(full):
        a = np.uint32(plane_a[blk])
        b = np.uint32(plane_b[blk])
        for j in range(8):
            words[blk * 8 + j] = _id_word(low, high, a, b, sa, sb, blk * 8 + j, j)
    if full * 8 < n:
        a = np.uint32(plane_a[full])
        b = np.uint32(plane_b[full])
        for j in range(n - full * 8):
            words[full * 8 + j] = _id_word(low, high, a, b, sa, sb, full * 8 + j, j)


@njit(**_JIT)
def _unshuffle_id_span(buf, n, first, words, pad):  # pragma: no cover - compiled
    """Ids first..first+len(words)-1 of the byte_bit_shuffle(4, 2) block `buf` of n ids
    through unshuffle_ids, reading only the span's bytes of each plane. A bit plane is used
    when its span holds a set bit; `pad` masks the bits of the span's last byte that must be
    zero. Returns -1 if one is set, 1 (words untouched) if more than two planes are used,
    else 0."""
    m = words.shape[0]
    nb = (n + 7) // 8
    b0 = first // 8
    mb = (m + 7) // 8
    used = 0
    plane_first = 0
    plane_second = 0
    for q in range(16):
        off = 2 * n + q * nb + b0
        if buf[off : off + mb].max() == 0:  # vectorised; an index loop is 30x slower
            continue
        if buf[off + mb - 1] & pad:
            return -1
        if used == 0:
            plane_first = q
        elif used == 1:
            plane_second = q
        used += 1
    if used > 2:
        return 1
    zero = np.zeros(mb, dtype=np.uint8)
    plane_a, shift_a = zero, 0
    plane_b, shift_b = zero, 0
    if used >= 1:
        off = 2 * n + plane_first * nb + b0
        plane_a, shift_a = buf[off : off + mb], 31 - plane_first
    if used == 2:
        off = 2 * n + plane_second * nb + b0
        plane_b, shift_b = buf[off : off + mb], 31 - plane_second
    low, high = buf[first : first + m], buf[n + first : n + first + m]
    unshuffle_ids(low, high, plane_a, shift_a, plane_b, shift_b, words)
    return 0


@njit(**_JIT)
def unshuffle_ids_auto(buf, n, words):  # pragma: no cover - compiled
    """byte_bit_unshuffle(elementsize=4, byte_planes=2) of `buf` (exactly 2n + 16 ceil(n/8)
    bytes, checked by the caller) into `words` [n] through unshuffle_ids: finds the bit
    planes holding a set bit and checks their padding bits in one call, where numpy took
    four (a scan pays the difference on every chunk). Returns -1 if a padding bit is set,
    1 (words untouched) if more than two planes hold set bits, else 0."""
    if n == 0:
        return 0
    pad = np.uint8(0)
    if n % 8:
        pad = np.uint8((1 << (8 - n % 8)) - 1)
    return _unshuffle_id_span(buf, n, 0, words, pad)


@njit(**_JIT)
def unshuffle_ids_span(buf, n, first, words):  # pragma: no cover - compiled
    """Ids first..first+len(words)-1 of a byte_bit_shuffle(4, 2) block of n ids whose
    padding bits were checked (Pipeline.stage), decoded from the span's bytes alone: a random
    read's rows without gathering them first. The caller checks that `buf` holds exactly
    2n + 16 ceil(n/8) bytes, `first` is a multiple of 8 and first + len(words) <= n. Returns
    1 (words untouched) if more than two of the span's bit planes hold a set bit, else 0."""
    if words.shape[0] == 0:
        return 0
    return _unshuffle_id_span(buf, n, first, words, np.uint8(0))


@njit(**_JIT)
def record_starts(lengths, mask, all_positions, token_starts, target_starts):  # pragma: no cover
    """A chunk's record offsets from its `record_lengths` [R] and `loss_mask` [T] (uint8),
    with the checks of spec section 4.2, in one call where numpy takes a dozen (a scan pays
    them on every chunk). Fills token_starts and target_starts [R + 1] (int64); returns
    RECORD_STARTS_OK or the first rule broken (_numpy_kernels.record_starts: the same)."""
    r = lengths.shape[0]
    t = mask.shape[0]
    token_starts[0] = 0
    target_starts[0] = 0
    pos = 0
    for i in range(r):
        length = lengths[i]
        if length < 1 or length > t - pos:
            return RECORD_STARTS_BAD_LENGTHS
        pos += length
        token_starts[i + 1] = pos
    if pos != t:
        return RECORD_STARTS_BAD_LENGTHS
    if t and mask.max() > 1:
        return RECORD_STARTS_BAD_MASK
    for i in range(r):
        start = token_starts[i]
        if mask[start]:
            return RECORD_STARTS_MASKED_FIRST
        if all_positions:
            count = token_starts[i + 1] - start - 1
        else:
            count = 0
            for j in range(start, token_starts[i + 1]):
                count += mask[j]
        target_starts[i + 1] = target_starts[i] + count
    return RECORD_STARTS_OK


# -- one chunk of the default pipelines in one call (logitcache/native.py) --------------------
#
# zstd and xxh3 are called through the addresses native.py passes in, not through names bound
# at compile time: the same code then runs from numba's on-disk cache and from the module
# compiled ahead of time, in processes whose libraries load at other addresses.


def _c_call_codegen(arity):
    def codegen(context, builder, signature, args):
        word = ir.IntType(64)
        function = builder.inttoptr(args[0], ir.FunctionType(word, [word] * arity).as_pointer())
        return builder.call(function, args[1:])

    return codegen


@intrinsic
def _c_call2(typingctx, address, a, b):  # pragma: no cover - compiled
    """int64 f(int64, int64) at `address` (C size_t and pointer arguments are 64-bit words)."""
    return types.int64(types.int64, types.int64, types.int64), _c_call_codegen(2)


@intrinsic
def _c_call5(typingctx, address, a, b, c, d, e):  # pragma: no cover - compiled
    """int64 f(int64, int64, int64, int64, int64) at `address`."""
    i8 = types.int64
    return i8(i8, i8, i8, i8, i8, i8), _c_call_codegen(5)


@njit(**_JIT)
def _unzstd_block(buf, offset, length, checksum, verify, c_functions, out):  # pragma: no cover
    """The block buf[offset:offset+length]: its xxh3 checked when `verify`, then its one
    zstd frame decoded into all of `out`. False when the checksum differs, the block is not
    exactly one zstd frame (a skippable frame is not one), or the frame does not declare
    exactly len(out) bytes or does not decode to them. zstd writes at most len(out) bytes
    whatever the frame says."""
    dctx, decompress, content_size, frame_size, xxh3 = (
        c_functions[0],
        c_functions[1],
        c_functions[2],
        c_functions[3],
        c_functions[4],
    )
    src = np.int64(buf.ctypes.data) + offset
    if verify and _c_call2(xxh3, src, length) != checksum:
        return False
    if length < 4 or buf[offset] != 0x28 or buf[offset + 1] != 0xB5:
        return False  # a zstd frame's magic number, not a skippable frame's (RFC 8878)
    if buf[offset + 2] != 0x2F or buf[offset + 3] != 0xFD:
        return False
    if _c_call2(frame_size, src, length) != length:  # also negative for an error code
        return False
    size = out.shape[0]
    if _c_call2(content_size, src, length) != size:  # -1 unknown, -2 error
        return False
    got = _c_call5(decompress, dctx, np.int64(out.ctypes.data), size, src, length)
    return got == size  # an error code is negative as int64


@njit(**_JIT)
def decode_default_chunk(
    buf,
    blocks,
    checksums,
    verified,
    c_functions,
    k,
    all_positions,
    teacher_rows,
    lengths,
    input_planes,
    mask,
    topk_planes,
    logprob_planes,
    sid_lengths,
    sid_bytes,
    input_ids,
    topk_ids,
    logprobs,
    token_starts,
    target_starts,
):  # pragma: no cover - compiled
    """A chunk written with the default pipelines decoded in one call without the GIL: every
    block's checksum (where `verified` is 0) and zstd frame, then record_starts, the two id
    unshuffles and the logprob key-delta decode. A scan's threads then take the GIL once a
    chunk, where the codec-by-codec path takes it some twenty times. Without `teacher_rows`
    the teacher columns stop at their planes (zstd undone), for a random read to decode one
    record's rows of them.

    `blocks` is the chunk's [offset, length, raw_length] per column in COLUMN_ORDER, flat
    (offset -1: absent), `checksums` their xxh3 as int64. The planes arrays receive what zstd
    decodes and are sized exactly by the caller from the chunk's counts (native.py); the
    caller checked every offset against the file. Returns 0, or a DEFAULT_CHUNK_* code: the
    caller then decodes the chunk codec by codec, which names what is wrong."""
    staged = (lengths.view(np.uint8), input_planes, mask, topk_planes, logprob_planes)
    for column in range(5):
        offset, length = blocks[3 * column], blocks[3 * column + 1]
        verify = verified[column] == 0
        if not _unzstd_block(
            buf, offset, length, checksums[column], verify, c_functions, staged[column]
        ):
            return DEFAULT_CHUNK_BAD_BLOCK
    for column, out in ((5, sid_lengths.view(np.uint8)), (6, sid_bytes)):
        offset, length = blocks[3 * column], blocks[3 * column + 1]
        if offset < 0:
            continue
        verify = verified[column] == 0
        if not _unzstd_block(buf, offset, length, checksums[column], verify, c_functions, out):
            return DEFAULT_CHUNK_BAD_BLOCK
    if record_starts(lengths, mask, all_positions, token_starts, target_starts):
        return DEFAULT_CHUNK_BAD_RECORDS
    status = unshuffle_ids_auto(input_planes, input_ids.shape[0], input_ids)
    if not teacher_rows:
        return DEFAULT_CHUNK_BAD_BLOCK if status < 0 else DEFAULT_CHUNK_WIDE_IDS * status
    if status == 0:
        status = unshuffle_ids_auto(topk_planes, topk_ids.shape[0], topk_ids)
    if status < 0:
        return DEFAULT_CHUNK_BAD_BLOCK
    if status > 0:
        return DEFAULT_CHUNK_WIDE_IDS
    n = logprobs.shape[0]
    fp16_key_delta_planes(logprob_planes[:n], logprob_planes[n:], k, logprobs)
    return 0


# -- rANS entropy coding (spec/FORMAT.md section 6.8) ----------------------------------------
#
# 32-bit states in [2^16, 2^32), 16-bit renormalisation words, ANS_STATES interleaved states
# (value i of a block uses state i % ANS_STATES), frequency tables of ANS_BITS bits. Values are
# coded as a token from a per-context table, then optional raw bits ("bypass"). Encoding runs
# backwards and emits words in reverse; the stream is the final states, then the words in the
# order the decoder reads them.

ANS_BITS = 12
ANS_L = 1 << 16
ANS_STATES = 4
ANS_BAD_STREAM = -1  # read past the end, or data left over, or final states wrong
ANS_BAD_VALUE = -2  # a decoded value violates the codec's own rules


@njit(**_JIT)
def _bit_length_minus_one(v):  # pragma: no cover - compiled
    """floor(log2 v) for 1 <= v < 2^32."""
    n = 0
    if v >= 65536:
        v >>= 16
        n += 16
    if v >= 256:
        v >>= 8
        n += 8
    if v >= 16:
        v >>= 4
        n += 4
    if v >= 4:
        v >>= 2
        n += 2
    if v >= 2:
        n += 1
    return n


@njit(**_JIT)
def hybrid_uint_steps(values, ctx_of_rank, row_length, ctx, tok, nbits, raw):  # pragma: no cover
    """Split unsigned values into (context, token, raw bit count, raw bits).

    v < 16 is token v; otherwise with n = floor(log2 v) and m the two bits below the leading
    one, token 16 + 4 (n - 4) + m and the n - 2 low bits raw. Context: of the rank in the row.
    """
    n_values = values.shape[0]
    for start in range(0, n_values, row_length):
        for r in range(min(row_length, n_values - start)):
            i = start + r
            v = np.uint64(values[i])
            ctx[i] = ctx_of_rank[r]
            if v < 16:
                tok[i] = v
                nbits[i] = 0
                raw[i] = 0
            else:
                n = _bit_length_minus_one(v)
                tok[i] = 16 + 4 * (n - 4) + ((v >> (n - 2)) & 3)
                nbits[i] = n - 2
                raw[i] = v & ((np.uint64(1) << np.uint64(n - 2)) - np.uint64(1))


@njit(**_JIT)
def rans_encode(ctx, tok, nbits, raw, freq, cum, rcp, shift1, shift2, out):  # pragma: no cover
    """Encode the steps (ctx, tok, nbits, raw) of a block; `out` (uint8) gets the stream.

    Returns the number of bytes written, or -1 when `out` is too small. Raw bits travel in
    pieces of at most 16, least significant piece decoded first. Division by a token's
    frequency is a multiplication by its reciprocal (rcp, shift1, shift2: Granlund and
    Montgomery's round-up method for 32-bit dividends, exact for every state).
    """
    n = ctx.shape[0]
    words = np.empty(n * 3 + 8, dtype=np.uint16)
    nw = 0
    mask16 = np.uint64(0xFFFF)
    # Rotating states: at value i, s0 is state i % 4, s1 state (i - 1) % 4, and so on.
    s0 = s1 = s2 = s3 = np.uint64(ANS_L)
    for i in range(n - 1, -1, -1):
        s = s0
        b = np.int64(nbits[i])
        if b > 0:
            r = np.uint64(raw[i])
            if b > 16:
                # The high piece is decoded last, so it is encoded first.
                hb = b - 16
                if s >= (np.uint64(1) << np.uint64(32 - hb)):
                    words[nw] = np.uint16(s & mask16)
                    nw += 1
                    s >>= np.uint64(16)
                s = (s << np.uint64(hb)) | (r >> np.uint64(16))
                r &= mask16
                b = 16
            if s >= (np.uint64(1) << np.uint64(32 - b)):
                words[nw] = np.uint16(s & mask16)
                nw += 1
                s >>= np.uint64(16)
            s = (s << np.uint64(b)) | r
        c = ctx[i]
        t = tok[i]
        f = np.uint64(freq[c, t])
        if s >= (f << np.uint64(32 - ANS_BITS)):
            words[nw] = np.uint16(s & mask16)
            nw += 1
            s >>= np.uint64(16)
        t1 = (np.uint64(rcp[c, t]) * s) >> np.uint64(32)
        q = (t1 + ((s - t1) >> np.uint64(shift1[c, t]))) >> np.uint64(shift2[c, t])
        s = (q << np.uint64(ANS_BITS)) + (s - q * f) + np.uint64(cum[c, t])
        s0, s1, s2, s3 = s1, s2, s3, s
    x = np.empty(ANS_STATES, dtype=np.uint64)
    x[3], x[2], x[1], x[0] = s0, s1, s2, s3
    size = 4 * ANS_STATES + 2 * nw
    if size > out.shape[0]:
        return -1
    for j in range(ANS_STATES):
        v = x[j]
        for b in range(4):
            out[4 * j + b] = np.uint8((v >> np.uint64(8 * b)) & np.uint64(0xFF))
    pos = 4 * ANS_STATES
    for w in range(nw - 1, -1, -1):
        out[pos] = np.uint8(words[w] & 0xFF)
        out[pos + 1] = np.uint8(words[w] >> 8)
        pos += 2
    return pos


def _hybrid_tables():
    """Per hybrid token: raw bit count and the value bits the token itself fixes."""
    nbits = np.zeros(128, dtype=np.uint32)
    base = np.arange(128, dtype=np.uint32)
    for t in range(16, 128):
        n = 4 + (t - 16) // 4
        nbits[t] = n - 2
        base[t] = (4 + (t - 16) % 4) << (n - 2)
    return nbits, base


HU_NBITS, HU_BASE = _hybrid_tables()


@njit(**_JIT)
def _read_varint(buf, pos, n):  # pragma: no cover - compiled
    """(value, next offset) of the minimal LEB128 u32 at buf[pos:n]; offset -1 if malformed."""
    v = 0
    shift = 0
    while True:
        if pos >= n or shift > 28:
            return 0, -1
        b = buf[pos]
        pos += 1
        v |= np.int64(b & 0x7F) << shift
        if b < 0x80:
            if b == 0 and shift > 0:
                return 0, -1
            break
        shift += 7
    if v > 0xFFFFFFFF:
        return 0, -1
    return v, pos


@njit(**_JIT)
def read_freq_tables(buf, start, contexts, alphabet, table):  # pragma: no cover - compiled
    """Parse `contexts` frequency tables from buf[start:], validating every field.

    Table: varint m (0: unused), then m pairs (varint gap, varint freq - 1), token = previous
    token + 1 + gap; tokens < alphabet[c], every freq < 2^ANS_BITS, m != 1, sum 2^ANS_BITS.
    Fills table [contexts, 2^ANS_BITS] (uint32): per slot freq | (slot - cum) << 13 | token << 25.
    Slots of unused contexts hold 0 (a frequency of 0, which ends any decode in an error).
    Returns the offset after the tables, or -1 when anything is malformed.
    """
    pos = start
    n = buf.shape[0]
    total_slots = 1 << ANS_BITS
    for c in range(contexts):
        m, pos = _read_varint(buf, pos, n)
        if pos < 0 or m == 1 or m > alphabet[c]:
            return -1
        token = -1
        total = 0
        for _ in range(m):
            gap, pos = _read_varint(buf, pos, n)
            if pos < 0:
                return -1
            f, pos = _read_varint(buf, pos, n)
            if pos < 0:
                return -1
            token = token + 1 + gap
            f += 1
            if token >= alphabet[c] or f >= total_slots or total + f > total_slots:
                return -1
            for slot in range(total, total + f):
                table[c, slot] = np.uint32(f | ((slot - total) << 13) | (token << 25))
            total += f
        if m > 0 and total != total_slots:
            return -1
        if m == 0:
            # An unused context decodes its largest token, which every codec refuses (a class
            # beyond the classes, a filler length or id gap beyond any row or vocabulary).
            sentinel = np.uint32((total_slots - 1) | ((alphabet[c] - 1) << 25))
            for slot in range(total_slots):
                table[c, slot] = sentinel
    return pos


@njit(**_JIT)
def _init_states(buf, start, x):  # pragma: no cover - compiled
    for j in range(ANS_STATES):
        v = np.uint32(0)
        for b in range(4):
            v |= np.uint32(buf[start + 4 * j + b]) << np.uint32(8 * b)
        x[j] = v


@njit(**_JIT)
def _finish(x, pos, end):  # pragma: no cover - compiled
    if pos != end:
        return ANS_BAD_STREAM
    for j in range(ANS_STATES):
        if x[j] != ANS_L:
            return ANS_BAD_STREAM
    return 0


# Decoding reads a word whenever a state falls below 2^16, without a branch; the stream is
# copied with ANS_PAD zero bytes after it so that those reads stay inside the buffer, and the
# position is checked against the real end once at the finish.
ANS_PAD = 8


@njit(**_JIT)
def _renorm(s, buf, pos):  # pragma: no cover - compiled
    low = np.uint32(s < np.uint32(ANS_L))
    word = np.uint32(buf[pos]) | (np.uint32(buf[pos + 1]) << np.uint32(8))
    s = (s << (low << np.uint32(4))) | (word & (np.uint32(0) - low))
    return s, pos + 2 * np.int64(low)


@njit(**_JIT)
def _token(s, table, c):  # pragma: no cover - compiled
    e = table[c, s & np.uint32(0xFFF)]
    s = (e & np.uint32(0x1FFF)) * (s >> np.uint32(12)) + ((e >> np.uint32(13)) & np.uint32(0xFFF))
    return s, e >> np.uint32(25)


@njit(**_JIT)
def _raw(s, b, buf, pos):  # pragma: no cover - compiled
    """b raw bits (0..32), least significant piece of at most 16 first."""
    if b > 16:
        low = s & np.uint32(0xFFFF)
        s = s >> np.uint32(16)
        s, pos = _renorm(s, buf, pos)
        high = s & ((np.uint32(1) << np.uint32(b - 16)) - np.uint32(1))
        s = s >> np.uint32(b - 16)
        s, pos = _renorm(s, buf, pos)
        return s, low | (high << np.uint32(16)), pos
    v = s & ((np.uint32(1) << np.uint32(b)) - np.uint32(1))
    s = s >> np.uint32(b)
    s, pos = _renorm(s, buf, pos)
    return s, v, pos


@njit(**_JIT)
def _hybrid(s, table, c, nbits, base, buf, pos):  # pragma: no cover - compiled
    s, t = _token(s, table, c)
    s, pos = _renorm(s, buf, pos)
    b = nbits[t]
    if b == 0:  # most values of a delta-coded column: small, no raw bits
        return s, base[t], pos
    s, v, pos = _raw(s, b, buf, pos)
    return s, base[t] | v, pos


@njit(**_JIT)
def ans_uint_decode(
    buf, end, start, ctx_of_rank, row_length, table, nbits, base, out
):  # pragma: no cover - compiled
    """Decode out.shape[0] hybrid-coded values from buf[start:end] (buf padded past end).

    The four states rotate: the value being decoded always uses s0, which is state i % 4.
    Values fit `out` by construction: the alphabets stop at the tokens of the largest value.
    """
    if end - start < 4 * ANS_STATES:
        return ANS_BAD_STREAM
    x = np.empty(ANS_STATES, dtype=np.uint32)
    _init_states(buf, start, x)
    s0, s1, s2, s3 = x[0], x[1], x[2], x[3]
    pos = start + 4 * ANS_STATES
    n = out.shape[0]
    for row in range(0, n, row_length):
        for r in range(min(row_length, n - row)):
            s, v, pos = _hybrid(s0, table, ctx_of_rank[r], nbits, base, buf, pos)
            s0, s1, s2, s3 = s1, s2, s3, s
            out[row + r] = v
        if pos > end:
            return ANS_BAD_STREAM
    x[0], x[1], x[2], x[3] = s0, s1, s2, s3
    return _finish(x, pos, end)


# Contexts of the ans_ids codec beyond the 8 rank contexts.
IDS_CTX_GAP = 8
IDS_CTX_CLASS = 9
IDS_CTX_FILL = 10
MAX_ID = 1 << 24


@njit(**_JIT)
def filler_counts(ids, row_length, stamp, out):  # pragma: no cover - compiled
    """Per row, the length F <= K - 1 of its longest suffix that is "filler": the F smallest
    ids not among the row's other K - F ids, ascending. Lossy rows are padded this way.

    stamp: int64 scratch of at least row_length entries, all < 0 on entry (it is left so).
    """
    k = row_length
    n_rows = ids.shape[0] // k
    for r in range(n_rows):
        base = r * k
        # Candidate suffix: ids < k, strictly increasing; a filler suffix is such a run.
        f = 0
        while f < k - 1:
            v = ids[base + k - 1 - f]
            if v < 0 or v >= k:
                break
            if f > 0 and v >= ids[base + k - f]:
                break
            f += 1
        # Shrink until the suffix is exactly the |suffix| smallest ids not in the prefix.
        while f > 0:
            for c in range(k - f):
                v = ids[base + c]
                if 0 <= v < k:
                    stamp[v] = r
            want = 0
            ok = True
            for c in range(k - f, k):
                while stamp[want] == r:
                    want += 1
                if ids[base + c] != want:
                    ok = False
                    break
                want += 1
            for c in range(k - f):
                v = ids[base + c]
                if 0 <= v < k:
                    stamp[v] = -1
            if ok:
                break
            f -= 1
        out[r] = f


@njit(**_JIT)
def ids_steps(
    ids, row_length, fill, class_of, index_of, ctx_of_rank, ctx, tok, nbits, raw, start
):  # pragma: no cover
    """Steps of the data part of ans_ids from step `start`: per row F (if K >= 2) and the
    K - F ids as (rank context, class, class bits of the index). Returns the next step."""
    k = row_length
    n = ids.shape[0]
    s = start
    i = 0
    row = 0
    while i < n:
        width = min(k, n - i)
        f = 0
        if k >= 2:
            f = fill[row] if width == k else 0
            v = np.uint64(f)
            ctx[s] = IDS_CTX_FILL
            if v < 16:
                tok[s] = v
                nbits[s] = 0
                raw[s] = 0
            else:
                nn = _bit_length_minus_one(v)
                tok[s] = 16 + 4 * (nn - 4) + ((v >> (nn - 2)) & 3)
                nbits[s] = nn - 2
                raw[s] = v & ((np.uint64(1) << np.uint64(nn - 2)) - np.uint64(1))
            s += 1
        for c in range(width - f):
            v = ids[i + c]
            cl = class_of[v]
            ctx[s] = ctx_of_rank[c]
            tok[s] = cl
            nbits[s] = cl
            raw[s] = index_of[v]
            s += 1
        i += width
        row += 1
    return s


@njit(**_JIT)
def ans_ids_decode(
    buf, end, start, ctx_of_rank, row_length, n_distinct, table, nbits, base, out
):  # pragma: no cover - compiled
    """Decode an ans_ids stream from buf[start:end] (buf padded past end): the distinct ids
    (gaps), their classes, then the rows. Returns 0 or an error code; every decoded value is
    checked before it is used as an index."""
    if end - start < 4 * ANS_STATES:
        return ANS_BAD_STREAM
    x = np.empty(ANS_STATES, dtype=np.uint32)
    _init_states(buf, start, x)
    pos = start + 4 * ANS_STATES
    d = n_distinct
    step = 0
    distinct = np.empty(d, dtype=np.int64)
    prev = np.int64(-1)
    for e in range(d):
        j = step & 3
        s, v, pos = _hybrid(x[j], table, IDS_CTX_GAP, nbits, base, buf, pos)
        x[j] = s
        step += 1
        prev = prev + 1 + np.int64(v)
        if prev >= MAX_ID or pos > end:
            return ANS_BAD_VALUE
        distinct[e] = prev
    classes = _bit_length_minus_one(d) + 1
    label = np.empty(d, dtype=np.int64)
    counts = np.zeros(32, dtype=np.int64)
    for e in range(d):
        j = step & 3
        s, t = _token(x[j], table, IDS_CTX_CLASS)
        s, pos = _renorm(s, buf, pos)
        x[j] = s
        step += 1
        if np.int64(t) >= classes or pos > end:
            return ANS_BAD_VALUE
        label[e] = t
        counts[t] += 1
    # Class c holds ranks [2^c - 1, 2^(c+1) - 1) of [0, d): its size is fixed by d.
    first = np.zeros(33, dtype=np.int64)
    for c in range(classes):
        size = min(np.int64(1) << c, d - ((np.int64(1) << c) - 1))
        if counts[c] != size:
            return ANS_BAD_VALUE
        first[c + 1] = first[c] + size
    members = np.empty(d, dtype=np.int32)
    fill_at = first.copy()
    for e in range(d):  # ascending ids within each class
        c = label[e]
        members[fill_at[c]] = distinct[e]
        fill_at[c] += 1
    k = row_length
    n = out.shape[0]
    stamp = np.full(k, -1, dtype=np.int64)
    row = 0
    i = 0
    while i < n:
        width = min(k, n - i)
        f = 0
        if k >= 2:
            j = step & 3
            s, v, pos = _hybrid(x[j], table, IDS_CTX_FILL, nbits, base, buf, pos)
            x[j] = s
            step += 1
            if v >= np.uint32(width) or (width < k and v != 0):
                return ANS_BAD_VALUE
            f = np.int64(v)
        bad = False
        # The states rotate (s0 is state step % 4) so that they stay in registers.
        s0, s1, s2, s3 = x[step & 3], x[(step + 1) & 3], x[(step + 2) & 3], x[(step + 3) & 3]
        for c in range(width - f):
            s, cl = _token(s0, table, ctx_of_rank[c])
            s, pos = _renorm(s, buf, pos)
            s, idx, pos = _raw(s, cl, buf, pos)
            s0, s1, s2, s3 = s1, s2, s3, s
            # Class c starts at rank 2^c - 1 and an index has c bits, so only the last class
            # can overflow, past rank d - 1 (a class >= the classes lands there too).
            at = (np.int64(1) << np.int64(cl)) - 1 + np.int64(idx)
            bad |= at >= d
            out[i + c] = members[min(at, d - 1)]
        step += width - f
        x[step & 3], x[(step + 1) & 3], x[(step + 2) & 3], x[(step + 3) & 3] = s0, s1, s2, s3
        if bad or pos > end:
            return ANS_BAD_VALUE if bad else ANS_BAD_STREAM
        if f > 0:
            for c in range(width - f):
                v = out[i + c]
                if 0 <= v < k:
                    stamp[v] = row
            want = 0
            for c in range(width - f, width):
                while stamp[want] == row:
                    want += 1
                out[i + c] = want
                want += 1
        i += width
        row += 1
    return _finish(x, pos, end)


# -- fp16_grid: logprobs on a grid of lossy caches (spec section 6.11) ------------------------

GRID_EXACT_ROW = 0x10000  # flag of the first element of a row stored exactly


@njit(**_JIT)
def fp16_grid_encode(bits, row_length, index_of_bits, out):  # pragma: no cover - compiled
    """Per row: the first value's key, then grid indices (first absolute, then differences
    mod 2^32) when every later value is on the grid; otherwise GRID_EXACT_ROW | key and the
    key differences of fp16_key_delta. index_of_bits: int32 [65536], -1 off the grid."""
    n = bits.shape[0]
    for start in range(0, n, row_length):
        stop = min(start + row_length, n)
        on_grid = True
        for i in range(start + 1, stop):
            if index_of_bits[bits[i]] < 0:
                on_grid = False
                break
        b = bits[start]
        key = np.uint32(~b & 0xFFFF) if b & 0x8000 else np.uint32(b | 0x8000)
        if on_grid:
            out[start] = key
            prev = np.int64(0)
            for i in range(start + 1, stop):
                idx = np.int64(index_of_bits[bits[i]])
                out[i] = np.uint32((idx - prev) & 0xFFFFFFFF)
                prev = idx
        else:
            out[start] = GRID_EXACT_ROW | key
            prev_key = key
            for i in range(start + 1, stop):
                b = bits[i]
                k2 = np.uint32(~b & 0xFFFF) if b & 0x8000 else np.uint32(b | 0x8000)
                out[i] = np.uint32((prev_key - k2) & 0xFFFF)
                prev_key = k2


@njit(**_JIT)
def fp16_grid_decode(values, row_length, grid_bits, out):  # pragma: no cover - compiled
    """Inverse of fp16_grid_encode; returns -1 on a value outside its range."""
    n = values.shape[0]
    top = np.int64(grid_bits.shape[0])
    for start in range(0, n, row_length):
        stop = min(start + row_length, n)
        first = values[start]
        if first > (GRID_EXACT_ROW | 0xFFFF):
            return -1
        key = np.uint32(first & 0xFFFF)
        out[start] = np.uint16(key & 0x7FFF) if key & 0x8000 else np.uint16(~key & 0xFFFF)
        if first & GRID_EXACT_ROW:
            for i in range(start + 1, stop):
                d = values[i]
                if d > 0xFFFF:
                    return -1
                key = np.uint32((key - d) & 0xFFFF)
                out[i] = np.uint16(key & 0x7FFF) if key & 0x8000 else np.uint16(~key & 0xFFFF)
        else:
            idx = np.int64(0)
            for i in range(start + 1, stop):
                idx = (idx + np.int64(values[i])) & 0xFFFFFFFF
                if idx >= top:
                    return -1
                out[i] = grid_bits[idx]
    return 0


@njit(**_JIT)
def quantize_rows(
    bits, keep, step, zero_index, grid_bits, value_table, exp_table, out_bits
):  # pragma: no cover - compiled
    """Lossy logprobs of the lossy_kl writer, row by row (rows in canonical order).

    Entry 0 is kept exactly. Entries 1..keep[r]-1 go to the grid point j*step nearest their
    value, except that the running mass error is fed back: when it exceeds a quarter of the
    row's outside mass, an entry takes the other neighbouring grid point if that reduces it,
    so that the outside bucket 1 - sum(p) survives quantisation. Entries from keep[r] on, and
    those below the grid, become -65504 (no mass). value_table / exp_table: the value and its
    exp for every fp16 bit pattern.
    """
    n, k = bits.shape
    chosen = np.full(k, -1, dtype=np.int64)  # grid index of each entry of the row, -1: none
    for r in range(n):
        kr = keep[r]
        mass = 0.0
        for c in range(kr):
            mass += exp_table[bits[r, c]]
        tolerance = 0.25 * max(0.0, 1.0 - mass)
        out_bits[r, 0] = bits[r, 0]
        err = 0.0
        for c in range(1, k):
            chosen[c] = -1
            b = bits[r, c]
            if c >= kr:
                out_bits[r, c] = 0xFBFF
                continue
            p = exp_table[b]
            t = -value_table[b] / step
            j = np.int64(np.floor(t + 0.5))
            if j >= zero_index:
                out_bits[r, c] = 0xFBFF
                err -= p
                continue
            lo = np.int64(np.floor(t))
            other = lo + 1 if j == lo else lo
            choice = j
            q = exp_table[grid_bits[j]]
            if abs(err + q - p) > tolerance and 0 <= other < zero_index:
                q_other = exp_table[grid_bits[other]]
                if abs(err + q_other - p) < abs(err + q - p):
                    choice = other
                    q = q_other
            # A grid point above the exact first entry would reorder the row: take the next.
            while (
                choice < zero_index - 1 and value_table[grid_bits[choice]] > value_table[bits[r, 0]]
            ):
                choice += 1
                q = exp_table[grid_bits[choice]]
            out_bits[r, c] = grid_bits[choice]
            chosen[c] = choice
            err += q - p
        # The outside bucket must not vanish on one side only: a row whose mass reaches 1
        # keeps a stored mass >= 1, a row with mass left outside keeps some outside. Entries,
        # smallest first, move one grid step towards that until it holds.
        top = value_table[bits[r, 0]]
        for c in range(kr - 1, 0, -1):
            if mass >= 1.0:
                if mass + err >= 1.0:
                    break
                j = chosen[c] - 1  # up: more mass
                if chosen[c] <= 0 or value_table[grid_bits[j]] > top:
                    continue
            else:
                if mass + err < 1.0 - 0.5 * (1.0 - mass):
                    break
                j = chosen[c] + 1  # down: less mass
                if chosen[c] < 0 or j >= zero_index:
                    continue
            err += exp_table[grid_bits[j]] - exp_table[grid_bits[chosen[c]]]
            chosen[c] = j
            out_bits[r, c] = grid_bits[j]


@njit(**_JIT)
def sort_and_pad_rows(ids, bits, pad, stamp):  # pragma: no cover - compiled
    """Canonical order (value descending, ties by id ascending) of each row, then the entries
    equal to `pad` (at the end) get the smallest ids not among the others, ascending.

    stamp: int64 [K] scratch, all < 0 on entry (left so).
    """
    n, k = ids.shape
    for r in range(n):
        # Padding is at the end already (it is the lowest value): sort the entries before it.
        real = k
        while real > 0 and bits[r, real - 1] == pad:
            real -= 1
        for c in range(1, real):
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
        if real == k:
            continue
        for c in range(real):
            v = ids[r, c]
            if 0 <= v < k:
                stamp[v] = r
        want = 0
        for c in range(real, k):
            while stamp[want] == r:
                want += 1
            ids[r, c] = want
            want += 1
        for c in range(real):
            v = ids[r, c]
            if 0 <= v < k:
                stamp[v] = -1


@njit(**_JIT)
def keep_counts(bits, max_cost, exp_table, out):  # pragma: no cover - compiled
    """Leading entries each row keeps: the fewest whose left-out mass costs at most max_cost
    nats, the cost being log(mass of the whole row / mass kept)."""
    n, k = bits.shape
    for r in range(n):
        total = 0.0
        for c in range(k):
            total += exp_table[bits[r, c]]
        kept = 0.0
        out[r] = k
        for c in range(k):
            kept += exp_table[bits[r, c]]
            if kept > 0.0 and np.log(total / kept) <= max_cost:
                out[r] = c + 1
                break


@njit(**_JIT)
def lossy_row_errors(lossless, stored, pad, value_table, exp_table, out):  # pragma: no cover
    """The row error of logitcache.lossy.row_errors, row by row without a log per entry:
    log(p / q) of an entry is the difference of the two logprobs."""
    n, k = lossless.shape
    for r in range(n):
        mk = mp = mq = 0.0
        for c in range(k):
            mk += exp_table[lossless[r, c]]
            if stored[r, c] != pad:
                mp += exp_table[lossless[r, c]]
                mq += exp_table[stored[r, c]]
        if mp <= 0.0:
            out[r] = 0.0
            continue
        pt = max(0.0, 1.0 - mp)
        qt = max(0.0, 1.0 - mq)
        zp = mp + pt
        zq = mq + qt
        # sums of p (lp - lq) and q (lq - lp) over stored entries
        sp = 0.0
        sq = 0.0
        for c in range(k):
            if stored[r, c] != pad:
                p = exp_table[lossless[r, c]]
                q = exp_table[stored[r, c]]
                d = value_table[lossless[r, c]] - value_table[stored[r, c]]
                sp += p * d
                sq -= q * d
        if mq <= 0.0:
            out[r] = np.inf
            continue
        fwd = sp / mp - np.log(mp) + np.log(mq)
        rev = sq / mq - np.log(mq) + np.log(mp)
        trunc = np.log(mk / mp)
        tail_fwd = (sp - mp * (np.log(zp) - np.log(zq))) / zp
        tail_rev = (sq - mq * (np.log(zq) - np.log(zp))) / zq
        if pt > 0.0:
            tail_fwd += (pt / zp) * (np.log(pt / zp) - np.log(qt / zq)) if qt > 0.0 else np.inf
        if qt > 0.0:
            tail_rev += (qt / zq) * (np.log(qt / zq) - np.log(pt / zp)) if pt > 0.0 else np.inf
        out[r] = max(max(fwd, rev + trunc), max(tail_fwd, tail_rev))
