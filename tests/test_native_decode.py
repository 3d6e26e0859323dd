"""A chunk of the default pipelines decoded in one call (logitcache/native.py) gives the same
records as the codec-by-codec path, falls back to it for anything it cannot decode, and
leaves every error to it, so messages still name shard, chunk and column."""

from __future__ import annotations

import numpy as np
import pytest

from logitcache import CorruptCacheError, codecs, native, open_cache
from logitcache.codecs import default_pipeline_configs, entropy_pipeline_configs

from .conftest import SMALL_K, SMALL_VOCAB, assert_record_equal, make_records, write_cache


class Calls:
    """Counts what native.decode_default_chunk did: decoded a chunk, or handed it back."""

    def __init__(self, monkeypatch):
        self.decoded = self.handed_back = 0
        real = native.decode_default_chunk

        def spy(*args, **kwargs):
            got = real(*args, **kwargs)
            if isinstance(got, native.DefaultChunk):
                self.decoded += 1
            else:
                self.handed_back += 1
            return got

        monkeypatch.setattr(native, "decode_default_chunk", spy)


@pytest.fixture
def numba_kernels(monkeypatch):
    """Reads use numba's kernels from the first byte (the compiled ones are off in tests)."""
    monkeypatch.setattr(codecs, "_KERNELS", codecs.kernels())


def assert_reads_give(path, records):
    """Every record, by a scan and by random reads (staged teacher rows), is the one written."""
    with open_cache(str(path)) as cache:
        scanned = list(cache.iter_records(read_ahead=0))
        order = np.random.default_rng(0).permutation(len(cache)).tolist()
        randomly = {i: cache[i] for i in order}
    assert len(scanned) == len(records)
    for i, want in enumerate(records):
        assert_record_equal(scanned[i], want, f"scan {i}")
        assert_record_equal(randomly[i], want, f"random {i}")


@pytest.mark.parametrize("positions", ["supervised", "all"])
@pytest.mark.parametrize("with_sample_id", [True, False])
def test_one_call_decodes_the_records_written(
    tmp_path, monkeypatch, numba_kernels, positions, with_sample_id
):
    records = make_records(40, positions=positions, with_sample_id=with_sample_id, seed=3)
    write_cache(
        tmp_path / "c",
        records,
        k=SMALL_K,
        vocab_size=SMALL_VOCAB,
        positions=positions,
        chunk_bytes=1500,
    )
    calls = Calls(monkeypatch)
    assert_reads_give(tmp_path / "c", records)
    assert calls.decoded > 2 and calls.handed_back == 0


def test_the_compiled_decoders_decode_in_one_call(tmp_path, monkeypatch, compiled_decoders):
    records = make_records(30, seed=4)
    write_cache(tmp_path / "c", records, k=SMALL_K, vocab_size=SMALL_VOCAB, chunk_bytes=1500)
    monkeypatch.setattr(codecs, "compiled_kernels", lambda: compiled_decoders)
    calls = Calls(monkeypatch)
    assert_reads_give(tmp_path / "c", records)
    assert calls.decoded > 2 and calls.handed_back == 0


def test_without_the_c_functions_chunks_decode_codec_by_codec(tmp_path, monkeypatch, numba_kernels):
    records = make_records(12, seed=5)
    write_cache(tmp_path / "c", records, k=SMALL_K, vocab_size=SMALL_VOCAB, chunk_bytes=1500)
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    calls = Calls(monkeypatch)
    assert_reads_give(tmp_path / "c", records)
    assert calls.decoded == 0 and calls.handed_back > 0


def test_ids_on_more_than_two_bit_planes_are_handed_back_and_decoded(
    tmp_path, monkeypatch, numba_kernels
):
    """Ids at and above 2**18 use more high bit planes than the one-call path decodes: the
    first chunk that has them is handed back, and its shard's other chunks are not tried."""
    vocab = 1 << 21
    records = make_records(12, vocab_size=vocab, seed=6)
    assert max(int(r["topk_ids"].max()) for r in records) >= 1 << 19
    write_cache(tmp_path / "c", records, k=SMALL_K, vocab_size=vocab, chunk_bytes=1500)
    calls = Calls(monkeypatch)
    with open_cache(str(tmp_path / "c")) as cache:
        assert len(cache.manifest.shards) == 1 and len(cache.shard_file(0).chunks) > 2
    assert_reads_give(tmp_path / "c", records)
    assert calls.decoded == 0
    assert calls.handed_back == 1  # the first chunk the shard decoded; none after it


@pytest.mark.parametrize("random_read", [False, True])
def test_a_bad_checksum_is_named_by_shard_chunk_and_column(
    small_cache, monkeypatch, numba_kernels, random_read
):
    manifest = small_cache.manifest
    with open_cache(str(small_cache.path)) as cache:
        offset, length, _, _ = cache.shard_file(0).chunks.block(1, "topk_logprobs")
    path = small_cache.shard_path(0)
    data = bytearray(path.read_bytes())
    data[offset + length // 2] ^= 0x10
    path.write_bytes(bytes(data))
    calls = Calls(monkeypatch)
    first_of_chunk_1 = manifest.shards[0].chunk_records[0]
    with open_cache(str(small_cache.path)) as cache, pytest.raises(CorruptCacheError) as caught:
        if random_read:
            cache[first_of_chunk_1]
        else:
            list(cache.iter_records(read_ahead=0))
    message = str(caught.value)
    assert manifest.shards[0].path in message
    assert "chunk 1 column topk_logprobs: checksum mismatch" in message
    assert calls.handed_back == 1


def test_default_pipelines_fit_at_any_zstd_level_and_others_do_not():
    defaults = default_pipeline_configs(SMALL_K)
    assert native.fits(defaults, SMALL_K)
    other_level = {
        name: [{**c, "level": 9} if c["id"] == "zstd" else c for c in configs]
        for name, configs in defaults.items()
    }
    assert native.fits(other_level, SMALL_K)
    assert not native.fits({**defaults, **entropy_pipeline_configs(SMALL_K)}, SMALL_K)
    assert not native.fits(defaults, SMALL_K + 1)  # the key-delta rows are K long


def test_each_thread_has_its_own_zstd_context_freed_with_the_thread():
    import dataclasses
    import gc
    import threading

    functions = native.c_functions()
    assert functions is not None, "zstandard's and xxhash's libraries export their C API"
    freed = []

    def free(dctx):
        freed.append(dctx)
        return functions.free_dctx(dctx)

    counting = dataclasses.replace(functions, free_dctx=free)
    tables = [native._thread_table(functions)]
    worker = threading.Thread(target=lambda: tables.append(native._thread_table(counting)))
    worker.start()
    worker.join()
    gc.collect()
    assert tables[0][0] != tables[1][0]  # the context
    assert tables[0][1:].tolist() == tables[1][1:].tolist()  # the same functions
    assert freed == [tables[1][0]]  # the worker's, when it ended


def test_the_self_check_passes_numba_and_compiled_kernels(compiled_decoders):
    assert native.self_check(codecs.kernels()) is None
    assert native.self_check(compiled_decoders) is None
