"""Column codecs: each inverts exactly, configs round-trip through JSON, bad input is refused.

Decoding is fed untrusted bytes, so every size mismatch must be a CodecError (a
CorruptCacheError), never an over-allocation or a wrong-sized result.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from logitcache import CorruptCacheError
from logitcache.codecs import (
    CODECS,
    ByteBitShuffle,
    CodecError,
    Fp16KeyDelta,
    Int32Delta,
    Pipeline,
    Shuffle,
    Varint,
    Zstd,
    codec_from_config,
    default_pipeline_configs,
    default_pipelines,
    zstd_frame_length,
)
from logitcache.format import COLUMN_DTYPES
from logitcache.synthetic import SyntheticTeacher


def u8(data: bytes | np.ndarray) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


def roundtrip(codec, raw: np.ndarray) -> np.ndarray:
    encoded = codec.encode(u8(raw))
    return codec.decode(np.asarray(encoded, dtype=np.uint8), u8(raw).size)


# -- each codec inverts exactly --------------------------------------------------------------


@given(st.binary(max_size=4096), st.integers(1, 16))
def test_shuffle_inverts(data, elementsize):
    data = data[: len(data) - len(data) % elementsize]
    codec = Shuffle(elementsize)
    encoded = codec.encode(u8(data))
    if elementsize > 1 and len(data) >= 2 * elementsize:
        # Byte b of element i moves to plane b.
        n = len(data) // elementsize
        assert encoded[1 * n + 0] == data[1]
    assert roundtrip(codec, u8(data)).tobytes() == data


def test_shuffle_layout_matches_the_spec():
    values = np.array([0x04030201, 0x08070605], dtype="<u4")
    encoded = Shuffle(4).encode(u8(values))
    assert encoded.tobytes() == bytes([1, 5, 2, 6, 3, 7, 4, 8])


@given(
    st.integers(1, 16).flatmap(lambda e: st.tuples(st.just(e), st.integers(0, e))),
    st.binary(max_size=2048),
)
def test_byte_bit_shuffle_inverts(sizes, data):
    elementsize, byte_planes = sizes
    data = data[: len(data) - len(data) % elementsize]
    codec = ByteBitShuffle(elementsize, byte_planes)
    encoded = codec.encode(u8(data))
    assert encoded.size == codec.max_encoded_size(len(data))
    assert codec.decode(encoded, len(data)).tobytes() == data


def test_byte_bit_shuffle_layout_matches_the_spec():
    """Byte planes of the low bytes, then one bit plane per high bit, most significant first."""
    values = np.array([0x80010201, 0x00020304], dtype="<u4")
    encoded = ByteBitShuffle(4, 2).encode(u8(values))
    bit_planes = [0x80] + [0] * 13 + [0x40, 0x80]  # bits 31, 30..18, 17, 16
    assert encoded.tobytes() == bytes([0x01, 0x04, 0x02, 0x03, *bit_planes])


def test_byte_bit_shuffle_refuses_bad_input():
    codec = ByteBitShuffle(4, 2)
    encoded = codec.encode(u8(np.array([1, 2], dtype="<u4")))
    padded = encoded.copy()
    padded[4] |= 0x01  # element 7 of the first bit plane does not exist
    with pytest.raises(CodecError, match="padding bit"):
        codec.decode(padded, 8)
    with pytest.raises(CodecError, match="20 bytes, expected"):
        codec.decode(encoded, 12)
    with pytest.raises(CodecError, match="known exactly"):
        codec.decode(encoded, 8, exact=False)
    with pytest.raises(CodecError, match="multiple of 4"):
        codec.encode(u8(bytes(6)))


def test_fp16_key_delta_is_lossless_for_every_bit_pattern():
    bits = np.arange(1 << 16, dtype=np.uint16)
    rng = np.random.default_rng(0)
    for row_length in (1, 2, 7, 100, 1 << 16):
        shuffled = rng.permutation(bits)
        out = roundtrip(Fp16KeyDelta(row_length), shuffled)
        np.testing.assert_array_equal(out.view(np.uint16), shuffled)


def test_fp16_key_delta_turns_descending_rows_into_gaps():
    ids, logprobs = SyntheticTeacher(32000, 64, seed=1).rows(200)
    encoded = Fp16KeyDelta(64).encode(u8(logprobs)).view(np.uint16).reshape(200, 64)
    bits = logprobs.view(np.uint16).astype(np.int64)
    keys = np.where(bits & 0x8000, ~bits & 0xFFFF, bits | 0x8000)
    # Row starts hold the key itself; the rest hold prev - cur, which never wraps in a
    # canonical (non-increasing) row.
    np.testing.assert_array_equal(encoded[:, 0], keys[:, 0])
    np.testing.assert_array_equal(encoded[:, 1:], -np.diff(keys, axis=1))
    assert (np.diff(keys, axis=1) <= 0).all()
    np.testing.assert_array_equal(
        Fp16KeyDelta(64).decode(u8(encoded), logprobs.nbytes).view(np.uint16),
        logprobs.view(np.uint16).reshape(-1),
    )


def test_fp16_key_order_is_value_order():
    """The key of section 6.3: keys of finite values sort exactly as the values do."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    values = bits.view(np.float16)
    finite = np.isfinite(values)
    keys = np.where(bits & 0x8000, ~bits & 0xFFFF, bits | 0x8000)[finite]
    by_key = values[finite][np.argsort(keys, kind="stable")].astype(np.float64)
    assert (np.diff(by_key) >= 0).all()


