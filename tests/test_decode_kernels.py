"""The read path's two sets of decoders, numpy (short reads) and numba (long ones), give
exactly the same output; a process switches from one to the other after JIT_AFTER_BYTES; a
block is hashed once per process."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from logitcache import CacheWriter, codecs, native, open_cache, shard
from logitcache import _kernels as jit
from logitcache import _numpy_kernels as npk
from logitcache.codecs import ByteBitShuffle, CodecError, Fp16KeyDelta, Shuffle
from logitcache.synthetic import synthetic_records
from logitcache.writer import DEFAULT_CHUNK_BYTES

RNG = np.random.default_rng(15)


@pytest.fixture(params=["numpy", "numba", "compiled"])
def read_path(request, monkeypatch) -> str:
    """Codecs decode with the numpy kernels, numba's, or the compiled ones."""
    numba = codecs.kernels()  # encoders use it either way
    chosen = {"numpy": None, "numba": numba}.get(request.param)
    if request.param == "compiled":
        chosen = request.getfixturevalue("compiled_decoders")
    monkeypatch.setattr(codecs, "read_kernels", lambda nbytes: chosen)
    monkeypatch.setattr(codecs, "decode_kernels", lambda: chosen or numba)
    monkeypatch.setattr(shard, "read_kernels", lambda nbytes: chosen)  # record_starts
    return request.param


