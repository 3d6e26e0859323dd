"""Imports from object storage (moto on loopback): Parquet and JSON lines read from s3://, and
a cache replaced on S3 by a conversion onto itself."""

from __future__ import annotations

import json

import numpy as np

from logitcache import CacheWriter, open_cache
from logitcache.convert import convert
from logitcache.synthetic import synthetic_records
from tests.test_interop import VOCAB, axolotl_example, make_sequence

WRITE = {"k": 8, "vocab_size": 512, "chunk_bytes": 2048, "shard_bytes": 10_000}


def _write_local(path) -> list:
    records = list(synthetic_records(30, k=8, vocab_size=512, mean_length=20, seed=9))
    with CacheWriter(str(path), **WRITE) as writer:
        for record in records:
            writer.add(**record)
    with open_cache(str(path)) as cache:
        return list(cache.iter_records())


def _same(a, b) -> bool:
    return (
        all(
            np.array_equal(getattr(a, f), getattr(b, f))
            for f in ("input_ids", "loss_mask", "topk_ids", "topk_logprobs")
        )
        and a.sample_id == b.sample_id
    )


def test_parquet_export_to_s3_imports_back(s3_bucket, tmp_path):
    bucket, options = s3_bucket
    want = _write_local(tmp_path / "c")
    url = f"s3://{bucket}/exports/kd.parquet"
    convert(str(tmp_path / "c"), url, dst_storage_options=options, progress=False)
    result = convert(url, str(tmp_path / "back"), storage_options=options, progress=False)
    assert result.src_format == "parquet" and result.records == len(want)
    with open_cache(str(tmp_path / "back")) as cache:
        assert all(_same(a, b) for a, b in zip(cache, want, strict=True))


def test_axolotl_jsonl_on_s3_imports(s3_bucket, tmp_path):
    import s3fs

    bucket, options = s3_bucket
    rows = []
    for s in range(6):
        row = axolotl_example(*make_sequence(s, 10, prompt=2), sample_id=f"a{s}")
        row["target_logprobs"][0] = [-1e9] * len(row["target_logprobs"][0])
        rows.append(json.dumps(row))
    fs = s3fs.S3FileSystem(**options)
    fs.pipe(f"{bucket}/kd/part-0.jsonl", ("\n".join(rows) + "\n").encode())
    result = convert(
        f"s3://{bucket}/kd/part-0.jsonl",
        str(tmp_path / "c"),
        vocab_size=VOCAB,
        storage_options=options,
        progress=False,
    )
    assert result.src_format == "axolotl" and result.records == 6


def test_a_cache_on_s3_converted_onto_itself(s3_bucket, tmp_path):
    bucket, options = s3_bucket
    url = f"s3://{bucket}/caches/c"
    want = _write_local(tmp_path / "c")
    convert(str(tmp_path / "c"), url, dst_storage_options=options, progress=False)
    convert(url, url, k=4, storage_options=options, overwrite=True, progress=False)
    with open_cache(url, storage_options=options, cache_dir=str(tmp_path / "sc")) as cache:
        got = list(cache.iter_records())
        listed = {s.path for s in cache.manifest.shards}
        assert {n for n in cache.store.list("shards")} == listed
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids[:, :4])
