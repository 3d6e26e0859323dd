"""A random read decodes its record's rows only (Pipeline.stage, StagedBlock.decode_range):
every range decodes to the same bytes as the whole block sliced, on both decoder sets; a
pipeline that cannot decode by ranges decodes whole; faults are still refused."""

from __future__ import annotations

import numpy as np
import pytest

from logitcache import CorruptCacheError, codecs, open_cache
from logitcache.codecs import (
    CodecError,
    Fp16KeyDelta,
    KeyDeltaPlanes,
    Pipeline,
    default_pipelines,
    entropy_pipeline_configs,
)
from tests.conftest import SMALL_VOCAB, assert_record_equal, write_cache
from tests.test_decode_kernels import read_path  # noqa: F401 (fixture)
from tests.test_faults import block_checksum, rewrite_chunk0

RNG = np.random.default_rng(21)


def _rows(k: int, n: int, vocab: int):
    """n teacher rows: ids up to the vocabulary's top bit, logprobs descending in a row."""
    ids = RNG.integers(0, vocab, (n, k), dtype=np.int32)
    ids[:, 0] = vocab - 1  # every bit plane the vocabulary needs is in use
    logprobs = -np.sort(RNG.exponential(3.0, (n, k)), axis=1).astype(np.float16)
    return ids, logprobs


