"""Decode kernels of the default pipelines in numpy: a short read loads no JIT compiler.

Loading numba and its compiled kernels costs a process about 0.25 s of CPU, most of the time
to a first batch, paid again by every DataLoader worker. A process decodes with these until
it has decoded codecs.JIT_AFTER_BYTES, then with numba's kernels, about twice as fast. Both
give bit-identical output (tests/test_decode_kernels.py checks one against the other); the
encoders and the less common decoders exist in _kernels.py only.
"""

from __future__ import annotations

import numpy as np

# What record_starts (here and in _kernels) returns.
RECORD_STARTS_OK = 0
RECORD_STARTS_BAD_LENGTHS = 1  # a record length below 1, or lengths not summing to T
RECORD_STARTS_BAD_MASK = 2  # a loss_mask value other than 0 and 1
RECORD_STARTS_MASKED_FIRST = 3  # loss_mask true at a record's first token

# Why _kernels.decode_default_chunk handed a chunk back (native.py decodes it codec by codec).
DEFAULT_CHUNK_BAD_BLOCK = 1  # a checksum, frame or size did not check out
DEFAULT_CHUNK_BAD_RECORDS = 2  # record_starts refused the lengths or the loss mask
DEFAULT_CHUNK_WIDE_IDS = 3  # ids with more than two high bit planes: the generic decoder


def byte_unshuffle(src: np.ndarray, elementsize: int) -> np.ndarray:
    """Inverse of `shuffle`: byte planes back to elements (uint8 in, uint8 out)."""
    n = src.shape[0] // elementsize
    if elementsize == 1:
        return src.copy()
    if elementsize == 2:
        out = np.empty(n, dtype=np.uint16)
        np.left_shift(src[n : 2 * n], 8, out=out, dtype=np.uint16)
        out |= src[:n]
        return out.view(np.uint8)
    if elementsize == 4:
        out = np.empty(n, dtype=np.uint32)
        np.left_shift(src[3 * n :], 24, out=out, dtype=np.uint32)
        out |= np.left_shift(src[2 * n : 3 * n], 16, dtype=np.uint32)
        out |= np.left_shift(src[n : 2 * n], 8, dtype=np.uint32)
        out |= src[:n]
        return out.view(np.uint8)
    out = np.empty(src.shape[0], dtype=np.uint8)
    out.reshape(n, elementsize)[:] = src.reshape(elementsize, n).T
    return out


def unshuffle_ids(src: np.ndarray, out: np.ndarray) -> int:
    """Inverse of byte_bit_shuffle(elementsize=4, byte_planes=2) into `out` (uint8, every
    byte written); returns -1 if a padding bit is set, else 0.

    The two byte planes combine in two vectorised passes. Bits above log2(vocab) are zero in
    every id, so whole bit planes are zero: only planes holding a set bit are expanded.
    """
    n = out.shape[0] // 4
    nb = (n + 7) // 8
    words = out[: n * 4].view(np.uint32)
    np.left_shift(src[n : 2 * n], 8, out=words, dtype=np.uint32)
    words |= src[:n]
    planes = src[2 * n :].reshape(16, nb)
    for q in np.flatnonzero(planes.any(axis=1)).tolist():
        plane = planes[q]
        if n % 8 and plane[-1] & ((1 << (8 - n % 8)) - 1):
            return -1  # the unused low bits of the last byte must be zero
        words |= np.left_shift(np.unpackbits(plane, count=n), 31 - q, dtype=np.uint32)
    return 0


def fp16_key_delta_decode(deltas: np.ndarray, row_length: int) -> np.ndarray:
    """Inverse of fp16_key_delta (uint16 gaps in, uint16 fp16 bits out).

    A row's keys are its first key minus the running sum of its gaps, modulo 2**16: the
    gaps are negated in uint16, each row's first value put back, and every row summed in
    uint16, whose wrap-around is that modulo. Then keys map back to bits without a branch:
    key ^ 0x8000 when its top bit is set, else key ^ 0xFFFF.
    """
    n = deltas.shape[0]
    keys = np.subtract(0, deltas, dtype=np.uint16)
    keys[::row_length] = deltas[::row_length]
    full = n // row_length * row_length
    rows = keys[:full].reshape(-1, row_length)
    np.cumsum(rows, axis=1, dtype=np.uint16, out=rows)
    if full < n:  # a trailing partial row
        np.cumsum(keys[full:], dtype=np.uint16, out=keys[full:])
    flip = keys.view(np.int16) >> 15  # -1 where the top bit is set, else 0
    np.invert(flip, out=flip)
    flip |= np.int16(-0x8000)
    keys ^= flip.view(np.uint16)
    return keys


def record_starts(
    lengths: np.ndarray,
    mask: np.ndarray,
    all_positions: bool,
    token_starts: np.ndarray,
    target_starts: np.ndarray,
) -> int:
    """A chunk's record offsets from its `record_lengths` [R] and `loss_mask` [T] (uint8),
    with the checks of spec section 4.2. Fills token_starts and target_starts [R + 1]
    (int64); returns RECORD_STARTS_OK or the first rule broken."""
    if lengths.size and lengths.min() < 1:
        return RECORD_STARTS_BAD_LENGTHS
    token_starts[0] = 0
    np.cumsum(lengths, dtype=np.int64, out=token_starts[1:])
    if token_starts[-1] != mask.size:
        return RECORD_STARTS_BAD_LENGTHS
    if mask.size and mask.max() > 1:
        return RECORD_STARTS_BAD_MASK
    if mask[token_starts[:-1]].any():
        return RECORD_STARTS_MASKED_FIRST
    if all_positions:
        per_record = lengths.astype(np.int64) - 1
    else:
        per_record = np.add.reduceat(mask, token_starts[:-1], dtype=np.int64)
    target_starts[0] = 0
    np.cumsum(per_record, out=target_starts[1:])
    return RECORD_STARTS_OK
