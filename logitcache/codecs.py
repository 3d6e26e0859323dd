"""Column codecs: small named transforms with a JSON config, chained into a pipeline per column.

A shard footer stores each column's pipeline as a list of configs, so any reader rebuilds the
exact decoder (the numcodecs idea). Every codec maps bytes to bytes; spec/FORMAT.md gives the
exact algorithm of each.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import zstandard

from . import _numpy_kernels
from .format import (
    COL_INPUT_IDS,
    COL_LOSS_MASK,
    COL_RECORD_LENGTHS,
    COL_SAMPLE_ID_BYTES,
    COL_SAMPLE_ID_LENGTHS,
    COL_TOPK_IDS,
    COL_TOPK_LOGPROBS,
    CorruptCacheError,
)

_KERNELS = None

# The read path decodes with numpy until a process has passed this many bytes through its
# decoders, then loads numba, whose kernels take half the time. Loading numba costs a process
# about 0.2 s of CPU beyond its imports: most of the time to a first batch or of a short
# evaluation. numpy spends about 0.13 ns a byte more (8 bytes counted per id and logprob), so
# by 1.3-1.7 GiB it has spent what loading costs (benchmarks/bench_decoders.py measures both,
# fresh processes; the spread is between runs): switching near the break-even never costs
# more than about twice the best choice made in hindsight. None of this applies once
# `logitcache kernels build` has compiled the decoders for this machine (compiled.py): those
# load in well under a millisecond and are used from the first byte. Output is bit-identical
# whichever kernels decode.
JIT_AFTER_BYTES = 2 << 30
_numpy_decoded = 0
_COMPILED = None
_compiled_looked = False
_compiled_lock = threading.Lock()


def kernels():
    """The numba kernels, imported on first use: `import logitcache`, commands that only read
    manifests and short reads of the default pipelines never load numba."""
    global _KERNELS
    if _KERNELS is None:
        from . import _kernels

        _KERNELS = _kernels
    return _KERNELS


# Bytes the default pipelines pass through those decoders per (id, logprob) pair: 4 through
# the id unshuffle, 2 through the logprob unshuffle and 2 through the key-delta decoder.
DECODED_BYTES_PER_PAIR = 8


def compiled_kernels():
    """This machine's decoders compiled ahead of time (compiled.py), looked for once per
    process: None when they are not built or are turned off."""
    global _COMPILED, _compiled_looked
    if not _compiled_looked:
        with _compiled_lock:  # read-ahead threads may ask first, together
            if not _compiled_looked:
                from . import compiled

                _COMPILED = compiled.load()
                _compiled_looked = True
    return _COMPILED


def decode_kernels():
    """Kernels for the decoders that numpy has no twin of: the compiled ones when built, else
    numba's."""
    return compiled_kernels() or kernels()


def expect_decoding(nbytes: int) -> None:
    """Load numba now if a job about to pass `nbytes` through the decoders will cross
    JIT_AFTER_BYTES: a scan known to be long pays the load up front and decodes all of itself
    with the faster kernels, rather than most of itself with numpy first. Nothing to load
    when the compiled kernels are built."""
    crossing = _numpy_decoded + nbytes >= JIT_AFTER_BYTES
    if crossing and _KERNELS is None and compiled_kernels() is None:
        kernels()


def read_kernels(nbytes: int):
    """The kernels for decoding `nbytes` more, or None to decode them with numpy: the
    compiled ones when built; else numba's once it is loaded (by a writer, say) or once this
    process has decoded JIT_AFTER_BYTES."""
    global _numpy_decoded
    compiled = compiled_kernels()
    if compiled is not None:
        return compiled
    if _KERNELS is None:
        _numpy_decoded += nbytes
        if _numpy_decoded < JIT_AFTER_BYTES:
            return None
    return kernels()


def ready_kernels():
    """The compiled kernels, else numba's if this process has loaded them, else None: which
    kernels a read can use without loading numba or counting toward JIT_AFTER_BYTES."""
    return compiled_kernels() or _KERNELS


class CodecError(CorruptCacheError):
    """Stored bytes that a codec cannot decode to the size the footer promises."""


def _as_u8(data) -> np.ndarray:
    if isinstance(data, np.ndarray):
        if data.dtype == np.uint8 and data.ndim == 1:
            return data  # a block of a mapped shard: every read passes here
        return data.reshape(-1).view(np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


class Codec:
    """One step of a pipeline. `encode` and `decode` take and return 1-D uint8 arrays."""

    codec_id: ClassVar[str]

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Codec:
        return cls()

    def encode(self, buf: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def plane_starts(self, size: int) -> list[int]:
        """Where planes of unlike bytes begin in the encoding of `size` bytes (a zstd stage
        after this one ends its blocks there)."""
        return []

    # True when max_encoded_size() is the exact encoded size, not only a bound.
    exact_encoded_size: ClassVar[bool] = True
    # Largest decoded / encoded size ratio the codec can produce (bounds hostile footers).
    max_expansion: ClassVar[int] = 1
    # True when decoding needs the exact decoded size (not only a bound).
    needs_exact_size: ClassVar[bool] = False

    def decode(self, buf: np.ndarray, decoded_size: int, exact: bool = True) -> np.ndarray:
        """Invert encode. The result has exactly `decoded_size` bytes when `exact`, else at
        most that many; anything else raises CodecError."""
        raise NotImplementedError

    def _check_size(self, size: int, decoded_size: int, exact: bool) -> None:
        if size > decoded_size or (exact and size != decoded_size):
            bound = "" if exact else "at most "
            raise CodecError(f"{self.codec_id}: {size} bytes, expected {bound}{decoded_size}")

    def max_encoded_size(self, decoded_size: int) -> int:
        """Upper bound of the encoded size, used to bound the stage before it on decode."""
        return decoded_size

    # Decoding a byte range of the output without the rest (Pipeline.stage). A "local" codec
    # decodes output bytes [a, b) from input bytes [a, b) alone, for a and b multiples of
    # range_unit(); a "gather" codec implements gather() and check_whole().
    range_kind: ClassVar[str | None] = None

    def range_unit(self) -> int:
        return 1

    def gather(
        self, buf: np.ndarray, decoded_size: int, start: int, stop: int
    ) -> tuple[np.ndarray, int, int]:
        """(sub, sub_size, skip): a small encoding whose decode(sub, sub_size) holds output
        bytes [start, stop) after its first `skip` bytes. `buf` passed check_whole()."""
        raise NotImplementedError

    def check_whole(self, buf: np.ndarray, decoded_size: int) -> None:
        """The checks decode() makes of the whole input, for a block decoded by ranges."""
        raise NotImplementedError

    def decode_range(self, buf: np.ndarray, decoded_size: int, start: int, stop: int):
        """Output bytes [start, stop) of a gather codec's whole input `buf` (which passed
        check_whole; 0 <= start <= stop <= decoded_size, checked by the caller)."""
        sub, size, skip = self.gather(buf, decoded_size, start, stop)
        return self.decode(sub, size, True)[skip : skip + stop - start]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.get_config()})"