@given(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=500))
def test_int_delta_inverts_with_wrapping(values):
    raw = np.array(values, dtype="<i4")
    out = roundtrip(Int32Delta(), raw)
    np.testing.assert_array_equal(out.view("<i4"), raw)


def test_int_delta_wraps_at_the_int32_limits():
    raw = np.array([2**31 - 1, -(2**31), 0, 2**31 - 1, -1], dtype="<i4")
    encoded = Int32Delta().encode(u8(raw)).view("<i4")
    np.testing.assert_array_equal(encoded, [2**31 - 1, 1, -(2**31), 2**31 - 1, -(2**31)])
    np.testing.assert_array_equal(roundtrip(Int32Delta(), raw).view("<i4"), raw)


@given(st.lists(st.integers(0, 2**32 - 1), max_size=500))
def test_varint_inverts(values):
    raw = np.array(values, dtype="<u4")
    encoded = Varint().encode(u8(raw))
    assert encoded.size <= Varint().max_encoded_size(raw.nbytes)
    out = Varint().decode(encoded, raw.nbytes)
    np.testing.assert_array_equal(out.view("<u4"), raw)


def test_varint_layout_matches_leb128():
    raw = np.array([0, 127, 128, 300, 2**32 - 1], dtype="<u4")
    encoded = Varint().encode(u8(raw)).tobytes()
    assert encoded == b"\x00\x7f\x80\x01\xac\x02\xff\xff\xff\xff\x0f"


@pytest.mark.parametrize(
    "data, decoded_size",
    [
        (b"\x80", 4),  # cut off inside a value
        (b"\xff\xff\xff\xff\xff\x01", 4),  # longer than 5 bytes
        (b"\xff\xff\xff\xff\x1f", 4),  # above 2**32 - 1
        (b"\x01\x02", 4),  # two values where one fits
        (b"\x01", 8),  # fewer values than the exact size asks
    ],
)
def test_varint_refuses_malformed_input(data, decoded_size):
    with pytest.raises(CodecError):
        Varint().decode(u8(data), decoded_size, exact=True)


@given(st.binary(max_size=20000), st.sampled_from([-7, 1, 3, 19]))
def test_zstd_inverts(data, level):
    codec = Zstd(level)
    assert roundtrip(codec, u8(data)).tobytes() == data
    assert len(codec.encode(u8(data))) <= codec.max_encoded_size(len(data))


def test_zstd_refuses_a_frame_of_another_size():
    frame = u8(Zstd(3).encode(u8(b"x" * 1000)))
    with pytest.raises(CodecError, match="1000 bytes, expected 999"):
        Zstd().decode(frame, 999)
    with pytest.raises(CodecError, match="expected at most 999"):
        Zstd().decode(frame, 999, exact=False)
    assert Zstd().decode(frame, 1001, exact=False).size == 1000


def test_zstd_refuses_a_frame_without_content_size():
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"abc" * 100)
    with pytest.raises(CodecError, match="content size"):
        Zstd().decode(u8(frame), 300)


@pytest.mark.parametrize("declared", [1 << 40, 1 << 62])
def test_zstd_bomb_is_refused_before_allocating(declared):
    """A frame header declaring a huge size is refused from its header alone."""
    header = b"\x28\xb5\x2f\xfd" + bytes([0xC0, 0x00]) + struct.pack("<Q", declared)
    frame = header + (3 << 3 | 1).to_bytes(3, "little") + b"abc"
    assert zstandard.frame_content_size(frame) == declared
    with pytest.raises(CodecError, match="expected 64"):
        Zstd().decode(u8(frame), 64)


@pytest.mark.parametrize("data", [b"", b"\x00\x01\x02", b"not a zstd frame at all"])
def test_zstd_refuses_garbage(data):
    with pytest.raises(CodecError):
        Zstd().decode(u8(data), 16)