@pytest.mark.parametrize("elementsize", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_byte_unshuffle_numpy_and_numba_agree(elementsize, n, read_path):
    src = RNG.integers(0, 256, n * elementsize, dtype=np.uint8)
    want = np.empty_like(src)
    jit.byte_unshuffle(src, elementsize, want)
    assert np.array_equal(npk.byte_unshuffle(src, elementsize), want)
    codec = Shuffle(elementsize)
    assert np.array_equal(codec.decode(codec.encode(src), src.size), src)


@pytest.mark.parametrize("n", [0, 1, 5, 8, 9, 64, 1001])
@pytest.mark.parametrize("high", [1 << 8, 1 << 16, 1 << 17, 1 << 18, 1 << 19, 1 << 24, 1 << 32])
def test_id_unshuffle_matches_the_generic_kernel(n, high, read_path):
    # numba: up to 2**18 at most two bit planes are used (its fast path), above the generic
    # kernel; numpy: one function for all.
    values = RNG.integers(0, high, n, dtype=np.uint64).astype(np.uint32)
    values[::3] = RNG.integers(0, 256, values[::3].size)  # mostly small, some planes empty
    raw = values.view(np.uint8)
    codec = ByteBitShuffle(4, 2)
    encoded = codec.encode(raw)
    want = np.zeros(raw.size, dtype=np.uint8)
    assert jit.byte_bit_unshuffle(encoded, 4, 2, want) == 0
    assert np.array_equal(want, raw)
    got = np.full(raw.size, 0xAB, dtype=np.uint8)  # every byte must be written
    assert npk.unshuffle_ids(encoded, got) == 0
    assert np.array_equal(got, raw)
    assert np.array_equal(codec.decode(encoded, raw.size), raw)


@pytest.mark.parametrize("planes", [(15,), (7,), (0,), (14, 15), (3, 12), (0, 1, 15)])
def test_id_unshuffle_of_chosen_bit_planes(planes, read_path):
    # Every combination of one or two used planes takes numba's fast path, in either byte.
    n = 203
    values = RNG.integers(0, 1 << 16, n, dtype=np.uint64).astype(np.uint32)
    for q in planes:
        values[RNG.random(n) < 0.3] |= np.uint32(1 << (31 - q))
    raw = values.view(np.uint8)
    codec = ByteBitShuffle(4, 2)
    assert np.array_equal(codec.decode(codec.encode(raw), raw.size), raw)


@pytest.mark.parametrize("plane", [0, 7, 15])
@pytest.mark.parametrize("others", [0, 3])  # numba's fast path, and its generic kernel
def test_id_unshuffle_refuses_a_set_padding_bit(plane, others, read_path):
    n = 13  # 2 bytes per bit plane, 3 padding bits in the second
    values = np.arange(n, dtype=np.uint32)
    values[:others] |= np.uint32(0x10000) << np.arange(others, dtype=np.uint32)
    encoded = ByteBitShuffle(4, 2).encode(values.view(np.uint8))
    encoded[2 * n + plane * 2 + 1] |= 1
    assert npk.unshuffle_ids(encoded, np.empty(4 * n, dtype=np.uint8)) == -1
    assert jit.byte_bit_unshuffle(encoded, 4, 2, np.zeros(4 * n, dtype=np.uint8)) == -1
    with pytest.raises(CodecError, match="padding bit"):
        ByteBitShuffle(4, 2).decode(encoded, 4 * n)


@pytest.mark.parametrize("row_length", [1, 3, 100])
@pytest.mark.parametrize("n", [0, 1, 99, 100, 301, 5000])
def test_fp16_key_delta_decoders_agree_for_any_bits(row_length, n, read_path):
    bits = RNG.integers(0, 1 << 16, n, dtype=np.uint32).astype(np.uint16)
    bits[: min(n, 6)] = [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7FFF, 0xFFFF][: min(n, 6)]
    deltas = np.empty_like(bits)
    jit.fp16_key_delta_encode(bits, row_length, deltas)
    want = np.empty_like(bits)
    jit.fp16_key_delta_decode(deltas, row_length, want)
    assert np.array_equal(want, bits)
    assert np.array_equal(npk.fp16_key_delta_decode(deltas, row_length), bits)
    codec = Fp16KeyDelta(row_length)
    assert np.array_equal(codec.decode(deltas.view(np.uint8), 2 * n).view(np.uint16), bits)


def test_fp16_key_delta_decode_matches_its_definition():
    # spec section 6.4: key[0] = gap[0], key[i] = key[i-1] - gap[i] mod 2**16, then bits.
    row_length, rows = 7, 40
    gaps = RNG.integers(0, 1 << 16, row_length * rows, dtype=np.uint32).astype(np.uint16)
    want = []
    for r in range(rows):
        key = 0
        for i in range(row_length):
            g = int(gaps[r * row_length + i])
            key = g if i == 0 else (key - g) % (1 << 16)
            want.append(key & 0x7FFF if key & 0x8000 else ~key & 0xFFFF)
    got = np.empty_like(gaps)
    jit.fp16_key_delta_decode(gaps, row_length, got)
    assert got.tolist() == want
    assert npk.fp16_key_delta_decode(gaps, row_length).tolist() == want


def test_all_fp16_bit_patterns_round_trip(read_path):
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    codec = Fp16KeyDelta(128)
    encoded = codec.encode(bits.view(np.uint8))
    assert np.array_equal(codec.decode(encoded, encoded.size).view(np.uint16), bits)


def _record_starts_both(lengths, mask, all_positions: bool) -> tuple[int, list, list]:
    """record_starts of both kernel sets, which must agree; (status, token, target starts)."""
    results = []
    for kernels in (npk, jit):
        token_starts = np.full(lengths.size + 1, -7, dtype=np.int64)
        target_starts = np.full(lengths.size + 1, -7, dtype=np.int64)
        status = kernels.record_starts(lengths, mask, all_positions, token_starts, target_starts)
        results.append((status, token_starts.tolist(), target_starts.tolist()))
    assert results[0][0] == results[1][0]
    if results[0][0] == npk.RECORD_STARTS_OK:
        assert results[0] == results[1]
    return results[0]


@pytest.mark.parametrize("all_positions", [False, True])
@pytest.mark.parametrize("records", [1, 2, 37])
def test_record_starts_of_both_kernel_sets(records, all_positions):
    lengths = RNG.integers(1, 60, records).astype(np.int32)
    mask = (RNG.random(int(lengths.sum())) < 0.6).astype(np.uint8)
    token_starts = np.concatenate([[0], np.cumsum(lengths)])
    mask[token_starts[:-1]] = 0
    if all_positions:
        mask[:] = 1
        mask[token_starts[:-1]] = 0
    status, tokens, targets = _record_starts_both(lengths, mask, all_positions)
    assert status == npk.RECORD_STARTS_OK
    assert tokens == token_starts.tolist()
    per_record = [int(mask[a + 1 : b].sum()) for a, b in zip(tokens[:-1], tokens[1:], strict=True)]
    assert targets == np.concatenate([[0], np.cumsum(per_record)]).tolist()


@pytest.mark.parametrize(
    "lengths, mask, broken",
    [
        ([3, 0, 2], [0, 1, 1, 0, 1], npk.RECORD_STARTS_BAD_LENGTHS),  # an empty record
        ([3, -1, 3], [0, 1, 1, 0, 1], npk.RECORD_STARTS_BAD_LENGTHS),
        ([3, 3], [0, 1, 1, 0, 1], npk.RECORD_STARTS_BAD_LENGTHS),  # more tokens than T
        ([2, 2], [0, 1, 1, 0, 1], npk.RECORD_STARTS_BAD_LENGTHS),  # fewer
        ([2**31 - 1, 2**31 - 1, 4], [0] * 5, npk.RECORD_STARTS_BAD_LENGTHS),  # no wrap
        ([3, 2], [0, 2, 1, 0, 1], npk.RECORD_STARTS_BAD_MASK),
        ([3, 2], [0, 1, 1, 0, 255], npk.RECORD_STARTS_BAD_MASK),
        ([3, 2], [0, 1, 1, 1, 1], npk.RECORD_STARTS_MASKED_FIRST),
        ([3, 2], [1, 1, 1, 0, 1], npk.RECORD_STARTS_MASKED_FIRST),
    ],
)
def test_record_starts_names_the_rule_a_chunk_breaks(lengths, mask, broken):
    lengths = np.array(lengths, dtype=np.int32)
    mask = np.array(mask, dtype=np.uint8)
    for all_positions in (False, True):
        assert _record_starts_both(lengths, mask, all_positions)[0] == broken


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("read") / "cache")
    with CacheWriter(url, k=8, vocab_size=70000, chunk_bytes=4096) as w:
        for record in synthetic_records(40, k=8, vocab_size=70000, mean_length=40, seed=3):
            w.add(**record)
    return url


