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


def kernels():
    """The numba kernels, imported on first use: `import logitcache`, commands that only read
    manifests and readers of the default pipelines (_numpy_kernels) never load numba."""
    global _KERNELS
    if _KERNELS is None:
        from . import _kernels

        _KERNELS = _kernels
    return _KERNELS


class CodecError(CorruptCacheError):
    """Stored bytes that a codec cannot decode to the size the footer promises."""


def _as_u8(data) -> np.ndarray:
    if isinstance(data, np.ndarray):
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

    def encode(self, buf: np.ndarray) -> np.ndarray:
        return np.frombuffer(self._compressor().compress(buf), dtype=np.uint8)

    def decode(self, buf: np.ndarray, decoded_size: int, exact: bool = True) -> np.ndarray:
        try:
            size = zstandard.frame_content_size(buf)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd: not a valid frame ({exc})") from None
        if size < 0:
            raise CodecError("zstd: frame does not declare its content size")
        self._check_size(size, decoded_size, exact)
        frame = zstd_frame_length(buf)
        if frame != len(buf):
            raise CodecError(
                f"zstd: the block holds {len(buf)} bytes but its frame ends at byte {frame}; "
                "a block is exactly one frame"
                if frame >= 0
                else "zstd: the frame is cut short"
            )
        dctx = self._local.__dict__.get("decompressor")
        if dctx is None:
            dctx = self._local.decompressor = zstandard.ZstdDecompressor()
        try:
            out = dctx.decompress(buf, max_output_size=size)
        except zstandard.ZstdError as exc:
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

    def decode(self, buf: np.ndarray, decoded_size: int, exact: bool = True) -> np.ndarray:
        self._check_size(buf.size, decoded_size, exact)
        self._check(buf.size)
        return _numpy_kernels.byte_unshuffle(buf, self.elementsize)


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

    def encode(self, buf: np.ndarray) -> np.ndarray:
        if buf.size % self.elementsize:
            raise CodecError(
                f"byte_bit_shuffle: {buf.size} bytes is not a multiple of {self.elementsize}"
            )
        out = np.zeros(self.max_encoded_size(buf.size), dtype=np.uint8)
        kernels().byte_bit_shuffle(buf, self.elementsize, self.byte_planes, out)
        return out

    def decode(self, buf: np.ndarray, decoded_size: int, exact: bool = True) -> np.ndarray:
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
        if (self.elementsize, self.byte_planes) == (4, 2):  # token ids
            out = np.empty(decoded_size, dtype=np.uint8)
            status = _numpy_kernels.unshuffle_ids(buf, out)
        else:
            out = np.zeros(decoded_size, dtype=np.uint8)
            status = kernels().byte_bit_unshuffle(buf, self.elementsize, self.byte_planes, out)
        if status != 0:
            raise CodecError("byte_bit_shuffle: a padding bit is set")
        return out


class Fp16KeyDelta(Codec):
    """fp16 -> order-preserving uint16 key -> per-row gaps (prev - cur, mod 2**16).

    Rows in canonical (descending) order turn into one key followed by small gaps, which
    the byte shuffle and zstd after it store in a few bits each. Lossless for every bit pattern.
    """

    codec_id = "fp16_key_delta"

    def __init__(self, row_length: int):
        self.row_length = row_length

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
        bits = _numpy_kernels.fp16_key_delta_decode(_aligned(buf).view(np.uint16), self.row_length)
        return bits.view(np.uint8)


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
        kernels().int32_delta_decode(_aligned(buf).view(np.int32), out)
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
        count = kernels().varint_decode(buf, out)
        if count < 0:
            raise CodecError("varint: malformed or truncated data")
        self._check_size(count * 4, decoded_size, exact)
        return out[:count].view(np.uint8)

    def max_encoded_size(self, decoded_size: int) -> int:
        return decoded_size // 4 * 5


def _aligned(buf: np.ndarray) -> np.ndarray:
    """A copy when `buf` is not 8-byte aligned, so typed views are safe."""
    if buf.ctypes.data % 8:
        return buf.copy()
    return buf


CODECS: dict[str, type[Codec]] = {
    cls.codec_id: cls for cls in (Zstd, Shuffle, ByteBitShuffle, Fp16KeyDelta, Int32Delta, Varint)
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

    @classmethod
    def from_config(cls, configs: Sequence[dict[str, Any]]) -> Pipeline:
        if not isinstance(configs, list) or len(configs) > 16:
            raise CodecError(f"codec pipeline {configs!r}: must be a list of at most 16 codecs")
        return cls([codec_from_config(c) for c in configs])

    def get_config(self) -> list[dict[str, Any]]:
        return [c.get_config() for c in self.codecs]

    def encode(self, array: np.ndarray) -> bytes:
        buf = _as_u8(np.ascontiguousarray(array))
        for codec in self.codecs:
            buf = codec.encode(buf)
        return buf.tobytes() if not isinstance(buf, bytes) else buf

    def decode_bytes(self, data, decoded_size: int) -> np.ndarray:
        """Decode to exactly `decoded_size` bytes, or raise CodecError."""
        buf = _as_u8(data)
        if not self.codecs:
            if buf.size != decoded_size:
                raise CodecError(f"raw block of {buf.size} bytes, expected {decoded_size}")
            return buf
        # The input size of each stage, from the raw end: exact while every codec before it
        # has an exact encoded size, an upper bound after the first one that does not.
        sizes, exact = [decoded_size], [True]
        for codec in self.codecs[:-1]:
            sizes.append(codec.max_encoded_size(sizes[-1]))
            exact.append(exact[-1] and codec.exact_encoded_size)
        for codec, size, is_exact in zip(
            reversed(self.codecs), reversed(sizes), reversed(exact), strict=True
        ):
            buf = codec.decode(buf, size, is_exact)
        if buf.size != decoded_size:
            raise CodecError(f"pipeline decoded {buf.size} bytes, expected {decoded_size}")
        return buf

    def max_expansion(self) -> int:
        """Upper bound of decoded size / stored size over the whole pipeline."""
        bound = 1
        for codec in self.codecs:
            bound *= codec.max_expansion
        return bound

    def decode(self, data, dtype, count: int) -> np.ndarray:
        dtype = np.dtype(dtype)
        buf = self.decode_bytes(data, count * dtype.itemsize)
        return _aligned(buf).view(dtype)

    def __repr__(self) -> str:
        return f"Pipeline({self.get_config()})"


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


def default_pipelines(k: int) -> dict[str, Pipeline]:
    return {col: Pipeline.from_config(cfg) for col, cfg in default_pipeline_configs(k).items()}