def test_zstd_refuses_a_truncated_frame():
    frame = Zstd(3).encode(u8(np.arange(5000, dtype="<i4")))
    with pytest.raises(CodecError):
        Zstd().decode(u8(frame[:-5]), 20000)


def test_size_preserving_codecs_refuse_a_wrong_size():
    for codec, size in ((Shuffle(4), 16), (Fp16KeyDelta(4), 16), (Int32Delta(), 16)):
        with pytest.raises(CodecError):
            codec.decode(u8(bytes(12)), size)
    with pytest.raises(CodecError, match="multiple of 4"):
        Shuffle(4).decode(u8(bytes(6)), 6)
    with pytest.raises(CodecError, match="odd"):
        Fp16KeyDelta(4).decode(u8(bytes(7)), 7)


# -- configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "codec",
    [
        Zstd(1),
        Zstd(-7),
        Zstd(22),
        Shuffle(1),
        Shuffle(16),
        Fp16KeyDelta(100),
        Int32Delta(),
        Varint(),
        ByteBitShuffle(4, 2),
        ByteBitShuffle(16, 0),
    ],
)
def test_config_roundtrips_through_json(codec):
    config = json.loads(json.dumps(codec.get_config()))
    assert config["id"] == codec.codec_id
    rebuilt = codec_from_config(config)
    assert type(rebuilt) is type(codec)
    assert rebuilt.get_config() == codec.get_config()


def test_registry_holds_the_spec_codecs():
    assert set(CODECS) == {
        "zstd",
        "shuffle",
        "byte_bit_shuffle",
        "fp16_key_delta",
        "int_delta",
        "varint",
        "ans_uint",
        "ans_ids",
        "fp16_grid",
    }


@pytest.mark.parametrize(
    "config, match",
    [
        ({"id": "lz4"}, "unknown codec 'lz4'"),
        ({"level": 3}, "'id'"),
        ([{"id": "zstd"}], "'id'"),
        ({"id": "zstd", "level": 23}, "level"),
        ({"id": "zstd", "level": True}, "level"),
        ({"id": "zstd", "level": "3"}, "level"),
        ({"id": "shuffle", "elementsize": 0}, "elementsize"),
        ({"id": "shuffle", "elementsize": 17}, "elementsize"),
        ({"id": "shuffle", "elementsize": 2.0}, "elementsize"),
        ({"id": "fp16_key_delta", "row_length": 0}, "row_length"),
        ({"id": "byte_bit_shuffle", "elementsize": 4, "byte_planes": 5}, "byte_planes"),
        ({"id": "byte_bit_shuffle", "elementsize": 4}, "byte_planes"),
        ({"id": "fp16_key_delta", "row_length": 1 << 21}, "row_length"),
    ],
)
def test_bad_configs_are_refused(config, match):
    with pytest.raises(CodecError, match=match) as info:
        codec_from_config(config)
    assert isinstance(info.value, CorruptCacheError)


def test_pipeline_config_limits():
    with pytest.raises(CodecError, match="at most 16"):
        Pipeline.from_config([{"id": "int_delta"}] * 17)
    with pytest.raises(CodecError, match="list"):
        Pipeline.from_config({"id": "zstd", "level": 3})


# -- pipelines ---------------------------------------------------------------------------------


def test_default_pipelines_roundtrip_teacher_columns_and_compress():
    k = 64
    ids, logprobs = SyntheticTeacher(128256, k, seed=3).rows(500)
    pipelines = default_pipelines(k)
    assert set(pipelines) == set(COLUMN_DTYPES)
    for name, array in (("topk_ids", ids), ("topk_logprobs", logprobs)):
        pipeline = pipelines[name]
        encoded = pipeline.encode(array)
        assert len(encoded) < array.nbytes
        decoded = pipeline.decode(encoded, COLUMN_DTYPES[name], array.size)
        assert decoded.dtype == COLUMN_DTYPES[name]
        np.testing.assert_array_equal(decoded.view(np.uint8), array.reshape(-1).view(np.uint8))


def test_default_pipeline_configs_are_json():
    configs = default_pipeline_configs(100)
    assert json.loads(json.dumps(configs)) == configs
    assert configs["topk_logprobs"][0] == {"id": "fp16_key_delta", "row_length": 100}