def _read_in_a_fresh_process(url: str, jit_after: int | None) -> list[str]:
    code = (
        "import sys, hashlib\n"
        "from logitcache import codecs, open_cache\n"
        + (f"codecs.JIT_AFTER_BYTES = {jit_after}\n" if jit_after is not None else "")
        + f"cache = open_cache({url!r})\n"
        "h = hashlib.sha256()\n"
        "for r in cache.iter_records():\n"
        "    h.update(r.topk_ids.tobytes() + r.topk_logprobs.tobytes() + r.input_ids.tobytes())\n"
        "print('numba' in sys.modules, h.hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_short_reads_use_numpy_and_long_ones_switch_to_numba(small_cache):
    loaded, digest = _read_in_a_fresh_process(small_cache, None)
    assert loaded == "False"  # 40 records: far below JIT_AFTER_BYTES
    switched, same = _read_in_a_fresh_process(small_cache, 20_000)  # switches part way
    assert switched == "True" and same == digest


def test_a_block_is_hashed_once_per_process_but_verify_hashes_all(small_cache, monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")  # hashing in Python, where it can be counted
    calls: list[int] = []
    hashing = shard.xxhash

    class Counting:
        @staticmethod
        def xxh3_64_intdigest(data):
            calls.append(len(data))
            return hashing.xxh3_64_intdigest(data)

    monkeypatch.setattr(shard, "xxhash", Counting)
    with open_cache(small_cache, chunk_cache_size=1) as cache:
        shard_file = cache.shard_file(0)
        calls.clear()  # opening it hashed its footer
        first = shard_file.decode_chunk(0)
        assert len(calls) == len(shard_file.chunks[0]["blocks"])
        again = shard_file.decode_chunk(0)  # e.g. evicted from the LRU and read again
        assert len(calls) == len(shard_file.chunks[0]["blocks"])
        assert np.array_equal(first.topk_ids, again.topk_ids)
        calls.clear()
        assert cache.verify() == []
        blocks = sum(
            len(c["blocks"])
            for s in range(len(cache.manifest.shards))
            for c in cache.shard_file(s).chunks
        )
        assert len(calls) == blocks  # a full verification still checks every block


def test_a_chunk_decoded_in_one_call_is_hashed_once_per_process(small_cache, monkeypatch):
    monkeypatch.setattr(codecs, "_KERNELS", codecs.kernels())  # numba's: the one-call path
    hashed: list[list[bool]] = []  # per call, which blocks the kernel was told to hash
    real = native.decode_default_chunk

    def spy(kernels, buf, blocks, checksums, verified, *rest, **kwargs):
        hashed.append((~verified & (blocks[:, 0] >= 0)).tolist())
        return real(kernels, buf, blocks, checksums, verified, *rest, **kwargs)

    monkeypatch.setattr(native, "decode_default_chunk", spy)
    with open_cache(small_cache, chunk_cache_size=1) as cache:
        shard_file = cache.shard_file(0)
        first = shard_file.decode_chunk(0)
        again = shard_file.decode_chunk(0)
        assert np.array_equal(first.topk_ids, again.topk_ids)
    assert sum(hashed[0]) == len(shard_file.chunks[0]["blocks"])  # every block, once
    assert sum(hashed[1]) == 0


def test_a_damaged_block_is_caught_on_first_read(small_cache, tmp_path):
    import shutil

    from logitcache.format import CorruptCacheError

    copy = tmp_path / "copy"
    shutil.copytree(small_cache, copy)
    with open_cache(str(copy)) as cache:
        entry = cache.manifest.shards[0]
        offset = cache.shard_file(0).chunks[1]["blocks"]["topk_ids"][0]
    with open(copy / entry.path, "r+b") as f:
        f.seek(offset + 3)
        byte = f.read(1)
        f.seek(offset + 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    with open_cache(str(copy)) as cache:
        cache[0]  # chunk 0 is sound
        first_of_chunk_1 = cache.manifest.shards[0].chunk_records[0]
        with pytest.raises(CorruptCacheError, match="chunk 1 column topk_ids: checksum"):
            cache[first_of_chunk_1]


def test_default_chunks_close_after_256_kib_of_decoded_data(tmp_path):
    assert DEFAULT_CHUNK_BYTES == 256 << 10
    k, rows = 100, 200  # 200 rows of K=100: 120,000 bytes of ids and logprobs per record
    url = str(tmp_path / "cache")
    with CacheWriter(url, k=k, vocab_size=1000) as w:
        for record in synthetic_records(9, k=k, vocab_size=1000, mean_length=10, seed=1):
            t = rows + 1
            mask = np.ones(t, dtype=bool)
            mask[0] = False
            ids = np.tile(np.arange(k, dtype=np.int32), (rows, 1))
            logprobs = np.tile(-np.arange(k, dtype=np.float16) - 5, (rows, 1))
            w.add(
                input_ids=np.zeros(t, np.int32),
                loss_mask=mask,
                topk_ids=ids,
                topk_logprobs=logprobs,
                sample_id=record["sample_id"],
            )
    with open_cache(url) as cache:
        # 3 records pass 256 KiB (2 hold 241 KB): chunks of 3, 3, 3.
        assert cache.manifest.shards[0].chunk_records == [3, 3, 3]


def test_a_scan_known_to_be_long_loads_numba_at_its_start(small_cache):
    # iter_records knows how much it will decode: past JIT_AFTER_BYTES it loads numba before
    # its first chunk instead of crossing the threshold near its end; a short one does not.
    code = (
        "import sys\n"
        "from logitcache import codecs, open_cache\n"
        "codecs.JIT_AFTER_BYTES = 50_000\n"
        f"cache = open_cache({small_cache!r})\n"
        "next(cache.iter_records(0, 2))\n"
        "short = 'numba' in sys.modules\n"
        "next(cache.iter_records())\n"
        "print(short, 'numba' in sys.modules, codecs._numpy_decoded < 50_000)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "True"]
