"""The rANS codecs (ans_ids, ans_uint) and fp16_grid: bit-exact round trips at the extremes,
and hostile blocks (bad tables, cut streams, flipped bytes) refused with CorruptCacheError."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache import CorruptCacheError
from logitcache.codecs import (
    AnsIds,
    AnsUint,
    CodecError,
    Fp16Grid,
    Fp16KeyDelta,
    Pipeline,
    codec_from_config,
    encode_freq_tables,
    grid_tables,
    normalize_frequencies,
)
from logitcache.synthetic import SyntheticTeacher


def u8(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def roundtrip(codec, raw: np.ndarray) -> np.ndarray:
    data = u8(raw)
    return codec.decode(codec.encode(data), data.size)


# -- lossless round trips ----------------------------------------------------------------------

ID_EXTREMES = [0, 1, 15, 16, 65535, 65536, (1 << 24) - 1]


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 9),
    st.lists(st.one_of(st.integers(0, (1 << 24) - 1), st.sampled_from(ID_EXTREMES)), max_size=400),
)
def test_ans_ids_roundtrips_any_ids(row_length, values):
    ids = np.array(values, dtype=np.int32)
    assert np.array_equal(roundtrip(AnsIds(row_length), ids).view(np.int32), ids)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 8), st.integers(0, 40), st.data())
def test_ans_ids_roundtrips_rows_ending_in_filler(k, rows, data):
    """Rows padded as lossy caches pad them, and rows that only look like it."""
    out = []
    for _ in range(rows):
        real = data.draw(st.integers(1, k))
        row = data.draw(st.lists(st.integers(0, 3 * k), min_size=real, max_size=real, unique=True))
        want = 0
        while len(row) < k:
            while want in row:
                want += 1
            row.append(want)
            want += 1
        out.append(row)
    ids = np.array(out, dtype=np.int32).reshape(-1)
    assert np.array_equal(roundtrip(AnsIds(k), ids).view(np.int32), ids)


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from([2, 4]),
    st.integers(1, 130),
    st.lists(st.integers(0, (1 << 32) - 1), max_size=400),
)
def test_ans_uint_roundtrips_any_values(elementsize, row_length, values):
    dtype = np.uint16 if elementsize == 2 else np.uint32
    raw = np.array([v & ((1 << (8 * elementsize)) - 1) for v in values], dtype=dtype)
    out = roundtrip(AnsUint(elementsize, row_length), raw).view(dtype)
    assert np.array_equal(out, raw)


@pytest.mark.parametrize("value", [0, 1, 15, 16, 17, 255, 256, 65535])
def test_ans_uint_roundtrips_constant_blocks(value):
    """A single token: its table needs a second one so that no value is free of cost."""
    raw = np.full(5000, value, dtype=np.uint16)
    codec = AnsUint(2, 100)
    encoded = codec.encode(u8(raw))
    raw_bits = max(0, value.bit_length() - 3) if value >= 16 else 0  # bits beyond the token
    assert 0 < encoded.size < 300 + raw.size * raw_bits // 8
    assert np.array_equal(codec.decode(encoded, raw.nbytes).view(np.uint16), raw)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 20), st.lists(st.integers(0, 0xFFFF), max_size=300))
def test_fp16_key_delta_and_ans_uint_keep_every_fp16_bit_pattern(k, bits):
    raw = np.array(bits, dtype=np.uint16)
    pipeline = Pipeline.from_config(
        [
            {"id": "fp16_key_delta", "row_length": k},
            {"id": "ans_uint", "elementsize": 2, "row_length": k},
        ]
    )
    decoded = pipeline.decode(pipeline.encode(raw.view(np.float16)), np.float16, raw.size)
    assert np.array_equal(decoded.view(np.uint16), raw)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 2048), st.integers(1, 12), st.data())
def test_fp16_grid_keeps_on_and_off_grid_rows(step, k, data):
    grid_bits, _ = grid_tables(step)
    n_rows = data.draw(st.integers(0, 12))
    rows = []
    for _ in range(n_rows):
        if data.draw(st.booleans()):
            row = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=k, max_size=k))
        else:
            first = data.draw(st.integers(0, 0xFFFF))
            rest = data.draw(
                st.lists(st.sampled_from(grid_bits.tolist()), min_size=k - 1, max_size=k - 1)
            )
            row = [first, *rest]
        rows.append(row)
    raw = np.array(rows, dtype=np.uint16).reshape(-1)
    pipeline = Pipeline.from_config(
        [
            {"id": "fp16_grid", "row_length": k, "step": step},
            {"id": "ans_uint", "elementsize": 4, "row_length": k},
        ]
    )
    decoded = pipeline.decode(pipeline.encode(raw.view(np.float16)), np.float16, raw.size)
    assert np.array_equal(decoded.view(np.uint16), raw)


def test_grid_points_are_the_nearest_binary16_of_multiples_of_the_step():
    grid_bits, index_of = grid_tables(205)  # 0.2002 nat
    values = grid_bits.view(np.float16).astype(np.float64)
    assert grid_bits[0] == 0x8000  # -0.0
    assert values[-1] == -65504.0
    j = np.arange(len(values) - 1)
    assert np.array_equal(
        grid_bits[:-1][1:], (-(j[1:] * 205) / 1024).astype(np.float16).view(np.uint16)
    )
    assert index_of[grid_bits[7]] == 7 and index_of[0x3C00] == -1  # +1.0 is off the grid


def test_ans_uint_codes_logprob_gaps_below_zstd():
    # (For ids the gain of ans_ids shows on real teacher rows, whose ids repeat from row to
    # row: benchmarks/bench_codec.py, 143 against 171 B/target. Synthetic rows repeat fewer,
    # and on them zstd with plane-aligned blocks is about as small.)
    _, logprobs = SyntheticTeacher(49152, 64, seed=5).rows(600)
    ans_lp = Pipeline.from_config(
        [
            {"id": "fp16_key_delta", "row_length": 64},
            {"id": "ans_uint", "elementsize": 2, "row_length": 64},
        ]
    )
    zstd_lp = Pipeline.from_config(
        [
            {"id": "fp16_key_delta", "row_length": 64},
            {"id": "shuffle", "elementsize": 2},
            {"id": "zstd", "level": 1},
        ]
    )
    assert len(ans_lp.encode(logprobs)) < len(zstd_lp.encode(logprobs))


def test_normalized_frequencies_sum_to_the_table_size():
    for counts in ([5, 0], [0, 0, 7], [1] * 128, [10**9, 1, 1], list(range(64))):
        freq = normalize_frequencies(np.array(counts))
        assert freq.sum() == 4096 and freq.max() < 4096
        assert ((freq > 0) >= (np.array(counts) > 0)).all()


# -- hostile input -----------------------------------------------------------------------------


def _ids_block() -> tuple[AnsIds, np.ndarray, np.ndarray]:
    ids, _ = SyntheticTeacher(3000, 16, seed=2).rows(64)
    codec = AnsIds(16)
    return codec, ids.reshape(-1), codec.encode(u8(ids))


def _uint_block() -> tuple[AnsUint, np.ndarray, np.ndarray]:
    _, logprobs = SyntheticTeacher(3000, 16, seed=2).rows(64)
    raw = Fp16KeyDelta(16).encode(u8(logprobs))
    codec = AnsUint(2, 16)
    return codec, raw, codec.encode(raw)


@pytest.mark.parametrize("make", [_ids_block, _uint_block])
def test_truncated_streams_are_refused(make):
    codec, raw, block = make()
    for cut in (1, 2, 7, block.size // 2, block.size - 3, block.size - 1):
        with pytest.raises(CorruptCacheError):
            codec.decode(block[:cut].copy(), u8(raw).size)


@pytest.mark.parametrize("make", [_ids_block, _uint_block])
def test_extra_bytes_and_wrong_sizes_are_refused(make):
    codec, raw, block = make()
    size = u8(raw).size
    with pytest.raises(CorruptCacheError):
        codec.decode(np.concatenate([block, np.zeros(2, np.uint8)]), size)
    for other in (size - codec.max_expansion, size + 4 * 16, 0):
        if other >= 0 and other != size:
            with pytest.raises(CorruptCacheError):
                codec.decode(block, other)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_flipped_bytes_never_crash(data):
    codec, raw, block = data.draw(st.sampled_from([_ids_block, _uint_block]))()
    damaged = block.copy()
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, damaged.size - 1))
        damaged[at] ^= data.draw(st.integers(1, 255))
    try:
        out = codec.decode(damaged, u8(raw).size)
    except CodecError:
        return
    assert out.size == u8(raw).size  # a lucky flip may still decode; never a wrong size


@given(st.binary(max_size=300))
def test_garbage_is_refused_or_decoded_to_the_right_size(data):
    for codec, size in ((AnsIds(4), 64), (AnsUint(2, 4), 32), (AnsUint(4, 3), 48)):
        try:
            out = codec.decode(np.frombuffer(data, np.uint8), size)
        except CodecError:
            continue
        assert out.size == size


def test_corrupt_frequency_tables_are_refused():
    def uint_block(tables: bytes) -> np.ndarray:
        return np.frombuffer(tables + bytes(16), np.uint8)

    good = normalize_frequencies(np.array([3, 1] + [0] * 62))
    tables = [good] + [np.zeros(64, np.int64)] * 7
    codec = AnsUint(2, 1)
    bad_tables = [
        b"\x01" + bytes(7),  # m = 1: a lone token would cost nothing
        b"\x02\x00\x00\x00\x00" + bytes(7),  # frequencies sum to 2, not 4096
        b"\x02\x40\x00\x00\x00" + bytes(7),  # token 64 is outside the alphabet
        b"\x41" + bytes(7),  # more tokens than the alphabet has
        b"\x02\x00\xff\x3f\x00\x00" + bytes(7),  # a frequency of 4096
        b"\x80\x00" + bytes(7),  # a non-minimal varint
        b"\x02\x00",  # cut short
    ]
    for tables_bytes in bad_tables:
        with pytest.raises(CodecError, match="frequency table"):
            codec.decode(uint_block(tables_bytes), 2)
    # A block whose tables parse but whose context of use has none.
    with pytest.raises(CodecError):
        codec.decode(uint_block(bytes(8)), 2)
    assert encode_freq_tables(np.stack(tables))[0] == 2


def test_ans_ids_refuses_bad_counts_and_ids():
    codec = AnsIds(4)
    with pytest.raises(CodecError, match="distinct"):
        codec.decode(np.frombuffer(b"\x00" + bytes(40), np.uint8), 16)  # 0 distinct ids
    with pytest.raises(CodecError, match="distinct"):
        codec.decode(np.frombuffer(b"\x09" + bytes(40), np.uint8), 16)  # 9 > 4 values
    with pytest.raises(CodecError, match="2\\^24"):
        codec.encode(u8(np.array([1 << 24], np.int32)))
    with pytest.raises(CodecError, match="2\\^24"):
        codec.encode(u8(np.array([-1], np.int32)))


def test_fp16_grid_refuses_out_of_range_values():
    codec = Fp16Grid(2, 1024)  # 1 nat: grid indices 0..64, then -65504 at 65
    bad = [
        np.array([0x8000, 66], np.uint32),  # index past the grid
        np.array([0x20000, 0], np.uint32),  # a first value beyond key and flag
        np.array([0x10000, 0x10000], np.uint32),  # an exact row's key difference > 0xFFFF
    ]
    for values in bad:
        with pytest.raises(CodecError, match="out of range"):
            codec.decode(values.view(np.uint8), 4)


@pytest.mark.parametrize(
    "config",
    [
        {"id": "ans_uint", "elementsize": 3, "row_length": 4},
        {"id": "ans_uint", "elementsize": 2, "row_length": 0},
        {"id": "ans_ids", "row_length": 4097},
        {"id": "fp16_grid", "row_length": 4, "step": 0},
        {"id": "fp16_grid", "row_length": 4, "step": 2049},
        {"id": "fp16_grid", "row_length": 4},
    ],
)
def test_bad_entropy_configs_are_refused(config):
    with pytest.raises(CodecError):
        codec_from_config(config)


def test_entropy_codecs_need_their_exact_size():
    with pytest.raises(CodecError, match="exact"):
        Pipeline.from_config(
            [{"id": "zstd", "level": 1}, {"id": "ans_uint", "elementsize": 2, "row_length": 4}]
        )
    with pytest.raises(CodecError, match="exact"):
        Pipeline.from_config([{"id": "varint"}, {"id": "ans_ids", "row_length": 4}])


# -- inside a cache --------------------------------------------------------------------------


def _entropy_cache(tmp_path):
    from logitcache import CacheWriter
    from logitcache.codecs import entropy_pipeline_configs
    from tests.conftest import SMALL_K, SMALL_VOCAB, make_records

    root = tmp_path / "c"
    with CacheWriter(
        str(root), k=SMALL_K, vocab_size=SMALL_VOCAB, codecs=entropy_pipeline_configs(SMALL_K)
    ) as writer:
        for record in make_records(6, seed=3):
            writer.add(**record)
    return root


@pytest.mark.parametrize("column", ["topk_ids", "topk_logprobs"])
def test_a_cut_block_with_valid_checksums_is_refused_on_read(tmp_path, column):
    """The checksums match (rewritten), so the codec itself must catch the damage."""
    import json

    from logitcache.format import MANIFEST_NAME
    from tests.test_faults import (
        append_block,
        block_checksum,
        read_all,
        resync_manifest,
        split_shard,
        write_shard,
    )

    root = _entropy_cache(tmp_path)
    shard = root / json.loads((root / MANIFEST_NAME).read_text())["shards"][0]["path"]
    body, footer = split_shard(shard)
    block = footer["chunks"][0]["blocks"][column]
    data = body[block["offset"] : block["offset"] + block["length"]][:-3]
    body = bytearray(body)
    offset, length = append_block(body, data)
    block.update(offset=offset, length=length, checksum=block_checksum(data))
    write_shard(shard, body, footer)
    resync_manifest(type("C", (), {"path": root})())
    with pytest.raises(CorruptCacheError, match="ans_"):
        read_all(root)


def test_a_footer_pointing_at_a_few_bytes_of_a_block_is_refused(tmp_path):
    import json

    from logitcache.format import MANIFEST_NAME
    from tests.test_faults import read_all, resync_manifest, split_shard, write_shard

    root = _entropy_cache(tmp_path)
    shard = root / json.loads((root / MANIFEST_NAME).read_text())["shards"][0]["path"]
    body, footer = split_shard(shard)
    chunk = footer["chunks"][0]
    block = chunk["blocks"]["topk_ids"]
    block["length"] = 8  # 8 stored bytes cannot hold the ids of every target
    write_shard(shard, body, footer)
    resync_manifest(type("C", (), {"path": root})())
    with pytest.raises(CorruptCacheError):
        read_all(root)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 7), st.data())
def test_the_spec_only_decoder_reads_what_the_library_writes(k, data):
    """Beyond the golden vectors: random blocks of each new codec, decoded from the spec text."""
    from tests.spec_decoder import decode_ans_ids, decode_ans_uint, decode_fp16_grid

    ids = np.array(
        data.draw(st.lists(st.integers(0, (1 << 24) - 1) | st.integers(0, 9), max_size=60)),
        dtype=np.int32,
    )
    block = AnsIds(k).encode(u8(ids)).tobytes()
    assert decode_ans_ids({"row_length": k}, block, ids.nbytes) == ids.tobytes()
    values = np.array(data.draw(st.lists(st.integers(0, 0xFFFF), max_size=60)), dtype=np.uint16)
    block = AnsUint(2, k).encode(u8(values)).tobytes()
    config = {"elementsize": 2, "row_length": k}
    assert decode_ans_uint(config, block, values.nbytes) == values.tobytes()
    step = data.draw(st.integers(1, 2048))
    grid_bits, _ = grid_tables(step)
    bits = np.array(
        data.draw(
            st.lists(st.sampled_from(grid_bits.tolist()) | st.integers(0, 0xFFFF), max_size=40)
        ),
        dtype=np.uint16,
    )
    block = Fp16Grid(k, step).encode(u8(bits)).tobytes()
    assert decode_fp16_grid({"row_length": k, "step": step}, block, bits.nbytes) == bits.tobytes()


@pytest.mark.parametrize("logprobs", ["ans", "zstd"])
def test_entropy_pipelines_round_trip_in_a_cache(tmp_path, logprobs):
    from logitcache import CacheWriter, open_cache
    from logitcache.codecs import entropy_pipeline_configs
    from tests.conftest import SMALL_K, SMALL_VOCAB, make_records

    codecs = entropy_pipeline_configs(SMALL_K, logprobs=logprobs)
    records = list(make_records(5, seed=11))
    with CacheWriter(str(tmp_path / "c"), k=SMALL_K, vocab_size=SMALL_VOCAB, codecs=codecs) as w:
        for record in records:
            w.add(**record)
    with open_cache(str(tmp_path / "c")) as cache:
        assert cache.manifest.columns["topk_logprobs"]["codecs"] == codecs["topk_logprobs"]
        for got, want in zip(cache, records, strict=True):
            np.testing.assert_array_equal(got.topk_ids, want["topk_ids"])
            np.testing.assert_array_equal(
                got.topk_logprobs.view(np.uint16),
                np.asarray(want["topk_logprobs"], dtype=np.float16).view(np.uint16),
            )


def test_entropy_pipelines_refuse_an_unknown_logprob_coder():
    from logitcache.codecs import entropy_pipeline_configs

    with pytest.raises(ValueError, match="logprobs='lz4'"):
        entropy_pipeline_configs(8, logprobs="lz4")