@given(
    st.lists(
        st.sampled_from(
            [
                {"id": "shuffle", "elementsize": 4},
                {"id": "shuffle", "elementsize": 2},
                {"id": "byte_bit_shuffle", "elementsize": 4, "byte_planes": 1},
                {"id": "int_delta"},
                {"id": "fp16_key_delta", "row_length": 3},
                {"id": "varint"},
                {"id": "zstd", "level": 1},
            ]
        ),
        min_size=1,
        max_size=5,
    ),
    st.lists(st.integers(-(2**31), 2**31 - 1), max_size=300),
)
def test_any_chain_of_codecs_roundtrips(configs, values):
    """Size-changing codecs anywhere in the chain: the decoder's size bounds still hold."""
    raw = np.array(values, dtype="<i4")
    ids = [c["id"] for c in configs]
    data_dependent = [i for i, c in enumerate(ids) if c in ("varint", "zstd")]
    try:
        pipeline = Pipeline.from_config(configs)
    except CodecError:
        # byte_bit_shuffle needs its exact size, unknown after a data-dependent codec (6.3):
        # such a pipeline is refused when it is built, before anything is written.
        assert data_dependent and "byte_bit_shuffle" in ids[data_dependent[0] + 1 :]
        return
    try:
        encoded = pipeline.encode(raw)
    except CodecError:
        # A codec that needs whole elements may refuse what a size-changing one made.
        assert {"varint", "zstd", "byte_bit_shuffle"} & set(ids[:-1])
        return
    decoded = pipeline.decode(encoded, "<i4", raw.size)
    np.testing.assert_array_equal(decoded, raw)


def test_pipeline_refuses_data_of_another_decoded_size():
    pipeline = default_pipelines(8)["input_ids"]
    encoded = pipeline.encode(np.arange(100, dtype="<i4"))
    with pytest.raises(CodecError):
        pipeline.decode_bytes(encoded, 396)
    with pytest.raises(CodecError):
        pipeline.decode_bytes(encoded, 404)


def test_empty_pipeline_stores_raw_bytes():
    pipeline = Pipeline.from_config([])
    raw = np.arange(10, dtype="<i4")
    encoded = pipeline.encode(raw)
    assert encoded == raw.tobytes()
    np.testing.assert_array_equal(pipeline.decode(encoded, "<i4", 10), raw)
    with pytest.raises(CodecError, match="raw block"):
        pipeline.decode_bytes(encoded, 36)


# -- zstd blocks that end where planes begin ---------------------------------------------


def _zstd_blocks(frame: bytes) -> list[tuple[int, int]]:
    """(block type, stored size) of each block of a frame (RFC 8878, 3.1.1.2)."""
    pos = zstandard.frame_header_size(frame)
    blocks = []
    while True:
        header = int.from_bytes(frame[pos : pos + 3], "little")
        kind, size = (header >> 1) & 3, header >> 3
        blocks.append((kind, size))
        pos += 3 + (1 if kind == 1 else size)
        if header & 1:
            return blocks


def test_zstd_block_ends_skip_planes_too_small_for_tables_of_their_own():
    from logitcache.codecs import MIN_PLANE_BLOCK, zstd_block_ends

    big = MIN_PLANE_BLOCK
    assert zstd_block_ends([big, 2 * big], 4 * big) == [big, 2 * big]
    assert zstd_block_ends([big - 1], 4 * big) == []  # the first plane is too short
    assert zstd_block_ends([3 * big + 1], 4 * big) == []  # the last one is
    assert zstd_block_ends([10, big + 10, 2 * big + 10], 4 * big) == [big + 10, 2 * big + 10]


def test_the_random_low_bytes_of_ids_get_raw_blocks_of_their_own():
    # Ids of a large vocabulary: the low-byte plane is close to random. Alone in its blocks
    # it is stored raw (decoded at memory speed); the frame is still one ordinary frame.
    ids, _ = SyntheticTeacher(128256, 100, seed=3).rows(400)
    n = ids.size
    pipeline = Pipeline.from_config(
        [{"id": "byte_bit_shuffle", "elementsize": 4, "byte_planes": 2}, {"id": "zstd", "level": 1}]
    )
    frame = pipeline.encode(ids)
    assert zstd_frame_length(frame) == len(frame)
    assert zstandard.frame_content_size(frame) == ByteBitShuffle(4, 2).max_encoded_size(4 * n)
    assert np.array_equal(pipeline.decode(frame, np.int32, n), ids.reshape(-1))
    blocks = _zstd_blocks(frame)
    raw = 0
    for kind, size in blocks:
        if kind != 0:
            break
        raw += size
    assert raw == n, "the first plane's n bytes fill the first blocks, raw, and no more"
    # The same bytes in one block stream, as before: larger, and Huffman-coded from the start.
    shuffled = ByteBitShuffle(4, 2).encode(ids.reshape(-1).view(np.uint8))
    plain = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(shuffled)
    assert _zstd_blocks(plain)[0][0] == 2 and len(frame) < len(plain)