def _ranges(n: int):
    """Every (lo, hi) for small n, else the edges and a sample."""
    if n <= 12:
        return [(lo, hi) for lo in range(n + 1) for hi in range(lo, n + 1)]
    picks = {(0, n), (0, 1), (n - 1, n), (1, n - 1), (n // 2, n // 2)}
    for _ in range(40):
        lo, hi = sorted(RNG.integers(0, n + 1, 2).tolist())
        picks.add((lo, hi))
    return sorted(picks)


@pytest.mark.parametrize("k", [1, 3, 7, 100])
@pytest.mark.parametrize("n", [1, 5, 9, 333])
@pytest.mark.parametrize("vocab", [300, 128256, 1 << 20])
def test_every_row_range_decodes_as_the_whole_block_sliced(k, n, vocab, read_path):  # noqa: F811
    ids, logprobs = _rows(k, n, vocab)
    pipes = default_pipelines(k)
    for name, values in (("topk_ids", ids), ("topk_logprobs", logprobs)):
        pipe = pipes[name]
        data = np.frombuffer(pipe.encode(values), dtype=np.uint8)
        whole = pipe.decode_bytes(data, values.nbytes)
        width = k * values.itemsize
        staged = pipe.stage(data, values.nbytes, width)
        assert staged is not None
        for lo, hi in _ranges(n):
            got = staged.decode_range(lo * width, hi * width)
            assert got.tobytes() == whole[lo * width : hi * width].tobytes(), (name, lo, hi)


def test_pipelines_without_a_gather_stage_do_not_stage():
    k = 5
    entropy = entropy_pipeline_configs(k)
    ids, logprobs = _rows(k, 20, 1000)
    for name, values in (("topk_ids", ids), ("topk_logprobs", logprobs)):
        pipe = Pipeline.from_config(entropy[name])
        data = np.frombuffer(pipe.encode(values), dtype=np.uint8)
        assert pipe.stage(data, values.nbytes, k * values.itemsize) is None
    # zstd alone has nothing to decode by ranges either.
    assert Pipeline.from_config([{"id": "zstd", "level": 1}]).stage(b"", 0, 4) is None


def test_rows_not_whole_for_the_key_delta_do_not_stage():
    k = 4
    pipe = default_pipelines(k)["topk_logprobs"]
    _, logprobs = _rows(k, 6, 100)
    data = np.frombuffer(pipe.encode(logprobs), dtype=np.uint8)
    assert pipe.stage(data, logprobs.nbytes, 2 * k) is not None
    assert pipe.stage(data, logprobs.nbytes, k) is None  # half rows: gaps cross the ends


@pytest.mark.parametrize("name", ["topk_ids", "topk_logprobs"])
def test_a_range_outside_the_block_or_its_rows_is_refused(name, read_path):  # noqa: F811
    """The kernels index the staged block with the range: it is checked before they run."""
    k, n = 7, 20
    values = _rows(k, n, 128256)[0 if name == "topk_ids" else 1]
    pipe = default_pipelines(k)[name]
    width = k * values.itemsize
    staged = pipe.stage(np.frombuffer(pipe.encode(values), np.uint8), values.nbytes, width)
    for start, stop in [(-width, width), (0, (n + 1) * width), (2 * width, width), (1, width)]:
        with pytest.raises(ValueError, match="byte range"):
            staged.decode_range(start, stop)


@pytest.mark.parametrize("kernel_set", ["numba", "compiled"])
def test_the_range_kernels_refuse_what_would_index_outside_the_block(kernel_set, request):
    """Called directly, past StagedBlock's checks, the kernel paths still check what they
    index with (numpy's paths slice, which cannot read outside the block)."""
    kernels = codecs.kernels()
    if kernel_set == "compiled":
        kernels = request.getfixturevalue("compiled_decoders")
    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setattr(codecs, "read_kernels", lambda nbytes: kernels)
    n = 16
    ids = default_pipelines(1)["topk_ids"].codecs[0]
    planes = KeyDeltaPlanes(Fp16KeyDelta(1))
    ids_buf = ids.encode(np.arange(n, dtype=np.uint32).view(np.uint8))
    lp_buf = planes.encode(np.arange(n, dtype=np.uint16).view(np.uint8))
    for codec, buf, size in ((ids, ids_buf, 4 * n), (planes, lp_buf, 2 * n)):
        whole = codec.decode(buf, size).tobytes()
        assert codec.decode_range(buf, size, 0, size).tobytes() == whole
        for start, stop in [(0, size + 4), (-4, 4), (1, 5)]:
            with pytest.raises(CodecError, match="cannot decode bytes"):
                codec.decode_range(buf, size, start, stop)
        with pytest.raises(CodecError, match="cannot decode bytes"):
            codec.decode_range(buf[:-2], size, 0, 4)


def test_a_set_padding_bit_is_refused_when_staging():
    k, n = 3, 3  # 9 ids: the bit planes' last byte has 7 padding bits
    pipe = Pipeline.from_config([{"id": "byte_bit_shuffle", "elementsize": 4, "byte_planes": 2}])
    ids, _ = _rows(k, n, 1 << 17)
    data = np.frombuffer(pipe.encode(ids), dtype=np.uint8).copy()
    data[-1] |= 1
    with pytest.raises(CodecError, match="padding bit"):
        pipe.stage(data, ids.nbytes, 4 * k)


@pytest.mark.parametrize("codecs", ["default", "entropy"])
def test_random_reads_equal_the_scan(tmp_path, records_factory, codecs):
    records = records_factory(40)
    k = records[0]["topk_ids"].shape[1]
    path = tmp_path / "cache"
    write_cache(
        path,
        records,
        k=k,
        vocab_size=SMALL_VOCAB,
        chunk_bytes=3000,
        codecs=None if codecs == "default" else entropy_pipeline_configs(k),
    )
    with open_cache(path, chunk_cache_size=1) as cache:
        order = RNG.permutation(len(records)).tolist()
        for i in order + order[:5]:
            assert_record_equal(cache[i], records[i])
            assert not cache[i].topk_ids.flags.writeable
        assert cache.shard_file(0).decode_chunk(0).topk_ids.shape[1] == k
    with open_cache(path, k=2) as cache:
        got = cache[len(records) - 1]
        assert got.topk_ids.shape[1] == 2
        assert np.array_equal(got.topk_ids, records[-1]["topk_ids"][:, :2])


def test_a_record_with_an_id_outside_the_vocabulary_is_refused(small_cache):
    """Checksums valid, one id of chunk 0's last row past the vocabulary: that record's read
    is refused, naming the shard and chunk; a record beside it in the chunk still reads."""
    with open_cache(small_cache.path) as cache:
        shard = cache.shard_file(0)
        ids = shard._column(0, "topk_ids").reshape(-1, small_cache.k).copy()
        target_starts = shard.decode_chunk(0).target_starts
        pipe = shard.pipelines["topk_ids"]
    owner = int(np.searchsorted(target_starts, len(ids) - 1, side="right") - 1)
    clean = next(r for r in range(len(target_starts) - 1) if r != owner)
    ids[-1, -1] = small_cache.vocab_size + 5
    frame = pipe.encode(ids)

    def edit(footer, positions):
        block = footer["chunks"][0]["blocks"]["topk_ids"]
        block["offset"], block["length"] = positions[0]
        block["checksum"] = block_checksum(frame)

    rewrite_chunk0(small_cache, edit, extra_blocks=[frame])
    name = small_cache.manifest.shards[0].path
    with open_cache(small_cache.path) as cache:
        assert_record_equal(cache[clean], small_cache.records[clean])
        with pytest.raises(CorruptCacheError, match=f"shard {name} chunk 0: topk_ids .*outside"):
            cache[owner]
        with pytest.raises(CorruptCacheError, match="outside"):
            list(cache.iter_records())