def _positive_int(config: dict, key: str, low: int, high: int) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise CodecError(f"codec {config.get('id')!r}: {key}={value!r} must be in [{low}, {high}]")
    return value


class Zstd(Codec):
    """Zstandard frame with its content size; decode refuses any other size (no bombs)."""

    codec_id = "zstd"
    exact_encoded_size = False
    # An RLE block: 4 bytes for a 128 KiB block.
    max_expansion = 32768
    _local = threading.local()

    def __init__(self, level: int = 3):
        self.level = level

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "level": self.level}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Zstd:
        return cls(_positive_int(config, "level", -7, 22))

    def _compressor(self) -> zstandard.ZstdCompressor:
        cache = self._local.__dict__.setdefault("compressors", {})
        comp = cache.get(self.level)
        if comp is None:
            comp = cache[self.level] = zstandard.ZstdCompressor(
                level=self.level, write_content_size=True
            )
        return comp

    def encode(self, buf: np.ndarray, block_ends: Sequence[int] = ()) -> np.ndarray:
        """One frame; with `block_ends`, zstd blocks also end at those offsets."""
        if not block_ends:
            return np.frombuffer(self._compressor().compress(buf), dtype=np.uint8)
        stream = self._compressor().compressobj(size=buf.size)
        parts, start = [], 0
        for end in [*block_ends, buf.size]:
            parts.append(stream.compress(buf[start:end]))
            if end < buf.size:
                parts.append(stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
            start = end
        parts.append(stream.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH))
        return np.frombuffer(b"".join(parts), dtype=np.uint8)

    def decode(self, buf: np.ndarray, decoded_size: int, exact: bool = True) -> np.ndarray:
        try:
            size = zstandard.frame_content_size(buf)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd: not a valid frame ({exc})") from None
        if size < 0:
            raise CodecError("zstd: frame does not declare its content size")
        if size > decoded_size or (exact and size != decoded_size):
            self._check_size(size, decoded_size, exact)  # raises, naming the sizes
        dctx = self._local.__dict__.get("decompressor")
        if dctx is None:
            dctx = self._local.decompressor = zstandard.ZstdDecompressor()
        try:
            # Refuses bytes after the frame: a block is exactly one frame (checked in C).
            out = dctx.decompress(buf, max_output_size=size, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            frame = zstd_frame_length(buf)
            if frame < 0:
                raise CodecError("zstd: the frame is cut short") from None
            if frame != len(buf):
                raise CodecError(
                    f"zstd: the block holds {len(buf)} bytes but its frame ends at byte "
                    f"{frame}; a block is exactly one frame"
                ) from None
            raise CodecError(f"zstd: {exc}") from None
        if len(out) != size:
            raise CodecError(f"zstd: decoded {len(out)} bytes, frame declared {size}")
        return np.frombuffer(out, dtype=np.uint8)

    def max_encoded_size(self, decoded_size: int) -> int:
        return decoded_size + decoded_size // 128 + 1024


def zstd_frame_length(buf) -> int:
    """Bytes taken by the Zstandard frame at the start of `buf` (RFC 8878, section 3.1.1),
    found by walking its block headers; -1 when the frame runs past the end of `buf`."""
    data = memoryview(buf).cast("B")
    pos = zstandard.frame_header_size(data)
    descriptor = data[4]
    while True:
        if pos + 3 > len(data):
            return -1
        header = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
        block_type, block_size = (header >> 1) & 3, header >> 3
        pos += 3 + (1 if block_type == 1 else block_size)  # an RLE block stores one byte
        if header & 1:  # the last block
            break
    pos += 4 if descriptor & 0x04 else 0  # the optional content checksum
    return pos if pos <= len(data) else -1


class Shuffle(Codec):
    """Byte transposition: all first bytes of the elements, then all second bytes, ..."""

    codec_id = "shuffle"

    def __init__(self, elementsize: int):
        self.elementsize = elementsize

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "elementsize": self.elementsize}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Shuffle:
        return cls(_positive_int(config, "elementsize", 1, 16))

    def _check(self, size: int) -> None:
        if size % self.elementsize:
            raise CodecError(f"shuffle: {size} bytes is not a multiple of {self.elementsize}")

    def encode(self, buf: np.ndarray) -> np.ndarray:
        self._check(buf.size)
        out = np.empty_like(buf)
        kernels().byte_shuffle(buf, self.elementsize, out)
        return out

    def plane_starts(self, size: int) -> list[int]:
        n = size // self.elementsize
        return [b * n for b in range(1, self.elementsize)]

    range_kind = "gather"

    def check_whole(self, buf: np.ndarray, decoded_size: int) -> None:
        self._check_size(buf.size, decoded_size, True)
        self._check(buf.size)

    def gather(self, buf, decoded_size, start, stop):
        es = self.elementsize
        planes = buf.reshape(es, decoded_size // es)[:, start // es : stop // es]
        return np.ascontiguousarray(planes).reshape(-1), stop - start, 0

    def decode(self, buf: np.ndarray, decoded_size: int, exact: bool = True) -> np.ndarray:
        self._check_size(buf.size, decoded_size, exact)
        self._check(buf.size)
        jit = read_kernels(buf.size)
        if jit is None:
            return _numpy_kernels.byte_unshuffle(buf, self.elementsize)
        out = np.empty(buf.size, dtype=np.uint8)
        jit.byte_unshuffle(buf, self.elementsize, out)
        return out


class ByteBitShuffle(Codec):
    """Low bytes of each element as byte planes (as `shuffle`), high bytes as bit planes.

    For token ids the high bits are mostly zero and rarely one: as bit planes they cost zstd
    a fraction of a bit per id, where a byte plane of 0/1 values costs about a bit.
    """

    codec_id = "byte_bit_shuffle"
    needs_exact_size = True

    def __init__(self, elementsize: int, byte_planes: int):
        self.elementsize = elementsize
        self.byte_planes = byte_planes
        self._bit_planes = 8 * (elementsize - byte_planes)

    def get_config(self) -> dict[str, Any]:
        return {
            "id": self.codec_id,
            "elementsize": self.elementsize,
            "byte_planes": self.byte_planes,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ByteBitShuffle:
        elementsize = _positive_int(config, "elementsize", 1, 16)
        return cls(elementsize, _positive_int(config, "byte_planes", 0, elementsize))

    def max_encoded_size(self, decoded_size: int) -> int:
        n = decoded_size // self.elementsize
        return self.byte_planes * n + (self.elementsize - self.byte_planes) * 8 * ((n + 7) // 8)

    def plane_starts(self, size: int) -> list[int]:
        # The byte planes, then the bit planes together (nearly all zero bytes).
        n = size // self.elementsize
        return [b * n for b in range(1, self.byte_planes + 1)]

    def encode(self, buf: np.ndarray) -> np.ndarray:
        if buf.size % self.elementsize:
            raise CodecError(
                f"byte_bit_shuffle: {buf.size} bytes is not a multiple of {self.elementsize}"
            )
        out = np.zeros(self.max_encoded_size(buf.size), dtype=np.uint8)
        kernels().byte_bit_shuffle(buf, self.elementsize, self.byte_planes, out)
        return out

    range_kind = "gather"

    def check_whole(self, buf: np.ndarray, decoded_size: int) -> None:
        self._check_encoded_size(buf, decoded_size, True)
        n = decoded_size // self.elementsize
        bits = buf[self.byte_planes * n :].reshape(self._bit_planes, (n + 7) // 8)
        if n % 8 and bits.size and (bits[:, -1] & ((1 << (8 - n % 8)) - 1)).any():
            raise CodecError("byte_bit_shuffle: a padding bit is set")

    def gather(self, buf, decoded_size, start, stop):
        # Bit planes pack 8 elements a byte: start from a multiple of 8, clear the bits of
        # elements past `stop` (they are padding in the smaller encoding).
        es, n = self.elementsize, decoded_size // self.elementsize
        first, end = start // es // 8 * 8, stop // es
        m = end - first
        byte_planes = buf[: self.byte_planes * n].reshape(self.byte_planes, n)[:, first:end]
        bits = buf[self.byte_planes * n :].reshape(self._bit_planes, (n + 7) // 8)
        bits = bits[:, first // 8 : first // 8 + (m + 7) // 8].copy()
        if m % 8 and bits.size:
            bits[:, -1] &= np.uint8(0xFF ^ ((1 << (8 - m % 8)) - 1))
        sub = np.concatenate([byte_planes.reshape(-1), bits.reshape(-1)])
        return sub, m * es, start - first * es

    def decode_range(self, buf: np.ndarray, decoded_size: int, start: int, stop: int):
        if (self.elementsize, self.byte_planes) == (4, 2) and stop > start:  # token ids
            jit = read_kernels(stop - start)
            if jit is not None:
                whole = buf.size == self.max_encoded_size(decoded_size)
                _check_range(whole, decoded_size, start, stop, 4)
                first = start // 32 * 8  # bit planes pack 8 ids a byte
                words = np.empty(stop // 4 - first, dtype=np.uint32)
                if jit.unshuffle_ids_span(buf, decoded_size // 4, first, words) == 0:
                    return words.view(np.uint8)[start - 4 * first :]
        return super().decode_range(buf, decoded_size, start, stop)

    def _check_encoded_size(self, buf: np.ndarray, decoded_size: int, exact: bool) -> None:
        if not exact or decoded_size % self.elementsize:
            raise CodecError(
                "byte_bit_shuffle: the decoded size must be known exactly (use it "
                "first in a pipeline or after size-preserving codecs)"
            )
        if buf.size != self.max_encoded_size(decoded_size):
            raise CodecError(
                f"byte_bit_shuffle: {buf.size} bytes, expected "
                f"{self.max_encoded_size(decoded_size)}"
            )

    def decode(self, buf: np.ndarray, decoded_size: int, exact: bool = True) -> np.ndarray:
        self._check_encoded_size(buf, decoded_size, exact)
        if (self.elementsize, self.byte_planes) == (4, 2):  # token ids
            jit = read_kernels(decoded_size)
            if jit is None:
                out = np.empty(decoded_size, dtype=np.uint8)
                status = _numpy_kernels.unshuffle_ids(buf, out)
            else:
                out = _unshuffle_ids(jit, buf, decoded_size // 4)
                if out is not None:
                    return out
                out = np.zeros(decoded_size, dtype=np.uint8)
                status = jit.byte_bit_unshuffle(buf, 4, 2, out)
        else:
            out = np.zeros(decoded_size, dtype=np.uint8)
            status = decode_kernels().byte_bit_unshuffle(
                buf, self.elementsize, self.byte_planes, out
            )
        if status != 0:
            raise CodecError("byte_bit_shuffle: a padding bit is set")
        return out


def _unshuffle_ids(jit, buf: np.ndarray, n: int) -> np.ndarray | None:
    """numba's fast path of byte_bit_shuffle(4, 2) decoding, or None when more than two bit
    planes hold a set bit (ids of 2**18 and above: the generic kernel decodes those)."""
    words = np.empty(n, dtype=np.uint32)
    status = jit.unshuffle_ids_auto(buf, n, words)
    if status < 0:
        raise CodecError("byte_bit_shuffle: a padding bit is set")
    return None if status else words.view(np.uint8)


class Fp16KeyDelta(Codec):
    """fp16 -> order-preserving uint16 key -> per-row gaps (prev - cur, mod 2**16).

    Rows in canonical (descending) order turn into one key followed by small gaps, which
    the byte shuffle and zstd after it store in a few bits each. Lossless for every bit pattern.
    """

    codec_id = "fp16_key_delta"
    range_kind = "local"  # each row decodes from its own gaps

    def __init__(self, row_length: int):
        self.row_length = row_length

    def range_unit(self) -> int:
        return 2 * self.row_length

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "row_length": self.row_length}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Fp16KeyDelta:
        return cls(_positive_int(config, "row_length", 1, 1 << 20))

    def encode(self, buf: np.ndarray) -> np.ndarray:
        if buf.size % 2:
            raise CodecError("fp16_key_delta: odd number of bytes")
        out = np.empty(buf.size // 2, dtype=np.uint16)
        kernels().fp16_key_delta_encode(buf.view(np.uint16), self.row_length, out)
        return out.view(np.uint8)

    def decode(self, buf: np.ndarray, decoded_size: int, exact: bool = True) -> np.ndarray:
        self._check_size(buf.size, decoded_size, exact)
        if buf.size % 2:
            raise CodecError("fp16_key_delta: odd number of bytes")
        deltas = aligned_view(buf, np.uint16)
        jit = read_kernels(buf.size)
        if jit is None:
            return _numpy_kernels.fp16_key_delta_decode(deltas, self.row_length).view(np.uint8)
        out = np.empty(deltas.size, dtype=np.uint16)
        jit.fp16_key_delta_decode(deltas, self.row_length, out)
        return out.view(np.uint8)


class KeyDeltaPlanes(Codec):
    """fp16_key_delta then shuffle(elementsize=2), as one decode step: the gaps go from the
    two byte planes straight to fp16 bits in one kernel call (fp16_key_delta_planes), where
    the two codecs took two calls and a buffer between them. Pipelines decode through it in
    their place (Pipeline._decoders); it has no config of its own, so no cache names it."""

    codec_id = "fp16_key_delta+shuffle"
    range_kind = "gather"

    def __init__(self, key_delta: Fp16KeyDelta):
        self.key_delta = key_delta
        self.shuffle = Shuffle(2)

    def range_unit(self) -> int:
        return self.key_delta.range_unit()

    def encode(self, buf: np.ndarray) -> np.ndarray:
        return self.shuffle.encode(self.key_delta.encode(buf))

    def check_whole(self, buf: np.ndarray, decoded_size: int) -> None:
        self.shuffle.check_whole(buf, decoded_size)

    def gather(self, buf, decoded_size, start, stop):
        return self.shuffle.gather(buf, decoded_size, start, stop)

    def decode(self, buf: np.ndarray, decoded_size: int, exact: bool = True) -> np.ndarray:
        self.shuffle._check_size(buf.size, decoded_size, exact)
        self.shuffle._check(buf.size)
        return self.decode_range(buf, buf.size, 0, buf.size)

    def decode_range(self, buf: np.ndarray, decoded_size: int, start: int, stop: int):
        jit = read_kernels(stop - start)
        if jit is None:
            planes = self.shuffle.decode_range(buf, decoded_size, start, stop)
            return self.key_delta.decode(planes, stop - start, True)
        _check_range(buf.size == decoded_size, decoded_size, start, stop, 2)
        n = decoded_size // 2
        lo, hi = start // 2, stop // 2
        out = np.empty(hi - lo, dtype=np.uint16)
        jit.fp16_key_delta_planes(buf[lo:hi], buf[n + lo : n + hi], self.key_delta.row_length, out)
        return out.view(np.uint8)


def _check_range(whole: bool, decoded_size: int, start: int, stop: int, unit: int) -> None:
    """What a kernel indexing a whole block by a byte range needs (`whole`: the block has
    its full size), checked before it runs; StagedBlock.decode_range checked its rows."""
    if not whole or not 0 <= start <= stop <= decoded_size or start % unit or stop % unit:
        raise CodecError(f"cannot decode bytes [{start}, {stop}) of a {decoded_size}-byte block")


def _fused(codecs: Sequence[Codec]) -> list[Codec]:
    """`codecs` with each fp16_key_delta followed by shuffle(elementsize=2) as one
    KeyDeltaPlanes: the steps a pipeline decodes through."""
    steps: list[Codec] = []
    for codec in codecs:
        if (
            isinstance(codec, Shuffle)
            and codec.elementsize == 2
            and steps
            and type(steps[-1]) is Fp16KeyDelta
        ):
            steps[-1] = KeyDeltaPlanes(steps[-1])
        else:
            steps.append(codec)
    return steps


class Int32Delta(Codec):
    """Differences of consecutive int32 values (wrapping), for slowly varying sequences."""

    codec_id = "int_delta"

    def encode(self, buf: np.ndarray) -> np.ndarray:
        if buf.size % 4:
            raise CodecError("int_delta: size is not a multiple of 4")
        out = np.empty(buf.size // 4, dtype=np.int32)
        kernels().int32_delta_encode(buf.view(np.int32), out)
        return out.view(np.uint8)

    def decode(self, buf: np.ndarray, decoded_size: int, exact: bool = True) -> np.ndarray:
        self._check_size(buf.size, decoded_size, exact)
        if buf.size % 4:
            raise CodecError("int_delta: size is not a multiple of 4")
        out = np.empty(buf.size // 4, dtype=np.int32)
        decode_kernels().int32_delta_decode(aligned_view(buf, np.int32), out)
        return out.view(np.uint8)


class Varint(Codec):
    """LEB128 of each little-endian uint32: 7 bits a byte, high bit set on all but the last."""

    codec_id = "varint"
    exact_encoded_size = False
    max_expansion = 4

    def encode(self, buf: np.ndarray) -> np.ndarray:
        if buf.size % 4:
            raise CodecError("varint: size is not a multiple of 4")
        out = np.empty(self.max_encoded_size(buf.size), dtype=np.uint8)
        used = kernels().varint_encode(buf.view(np.uint32), out)
        return out[:used]

    def decode(self, buf: np.ndarray, decoded_size: int, exact: bool = True) -> np.ndarray:
        out = np.empty(decoded_size // 4, dtype=np.uint32)
        count = decode_kernels().varint_decode(buf, out)
        if count < 0:
            raise CodecError("varint: malformed or truncated data")
        self._check_size(count * 4, decoded_size, exact)
        return out[:count].view(np.uint8)

    def max_encoded_size(self, decoded_size: int) -> int:
        return decoded_size // 4 * 5


# -- entropy coding (spec/FORMAT.md sections 6.8-6.11) ---------------------------------------

ANS_BITS = 12
ANS_SLOTS = 1 << ANS_BITS
ANS_RANK_CONTEXTS = 8
# Largest decoded / stored ratio of the rANS codecs: every value costs at least one token of
# probability <= 4095/4096, that is >= 3.52e-4 bits, so a 4-byte value needs >= 1/90,843 byte.
ANS_MAX_EXPANSION = 1 << 17


def rank_contexts(row_length: int) -> np.ndarray:
    """Context of each rank r in a row: 0 for r = 0, else min(7, floor(log2 r) + 1)."""
    ranks = np.arange(max(1, row_length), dtype=np.int64)
    ctx = np.zeros(ranks.shape, dtype=np.uint8)
    ctx[1:] = np.minimum(7, np.floor(np.log2(ranks[1:])).astype(np.int64) + 1)
    return ctx


def normalize_frequencies(counts: np.ndarray) -> np.ndarray:
    """Frequencies summing to 4096 from token counts: every counted token gets >= 1, none all
    of them (a lone token shares with one other, so no value is ever free of cost)."""
    counts = np.asarray(counts, dtype=np.int64)
    present = np.flatnonzero(counts)
    freq = np.zeros(counts.shape, dtype=np.int64)
    if present.size == 0:
        return freq
    if present.size == 1:
        other = 1 if present[0] == 0 else 0
        freq[present[0]], freq[other] = ANS_SLOTS - 1, 1
        return freq
    share = counts[present] * (ANS_SLOTS / counts.sum())
    f = np.maximum(1, np.floor(share).astype(np.int64))
    # Hand out what is left by largest remainder, or take back from the largest frequencies.
    left = ANS_SLOTS - int(f.sum())
    if left > 0:
        order = np.argsort(-(share - np.floor(share)), kind="stable")
        f[order[: left % len(f)]] += 1
        f += left // len(f)
    while left < 0:
        i = int(np.argmax(f))
        take = min(-left, int(f[i]) - 1)
        f[i] -= take
        left += take
    freq[present] = f
    return freq


def _varint_bytes(values) -> bytes:
    out = bytearray()
    for v in values:
        v = int(v)
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def encode_freq_tables(freqs: np.ndarray) -> bytes:
    """Tables of spec section 6.8: per context m, then m (gap, freq - 1) pairs."""
    values: list[int] = []
    for row in freqs:
        tokens = np.flatnonzero(row)
        values.append(len(tokens))
        prev = -1
        for t in tokens.tolist():
            values += [t - prev - 1, int(row[t]) - 1]
            prev = t
    return _varint_bytes(values)


def _parse_tables(buf: np.ndarray, start: int, alphabet: np.ndarray, codec: str):
    """The decoding table of a block's frequency tables and the offset after them."""
    table = np.zeros((len(alphabet), ANS_SLOTS), dtype=np.uint32)
    end = kernels().read_freq_tables(buf, start, len(alphabet), alphabet, table)
    if end < 0:
        raise CodecError(f"{codec}: a frequency table is malformed or cut short")
    return table, int(end)


def _has_tables(buf: np.ndarray, contexts: np.ndarray) -> bool:
    """Whether the frequency tables at the start of `buf` give each of `contexts` a table:
    read again only when a context's first slot looks like the unused-context sentinel."""
    pos, want = 0, set(contexts.tolist())
    for c in range(int(contexts.max()) + 1):
        m, pos = _read_varint(buf, pos)
        if c in want and m == 0:
            return False
        for _ in range(2 * m):
            _, pos = _read_varint(buf, pos)
    return True


def _read_varint(buf: np.ndarray, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = int(buf[pos])
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _padded(buf: np.ndarray) -> np.ndarray:
    """The block followed by zero bytes, so the decoder's unconditional reads stay inside."""
    kern = kernels()
    out = np.zeros(buf.size + kern.ANS_PAD, dtype=np.uint8)
    out[: buf.size] = buf
    return out


def _reciprocals(freqs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Granlund-Montgomery constants of each frequency f: floor(x / f) for any 32-bit x is
    (t + ((x - t) >> shift1)) >> shift2 with t = (rcp * x) >> 32."""
    f = np.maximum(freqs.astype(np.int64), 1)
    bits = np.ceil(np.log2(f)).astype(np.int64)
    rcp = ((np.int64(1) << 32) * ((np.int64(1) << bits) - f)) // f + 1
    return rcp.astype(np.uint64), np.minimum(bits, 1), np.maximum(bits - 1, 0)


def _rans_stream(ctx, tok, nbits, raw, freqs: np.ndarray) -> np.ndarray:
    cum = np.zeros(freqs.shape, dtype=np.uint32)
    cum[:, 1:] = np.cumsum(freqs, axis=1)[:, :-1]
    rcp, shift1, shift2 = _reciprocals(freqs)
    out = np.empty(16 + 8 * len(ctx) + 64, dtype=np.uint8)
    used = kernels().rans_encode(
        ctx, tok, nbits, raw, freqs.astype(np.uint32), cum, rcp, shift1, shift2, out
    )
    if used < 0:  # pragma: no cover - the buffer holds the worst case
        raise CodecError("rANS: output buffer too small")
    return out[:used]


def _step_arrays(n: int):
    return (
        np.empty(n, dtype=np.uint8),
        np.empty(n, dtype=np.uint8),
        np.empty(n, dtype=np.uint8),
        np.empty(n, dtype=np.uint32),
    )


def _token_freqs(ctx, tok, contexts: int, width: int) -> np.ndarray:
    counts = np.bincount(ctx.astype(np.int64) * width + tok, minlength=contexts * width).reshape(
        contexts, width
    )
    return np.stack([normalize_frequencies(row) for row in counts])


class AnsUint(Codec):
    """rANS entropy coding of unsigned integers (after a delta transform: small numbers).

    Each value is a hybrid token (values below 16 exactly, larger ones by magnitude and two
    leading bits, the rest as raw bits) from a frequency table of its rank within the row,
    one table set per block (spec section 6.9).
    """

    codec_id = "ans_uint"
    exact_encoded_size = False
    needs_exact_size = True
    max_expansion = ANS_MAX_EXPANSION

    def __init__(self, elementsize: int, row_length: int):
        if elementsize not in (2, 4):
            raise CodecError(f"ans_uint: elementsize={elementsize!r} must be 2 or 4")
        self.elementsize = elementsize
        self.row_length = row_length
        self._alphabet = 64 if elementsize == 2 else 128
        self._ctx = rank_contexts(row_length)

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "elementsize": self.elementsize, "row_length": self.row_length}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AnsUint:
        return cls(
            _positive_int(config, "elementsize", 2, 4),
            _positive_int(config, "row_length", 1, 1 << 20),
        )

    @property
    def _dtype(self):
        return np.uint16 if self.elementsize == 2 else np.uint32

    def max_encoded_size(self, decoded_size: int) -> int:
        return 2 * decoded_size + 16384

    def encode(self, buf: np.ndarray) -> np.ndarray:
        if buf.size % self.elementsize:
            raise CodecError(f"ans_uint: {buf.size} bytes is not a multiple of {self.elementsize}")
        n = buf.size // self.elementsize
        if n == 0:
            return np.zeros(0, dtype=np.uint8)
        values = aligned_view(buf, self._dtype)
        ctx, tok, nbits, raw = _step_arrays(n)
        kernels().hybrid_uint_steps(values, self._ctx, self.row_length, ctx, tok, nbits, raw)
        freqs = _token_freqs(ctx, tok, ANS_RANK_CONTEXTS, self._alphabet)
        tables = np.frombuffer(encode_freq_tables(freqs), dtype=np.uint8)
        return np.concatenate([tables, _rans_stream(ctx, tok, nbits, raw, freqs)])

    def decode(self, buf: np.ndarray, decoded_size: int, exact: bool = True) -> np.ndarray:
        if not exact or decoded_size % self.elementsize:
            raise CodecError("ans_uint: the decoded size must be known exactly")
        n = decoded_size // self.elementsize
        if n == 0:
            if buf.size:
                raise CodecError("ans_uint: data left over in an empty block")
            return np.zeros(0, dtype=np.uint8)
        alphabet = np.full(ANS_RANK_CONTEXTS, self._alphabet, dtype=np.int64)
        table, start = _parse_tables(buf, 0, alphabet, "ans_uint")
        used = np.unique(self._ctx[: min(n, self.row_length)])
        if (table[used, 0] >> 25 == self._alphabet - 1).any() and not _has_tables(buf, used):
            raise CodecError("ans_uint: a context that codes values has no frequency table")
        out = np.empty(n, dtype=self._dtype)
        kern = kernels()
        status = kern.ans_uint_decode(
            _padded(buf),
            buf.size,
            start,
            self._ctx,
            self.row_length,
            table,
            kern.HU_NBITS,
            kern.HU_BASE,
            out,
        )
        if status != 0:
            raise CodecError(f"ans_uint: {_ANS_STATUS.get(status, 'corrupt stream')}")
        return out.view(np.uint8)


_ANS_STATUS = {
    -1: "the stream is truncated, has data left over, or does not end in its initial states",
    -2: "a decoded value is out of range",
}

# Alphabets of the ans_ids contexts: 8 rank contexts and the class context code classes (at
# most 25), the gap context hybrid tokens of ids < 2^24, the filler context those of F < 4096.
_IDS_ALPHABET = np.array([32] * 8 + [128, 32, 64], dtype=np.int64)
_IDS_WIDTH = 128


class AnsIds(Codec):
    """rANS entropy coding of token ids, one model per block (spec section 6.10).

    The block's distinct ids are ranked by count; rank r falls in class c = floor(log2(r+1)),
    whose 2^c members are ordered by id. An id is coded as its class (a token of the table of
    its rank within the row) and its index in the class (c raw bits), so a frequent id costs a
    few bits and the table costs about as much as a canonical Huffman code's lengths. Rows
    that end in filler (the smallest ids not in the row, as lossy caches pad short rows) code
    only the filler's length.
    """

    codec_id = "ans_ids"
    exact_encoded_size = False
    needs_exact_size = True

    def __init__(self, row_length: int):
        self.row_length = row_length
        self._ctx = rank_contexts(row_length)
        # A row of K values can cost as little as two tokens (its filler length and one id).
        self.max_expansion = ANS_MAX_EXPANSION if row_length == 1 else (1 << 16) * row_length

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "row_length": self.row_length}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AnsIds:
        return cls(_positive_int(config, "row_length", 1, 4096))

    def max_encoded_size(self, decoded_size: int) -> int:
        return 4 * decoded_size + 32768

    def encode(self, buf: np.ndarray) -> np.ndarray:
        if buf.size % 4:
            raise CodecError(f"ans_ids: {buf.size} bytes is not a multiple of 4")
        ids = aligned_view(buf, np.int32)
        n = ids.size
        if n == 0:
            return np.zeros(0, dtype=np.uint8)
        kern = kernels()
        if ids.min() < 0 or ids.max() >= kern.MAX_ID:
            raise CodecError("ans_ids: ids must be in [0, 2^24)")
        k = self.row_length
        fill = np.zeros(n // k, dtype=np.int64)
        coded = np.ones(n, dtype=bool)
        if k >= 2 and n >= k:
            kern.filler_counts(ids, k, np.full(k, -1, dtype=np.int64), fill)
            if fill.any():
                pos = np.arange(n // k * k).reshape(-1, k) % k
                coded[: n // k * k] = (pos < (k - fill)[:, None]).reshape(-1)
        counts = np.bincount(ids[coded])
        distinct = np.flatnonzero(counts)
        d = distinct.size
        rank = np.empty(d, dtype=np.int64)
        rank[np.lexsort((distinct, -counts[distinct]))] = np.arange(d)
        label = np.floor(np.log2(rank + 1)).astype(np.int64)
        # Index within the class: members in id order (distinct is ascending).
        by_class = np.argsort(label, kind="stable")
        first = np.searchsorted(label[by_class], np.arange(32))
        index = np.empty(d, dtype=np.int64)
        index[by_class] = np.arange(d) - first[label[by_class]]
        class_of = np.zeros(counts.size, dtype=np.uint8)
        index_of = np.zeros(counts.size, dtype=np.uint32)
        class_of[distinct] = label
        index_of[distinct] = index
        rows = -(-n // k)
        total = 2 * d + (rows if k >= 2 else 0) + int(coded.sum())
        ctx, tok, nbits, raw = _step_arrays(total)
        gaps = np.diff(distinct, prepend=-1) - 1
        kern.hybrid_uint_steps(
            gaps.astype(np.uint32),
            np.array([8], np.uint8),
            1,
            ctx[:d],
            tok[:d],
            nbits[:d],
            raw[:d],
        )
        ctx[d : 2 * d] = kern.IDS_CTX_CLASS
        tok[d : 2 * d] = label
        nbits[d : 2 * d] = 0
        raw[d : 2 * d] = 0
        end = kern.ids_steps(
            ids, k, fill, class_of, index_of, self._ctx, ctx, tok, nbits, raw, 2 * d
        )
        if end != total:  # pragma: no cover - internal consistency
            raise CodecError(f"ans_ids: {end} steps, expected {total}")
        freqs = _token_freqs(ctx, tok, len(_IDS_ALPHABET), _IDS_WIDTH)
        header = _varint_bytes([d]) + encode_freq_tables(freqs)
        return np.concatenate(
            [np.frombuffer(header, dtype=np.uint8), _rans_stream(ctx, tok, nbits, raw, freqs)]
        )

    def decode(self, buf: np.ndarray, decoded_size: int, exact: bool = True) -> np.ndarray:
        if not exact or decoded_size % 4:
            raise CodecError("ans_ids: the decoded size must be known exactly")
        n = decoded_size // 4
        if n == 0:
            if buf.size:
                raise CodecError("ans_ids: data left over in an empty block")
            return np.zeros(0, dtype=np.uint8)
        counts = np.empty(1, dtype=np.uint32)
        head = buf[: min(buf.size, 5)]
        if kernels().varint_decode(_first_varint(head), counts) != 1:
            raise CodecError("ans_ids: the count of distinct ids is malformed")
        d = int(counts[0])
        if not 1 <= d <= n:
            raise CodecError(f"ans_ids: {d} distinct ids for {n} values")
        start = _varint_length(head)
        table, start = _parse_tables(buf, start, _IDS_ALPHABET, "ans_ids")
        out = np.empty(n, dtype=np.int32)
        kern = kernels()
        status = kern.ans_ids_decode(
            _padded(buf),
            buf.size,
            start,
            self._ctx,
            self.row_length,
            d,
            table,
            kern.HU_NBITS,
            kern.HU_BASE,
            out,
        )
        if status != 0:
            raise CodecError(f"ans_ids: {_ANS_STATUS.get(status, 'corrupt stream')}")
        return out.view(np.uint8)


def _varint_length(head: np.ndarray) -> int:
    for i, b in enumerate(head.tolist()):
        if b < 0x80:
            return i + 1
    return len(head) + 1


def _first_varint(head: np.ndarray) -> np.ndarray:
    return head[: _varint_length(head)]


# -- fp16_grid --------------------------------------------------------------------------------

GRID_UNIT = 1024  # grid steps are multiples of 1/1024 nat
GRID_RANGE = 64  # nats: the grid covers [-64, 0]; below it a value carries no mass
_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def grid_tables(step: int) -> tuple[np.ndarray, np.ndarray]:
    """(grid_bits, index_of_bits) of the grid with step `step`/1024: grid_bits[j] is the
    binary16 nearest -(j * step / 1024) for j <= 65536 // step (j = 0: -0.0), then -65504;
    index_of_bits maps a bit pattern to its smallest j, -1 off the grid."""
    tables = _GRIDS.get(step)
    if tables is None:
        j = np.arange(GRID_RANGE * GRID_UNIT // step + 1, dtype=np.float64)
        values = -(j * step) / GRID_UNIT
        grid = np.concatenate([values.astype(np.float16), [np.float16(-65504.0)]])
        grid_bits = grid.view(np.uint16).copy()
        grid_bits[0] = 0x8000
        index_of = np.full(1 << 16, -1, dtype=np.int32)
        index_of[grid_bits[::-1]] = np.arange(len(grid_bits) - 1, -1, -1, dtype=np.int32)
        tables = _GRIDS[step] = (grid_bits, index_of)
    return tables


class Fp16Grid(Codec):
    """Logprobs of lossy caches: per row the first value exactly, the others as indices on a
    grid of step `step`/1024 nat (first absolute, then differences: small numbers for
    ans_uint). A row with a value off the grid is stored as fp16_key_delta does, flagged.
    Output: one uint32 per value (spec section 6.11)."""

    codec_id = "fp16_grid"

    def __init__(self, row_length: int, step: int):
        self.row_length = row_length
        self.step = step

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "row_length": self.row_length, "step": self.step}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Fp16Grid:
        return cls(
            _positive_int(config, "row_length", 1, 1 << 20),
            _positive_int(config, "step", 1, 2048),
        )

    def max_encoded_size(self, decoded_size: int) -> int:
        return 2 * decoded_size

    def encode(self, buf: np.ndarray) -> np.ndarray:
        if buf.size % 2:
            raise CodecError("fp16_grid: odd number of bytes")
        _, index_of = grid_tables(self.step)
        out = np.empty(buf.size // 2, dtype=np.uint32)
        kernels().fp16_grid_encode(aligned_view(buf, np.uint16), self.row_length, index_of, out)
        return out.view(np.uint8)

    def decode(self, buf: np.ndarray, decoded_size: int, exact: bool = True) -> np.ndarray:
        if buf.size % 4:
            raise CodecError("fp16_grid: size is not a multiple of 4")
        self._check_size(buf.size // 2, decoded_size, exact)
        grid_bits, _ = grid_tables(self.step)
        out = np.empty(buf.size // 4, dtype=np.uint16)
        if decode_kernels().fp16_grid_decode(
            aligned_view(buf, np.uint32), self.row_length, grid_bits, out
        ):
            raise CodecError("fp16_grid: a grid index or key difference is out of range")
        return out.view(np.uint8)


def aligned_view(buf: np.ndarray, dtype) -> np.ndarray:
    """`buf` (uint8) viewed as `dtype`, through a copy when its address does not suit the
    dtype (numba's kernels take aligned arrays). It reads the view's alignment flag:
    `buf.ctypes.data` builds an object per call, which a scan would pay on every block."""
    view = buf.view(dtype)
    return view if view.flags.aligned else buf.copy().view(dtype)


CODECS: dict[str, type[Codec]] = {
    cls.codec_id: cls
    for cls in (
        Zstd,
        Shuffle,
        ByteBitShuffle,
        Fp16KeyDelta,
        Int32Delta,
        Varint,
        AnsUint,
        AnsIds,
        Fp16Grid,
    )
}


def codec_from_config(config: dict[str, Any]) -> Codec:
    if not isinstance(config, dict) or "id" not in config:
        raise CodecError(f"codec config {config!r}: must be an object with an 'id'")
    cls = CODECS.get(config["id"])
    if cls is None:
        raise CodecError(
            f"unknown codec {config['id']!r}; this reader knows {sorted(CODECS)}: "
            "upgrade logitcache or re-encode the cache with `logitcache convert`"
        )
    return cls.from_config(config)


# Planes shorter than this share zstd blocks: a block of its own costs its own tables.
MIN_PLANE_BLOCK = 16 << 10


def zstd_block_ends(plane_starts: Sequence[int], size: int) -> list[int]:
    """Where a zstd stage ends its blocks, given where the stage before began its planes.

    A plane of shuffled low bytes of ids is nearly random: alone in its blocks, zstd stores it
    raw, which decodes at memory speed, where sharing a block with the compressible plane
    after it puts both through Huffman coding. On real-sized chunks this decodes the ids
    column 1.8x faster and makes it smaller too. Decoders see ordinary frames (spec 6.1).
    """
    ends, last = [], 0
    for start in plane_starts:
        if start - last >= MIN_PLANE_BLOCK and size - start >= MIN_PLANE_BLOCK:
            ends.append(start)
            last = start
    return ends


class Pipeline:
    """Codecs applied in order on encode and in reverse on decode."""

    def __init__(self, codecs: Sequence[Codec]):
        self.codecs = list(codecs)
        exact = True
        for codec in self.codecs:
            if codec.needs_exact_size and not exact:
                raise CodecError(
                    f"codec {codec.codec_id!r} must come first in a pipeline or after codecs "
                    f"with exact sizes, not after {[c.codec_id for c in self.codecs]}"
                )
            exact = exact and codec.exact_encoded_size
        # The steps decoding goes through: the codecs, some pairs fused (see _fused).
        self._decoders = _fused(self.codecs)
        # Four of the seven default columns are zstd alone: decoded without the size chain.
        self._only = self.codecs[0] if len(self.codecs) == 1 else None
        # unpack/finish: a zstd stage undone first, then the rest (the inner pipeline).
        self._zstd_outer = bool(self.codecs) and isinstance(self.codecs[-1], Zstd)
        self._inner = Pipeline(self.codecs[:-1]) if self._zstd_outer else self
        # Range decoding (stage): "local" steps first, then one "gather" step.
        self._range_plan = None
        for i, codec in enumerate(self._decoders):
            if codec.range_kind == "gather":
                before = Pipeline(self._decoders[i + 1 :])  # decodes only
                self._range_plan = (self._decoders[:i], codec, before)
            if codec.range_kind != "local":
                break

    @classmethod
    def from_config(cls, configs: Sequence[dict[str, Any]]) -> Pipeline:
        if not isinstance(configs, list) or len(configs) > 16:
            raise CodecError(f"codec pipeline {configs!r}: must be a list of at most 16 codecs")
        return cls([codec_from_config(c) for c in configs])

    def get_config(self) -> list[dict[str, Any]]:
        return [c.get_config() for c in self.codecs]

    def encode(self, array: np.ndarray) -> bytes:
        buf = _as_u8(np.ascontiguousarray(array))
        planes: list[int] = []
        for codec in self.codecs:
            if isinstance(codec, Zstd):
                buf = codec.encode(buf, zstd_block_ends(planes, buf.size))
            else:
                planes = codec.plane_starts(buf.size)
                buf = codec.encode(buf)
                continue
            planes = []
        return buf.tobytes() if not isinstance(buf, bytes) else buf

    def decode_bytes(self, data, decoded_size: int) -> np.ndarray:
        """Decode to exactly `decoded_size` bytes, or raise CodecError."""
        buf = _as_u8(data)
        if self._only is not None:
            buf = self._only.decode(buf, decoded_size, True)
            if buf.size != decoded_size:
                raise CodecError(f"pipeline decoded {buf.size} bytes, expected {decoded_size}")
            return buf
        if not self.codecs:
            if buf.size != decoded_size:
                raise CodecError(f"raw block of {buf.size} bytes, expected {decoded_size}")
            return buf
        sizes, exact = self._stage_sizes(decoded_size)
        for codec, size, is_exact in zip(
            reversed(self._decoders), reversed(sizes), reversed(exact), strict=True
        ):
            buf = codec.decode(buf, size, is_exact)
        if buf.size != decoded_size:
            raise CodecError(f"pipeline decoded {buf.size} bytes, expected {decoded_size}")
        return buf

    def _stage_sizes(self, decoded_size: int) -> tuple[list[int], list[bool]]:
        """The output size of each decode step's, from the raw end: exact while every step
        before it has an exact encoded size, an upper bound after the first one that does not."""
        sizes, exact = [decoded_size], [True]
        for codec in self._decoders[:-1]:
            sizes.append(codec.max_encoded_size(sizes[-1]))
            exact.append(exact[-1] and codec.exact_encoded_size)
        return sizes, exact

    def unpack(self, data, decoded_size: int) -> np.ndarray:
        """Undo the first decode stage when it is zstd, and only that: `finish` does the rest,
        and finish(unpack(data, n), n) equals decode_bytes(data, n). The split is the one
        between zstd's C and the decoders, which benchmarks/bench_scan_anatomy.py times."""
        buf = _as_u8(data)
        if not self._zstd_outer:
            return buf
        sizes, exact = self._stage_sizes(decoded_size)
        return self.codecs[-1].decode(buf, sizes[-1], exact[-1])

    def finish(self, buf: np.ndarray, decoded_size: int) -> np.ndarray:
        """Decode what `unpack` left to exactly `decoded_size` bytes, or raise CodecError."""
        return self._inner.decode_bytes(buf, decoded_size)

    def stage(self, data, decoded_size: int, unit: int) -> StagedBlock | None:
        """Undo the stages that need the whole block (zstd) and check what the rest would
        check of it, so that StagedBlock.decode_range(a, b) decodes bytes [a, b) alone, for
        a and b multiples of `unit`: a random read of one record decodes its rows, not its
        chunk's. None when this pipeline cannot decode by ranges of `unit` bytes."""
        if not self._stages_by(unit):
            return None
        _, gather, before = self._range_plan
        buf = before.decode_bytes(data, gather.max_encoded_size(decoded_size))
        return self._staged(buf, decoded_size, unit)

    def stage_unzipped(self, buf: np.ndarray, decoded_size: int, unit: int):
        """`stage` of a block whose stages before the range decoding are undone already: a
        zstd frame that native.py decoded. None when this pipeline does not stage so."""
        if not self._stages_by(unit) or [type(c) for c in self._range_plan[2].codecs] != [Zstd]:
            return None
        gather = self._range_plan[1]
        if buf.size != gather.max_encoded_size(decoded_size):
            raise CodecError(
                f"{buf.size} bytes before {gather.codec_id}, expected "
                f"{gather.max_encoded_size(decoded_size)}"
            )
        return self._staged(buf, decoded_size, unit)

    def _stages_by(self, unit: int) -> bool:
        """Whether this pipeline decodes byte ranges that are multiples of `unit`."""
        if self._range_plan is None:
            return False
        local, gather, _ = self._range_plan
        return not any(unit % codec.range_unit() for codec in [*local, gather])

    def _staged(self, buf: np.ndarray, decoded_size: int, unit: int) -> StagedBlock:
        """The StagedBlock of `buf`, what the range-decoding step gets, once checked whole."""
        local, gather, _ = self._range_plan
        gather.check_whole(buf, decoded_size)
        return StagedBlock(buf, decoded_size, unit, gather, local)

    def max_expansion(self) -> int:
        """Upper bound of decoded size / stored size over the whole pipeline."""
        bound = 1
        for codec in self.codecs:
            bound *= codec.max_expansion
        return bound

    def decode(self, data, dtype, count: int) -> np.ndarray:
        dtype = np.dtype(dtype)
        buf = self.decode_bytes(data, count * dtype.itemsize)
        return aligned_view(buf, dtype)

    def __repr__(self) -> str:
        return f"Pipeline({self.get_config()})"


class StagedBlock:
    """A block whose whole-block stages are undone (Pipeline.stage): decodes byte ranges."""

    def __init__(
        self, buf: np.ndarray, decoded_size: int, unit: int, gather: Codec, local: list[Codec]
    ):
        self.buf, self.decoded_size, self.unit = buf, decoded_size, unit
        self._gather, self._local = gather, local

    def decode_range(self, start: int, stop: int) -> np.ndarray:
        """Decoded bytes [start, stop): the same as decoding the block and slicing it."""
        # The gather step's kernels index the block with these: checked here, once.
        if not 0 <= start <= stop <= self.decoded_size or start % self.unit or stop % self.unit:
            raise ValueError(
                f"byte range [{start}, {stop}) is not one of whole {self.unit}-byte units "
                f"within the block's {self.decoded_size} bytes"
            )
        out = self._gather.decode_range(self.buf, self.decoded_size, start, stop)
        for codec in reversed(self._local):
            out = codec.decode(out, stop - start, True)
        return out


def default_pipeline_configs(k: int) -> dict[str, list[dict[str, Any]]]:
    """The pipelines a writer uses unless told otherwise (chosen by benchmarks/bench_codec.py)."""
    zstd = {"id": "zstd", "level": 1}
    ids = {"id": "byte_bit_shuffle", "elementsize": 4, "byte_planes": 2}
    return {
        COL_RECORD_LENGTHS: [zstd],
        COL_INPUT_IDS: [ids, zstd],
        COL_LOSS_MASK: [zstd],
        COL_TOPK_IDS: [ids, zstd],
        COL_TOPK_LOGPROBS: [
            {"id": "fp16_key_delta", "row_length": k},
            {"id": "shuffle", "elementsize": 2},
            zstd,
        ],
        COL_SAMPLE_ID_LENGTHS: [zstd],
        COL_SAMPLE_ID_BYTES: [zstd],
    }


def entropy_pipeline_configs(k: int, *, logprobs: str = "ans") -> dict[str, list[dict[str, Any]]]:
    """Pipelines with rANS entropy coding for the teacher columns (spec sections 6.8-6.10).

    The ids always go through `ans_ids`, where entropy coding gains most. `logprobs="ans"`
    codes the logprob gaps with `ans_uint` too: the smallest lossless cache. `logprobs="zstd"`
    leaves them to fp16_key_delta + shuffle + zstd level 1: a few bytes more per target and
    faster decoding, since rANS decodes one symbol at a time (figures on real teacher rows in
    benchmarks/results/bench_codec.json). Pass as CacheWriter(..., codecs=...).
    """
    if logprobs == "ans":
        tail: list[dict[str, Any]] = [{"id": "ans_uint", "elementsize": 2, "row_length": k}]
    elif logprobs == "zstd":
        tail = [{"id": "shuffle", "elementsize": 2}, {"id": "zstd", "level": 1}]
    else:
        raise ValueError(f"logprobs={logprobs!r}: choose 'ans' or 'zstd'")
    return {
        COL_TOPK_IDS: [{"id": "ans_ids", "row_length": k}],
        COL_TOPK_LOGPROBS: [{"id": "fp16_key_delta", "row_length": k}, *tail],
    }


def default_pipelines(k: int) -> dict[str, Pipeline]:
    return {col: Pipeline.from_config(cfg) for col, cfg in default_pipeline_configs(k).items()}
