"""kd prune's calibration from object storage: SFT rows and a logit cache on a real S3-compatible
server (moto on loopback), told apart by the cache's manifest."""

from __future__ import annotations

import json

import fsspec
import numpy as np

from kd.prune import is_cache, load_calibration
from logitcache import CacheWriter
from logitcache.identity import tokenizer_identity

from ..kd.conftest import CORPUS, build_tokenizer


def test_calibration_from_s3_rows_and_cache(s3_bucket):
    bucket, options = s3_bucket
    tokenizer = build_tokenizer()
    rows_url = f"s3://{bucket}/sft/calib.jsonl"
    with fsspec.open(rows_url, "w", **options) as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    cache_url = f"s3://{bucket}/cache"
    rng = np.random.default_rng(0)
    with CacheWriter(
        cache_url,
        k=4,
        vocab_size=len(tokenizer),
        tokenizer=tokenizer_identity(tokenizer),
        storage_options=options,
    ) as writer:
        for text in CORPUS:
            ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int32)
            mask = np.ones(len(ids), dtype=bool)
            mask[0] = False
            n = int(mask.sum())
            writer.add(
                input_ids=ids,
                loss_mask=mask,
                topk_ids=np.stack([rng.permutation(len(tokenizer))[:4] for _ in range(n)]),
                topk_logprobs=np.log(np.full((n, 4), 0.2)),
            )

    assert not is_cache(rows_url, options) and not is_cache(f"s3://{bucket}/sft", options)
    assert is_cache(cache_url, options) and is_cache(cache_url + "/", options)
    from_rows = load_calibration(rows_url, tokenizer, samples=4, storage_options=options)
    from_cache = load_calibration(cache_url, tokenizer, samples=4, storage_options=options)
    assert (from_rows.kind, from_cache.kind) == ("data", "cache")
    assert len(from_rows.examples) == len(from_cache.examples) == 4
    for a, b in zip(from_rows.examples, from_cache.examples, strict=True):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
