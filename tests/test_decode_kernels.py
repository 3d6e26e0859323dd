"""The fast decode paths of the read path give exactly what the generic kernels give, and a
block is hashed once per process."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from logitcache import CacheWriter, open_cache
from logitcache import _kernels as jit
from logitcache.codecs import ByteBitShuffle, CodecError, Fp16KeyDelta, Shuffle
from logitcache.shard import ShardFile
from logitcache.synthetic import synthetic_records
from logitcache.writer import DEFAULT_CHUNK_BYTES

RNG = np.random.default_rng(15)


@pytest.mark.parametrize("elementsize", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_byte_unshuffle_inverts_the_shuffle(elementsize, n):
    src = RNG.integers(0, 256, n * elementsize, dtype=np.uint8)
    codec = Shuffle(elementsize)
    assert np.array_equal(codec.decode(codec.encode(src), src.size), src)


@pytest.mark.parametrize("n", [0, 1, 5, 8, 9, 64, 1001])
@pytest.mark.parametrize("high", [1 << 8, 1 << 16, 1 << 17, 1 << 18, 1 << 19, 1 << 24, 1 << 32])
def test_id_unshuffle_matches_the_generic_kernel(n, high):
    # Up to 2**18 at most two bit planes are used (the fast path); above, the generic kernel.
    values = RNG.integers(0, high, n, dtype=np.uint64).astype(np.uint32)
    values[::3] = RNG.integers(0, 256, values[::3].size)  # mostly small, some planes empty
    raw = values.view(np.uint8)
    codec = ByteBitShuffle(4, 2)
    encoded = codec.encode(raw)
    want = np.zeros(raw.size, dtype=np.uint8)
    assert jit.byte_bit_unshuffle(encoded, 4, 2, want) == 0
    assert np.array_equal(want, raw)
    assert np.array_equal(codec.decode(encoded, raw.size), raw)


@pytest.mark.parametrize("planes", [(15,), (7,), (0,), (14, 15), (3, 12), (0, 1, 15)])
def test_id_unshuffle_of_chosen_bit_planes(planes):
    # Every combination of one or two used planes goes through the fast path, in any byte.
    n = 203
    values = RNG.integers(0, 1 << 16, n, dtype=np.uint64).astype(np.uint32)
    for q in planes:
        values[RNG.random(n) < 0.3] |= np.uint32(1 << (31 - q))
    raw = values.view(np.uint8)
    codec = ByteBitShuffle(4, 2)
    assert np.array_equal(codec.decode(codec.encode(raw), raw.size), raw)


@pytest.mark.parametrize("plane", [0, 7, 15])
@pytest.mark.parametrize("others", [0, 3])  # the fast path, and the generic kernel
def test_id_unshuffle_refuses_a_set_padding_bit(plane, others):
    n = 13  # 2 bytes per bit plane, 3 padding bits in the second
    values = np.arange(n, dtype=np.uint32)
    values[:others] |= np.uint32(0x10000) << np.arange(others, dtype=np.uint32)
    encoded = ByteBitShuffle(4, 2).encode(values.view(np.uint8))
    encoded[2 * n + plane * 2 + 1] |= 1
    assert jit.byte_bit_unshuffle(encoded, 4, 2, np.zeros(4 * n, dtype=np.uint8)) == -1
    with pytest.raises(CodecError, match="padding bit"):
        ByteBitShuffle(4, 2).decode(encoded, 4 * n)


@pytest.mark.parametrize("row_length", [1, 3, 100])
@pytest.mark.parametrize("n", [0, 1, 99, 100, 301, 5000])
def test_fp16_key_delta_round_trips_any_bits(row_length, n):
    bits = RNG.integers(0, 1 << 16, n, dtype=np.uint32).astype(np.uint16)
    bits[: min(n, 6)] = [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7FFF, 0xFFFF][: min(n, 6)]
    codec = Fp16KeyDelta(row_length)
    encoded = codec.encode(bits.view(np.uint8))
    assert np.array_equal(codec.decode(encoded, encoded.size).view(np.uint16), bits)


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


def test_all_fp16_bit_patterns_round_trip():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    codec = Fp16KeyDelta(128)
    encoded = codec.encode(bits.view(np.uint8))
    assert np.array_equal(codec.decode(encoded, encoded.size).view(np.uint16), bits)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("read") / "cache")
    with CacheWriter(url, k=8, vocab_size=70000, chunk_bytes=4096) as w:
        for record in synthetic_records(40, k=8, vocab_size=70000, mean_length=40, seed=3):
            w.add(**record)
    return url


def test_opening_a_cache_does_not_load_numba(small_cache):
    # Commands that read only manifests and footers (inspect's summary, ls) stay light.
    code = (
        "import sys\n"
        "from logitcache import open_cache\n"
        f"cache = open_cache({small_cache!r})\n"
        "assert len(cache) == 40 and cache.shard_file(0).records > 0\n"
        "print('numba' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_block_is_hashed_once_per_process_but_verify_hashes_all(small_cache, monkeypatch):
    calls: list[tuple[int, str]] = []
    original = ShardFile.block_problem

    def counting(self, index, name):
        calls.append((index, name))
        return original(self, index, name)

    monkeypatch.setattr(ShardFile, "block_problem", counting)
    with open_cache(small_cache, chunk_cache_size=1) as cache:
        shard = cache.shard_file(0)
        first = shard.decode_chunk(0)
        assert len(calls) == len(shard.chunks[0]["blocks"])
        again = shard.decode_chunk(0)  # e.g. evicted from the LRU and read again
        assert len(calls) == len(shard.chunks[0]["blocks"])
        assert np.array_equal(first.topk_ids, again.topk_ids)
        calls.clear()
        assert cache.verify() == []
        blocks = sum(
            len(c["blocks"])
            for s in range(len(cache.manifest.shards))
            for c in cache.shard_file(s).chunks
        )
        assert len(calls) == blocks  # a full verification still checks every block


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


def test_load_read_kernels_compiles_the_default_decoders_in_advance():
    # A forked DataLoader worker inherits these instead of loading numba itself.
    code = (
        "from logitcache.codecs import load_read_kernels\n"
        "load_read_kernels()\n"
        "from logitcache import _kernels as k\n"
        "names = ['byte_unshuffle', 'unshuffle_ids', 'fp16_key_delta_decode']\n"
        "print(all(getattr(k, n).signatures for n in names))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
