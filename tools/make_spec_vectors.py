"""Regenerate the golden caches in spec/vectors/ and the JSON of their decoded contents.

Each vector exercises a different corner of the format (K, vocab size, positions mode, codec
pipelines, sample_id, several chunks and shards). Run: python tools/make_spec_vectors.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np

from logitcache import CacheWriter, open_cache
from logitcache.manifest import Manifest

VECTORS = {
    "supervised-k4-v50": dict(
        k=4,
        vocab_size=50,
        positions="supervised",
        records=3,
        sample_ids="all",
        codecs=None,
        chunk_bytes=1 << 20,
        shard_bytes=1 << 20,
    ),
    "all-k1-v300-varint": dict(
        k=1,
        vocab_size=300,
        positions="all",
        records=4,
        sample_ids="none",
        codecs={
            "topk_ids": [{"id": "varint"}, {"id": "zstd", "level": 1}],
            "topk_logprobs": [{"id": "shuffle", "elementsize": 2}, {"id": "zstd", "level": 1}],
            "input_ids": [{"id": "int_delta"}, {"id": "varint"}, {"id": "zstd", "level": 19}],
        },
        chunk_bytes=1 << 20,
        shard_bytes=1 << 20,
    ),
    "supervised-k8-v70000-sharded": dict(
        k=8,
        vocab_size=70000,
        positions="supervised",
        records=7,
        sample_ids="some",
        codecs=None,
        chunk_bytes=200,
        shard_bytes=600,
    ),
    # The entropy codecs of format 1.1 (sections 6.8-6.10): ids above 2^16, a row ending in
    # filler ids, record lengths through ans_uint(4, 1).
    "supervised-k6-v70000-ans": dict(
        k=6,
        vocab_size=70000,
        positions="supervised",
        records=6,
        sample_ids="some",
        codecs={
            "topk_ids": [{"id": "ans_ids", "row_length": 6}],
            "topk_logprobs": [
                {"id": "fp16_key_delta", "row_length": 6},
                {"id": "ans_uint", "elementsize": 2, "row_length": 6},
            ],
            "input_ids": [{"id": "ans_ids", "row_length": 1}],
            "record_lengths": [{"id": "ans_uint", "elementsize": 4, "row_length": 1}],
        },
        chunk_bytes=1 << 20,
        shard_bytes=1 << 20,
        filler_row=True,
    ),
    # A lossy cache (section 12): fp16_grid + ans_uint, padded rows.
    "all-k5-v1000-lossy": dict(
        k=5,
        vocab_size=1000,
        positions="all",
        records=5,
        sample_ids="none",
        codecs=None,
        lossy_kl=0.05,
        chunk_bytes=1 << 20,
        shard_bytes=1 << 20,
    ),
}


def _records(spec: dict, seed: int):
    """Small records with edge cases: T=1, N=0, ids above 65535, ties, -65504, subnormals."""
    rng = np.random.default_rng(seed)
    k, vocab, positions = spec["k"], spec["vocab_size"], spec["positions"]
    for r in range(spec["records"]):
        t = 1 if r == 0 else int(rng.integers(2, 9))
        mask = np.zeros(t, dtype=bool)
        if t > 1:
            mask[1:] = rng.random(t - 1) < 0.7
        if r == 1:
            mask[:] = False
        n = t - 1 if positions == "all" else int(mask.sum())
        ids = (
            np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(n)])
            if n
            else (np.zeros((0, k), dtype=np.int32))
        )
        if n and vocab > 65536:
            ids[0, 0] = vocab - 1
        logits = rng.normal(scale=2.0, size=(n, k + 3))
        logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        logprobs = logprobs[:, :k].astype(np.float16)
        if n and k >= 4:
            logprobs[0, 2] = logprobs[0, 3] = min(logprobs[0, 2], logprobs[0, 3])  # a tie
            logprobs[-1, -1] = np.float16(-65504.0)
        if n and k == 1 and r == 2:
            logprobs[0, 0] = -np.float16(6e-8)  # a subnormal: p just below 1
        if spec.get("filler_row") and n:
            # Ends in the smallest ids not among the others: ans_ids codes only how many.
            free = [i for i in range(k) if i not in ids[0, : k - 2]]
            ids[0, k - 2 :] = free[:2]
            logprobs[0, k - 2 :] = [-20.0, -21.0]  # last in canonical order
        sample_id = {"all": f"example-{r}", "none": None}.get(
            spec["sample_ids"], f"ex/{r}/é" if r % 2 else None
        )
        yield dict(
            input_ids=rng.integers(0, vocab, size=t).astype(np.int32),
            loss_mask=mask,
            topk_ids=ids.astype(np.int32),
            topk_logprobs=logprobs,
            sample_id=sample_id,
        )


def decoded_json(url: str) -> dict:
    """The decoded contents of a cache, exact: logprobs as their binary16 bit patterns too."""
    with open_cache(url) as cache:
        m = cache.manifest
        return {
            "k": m.k,
            "vocab_size": m.vocab_size,
            "positions": m.positions,
            "shards": len(m.shards),
            "records": [
                {
                    "input_ids": r.input_ids.tolist(),
                    "loss_mask": r.loss_mask.astype(int).tolist(),
                    "topk_ids": r.topk_ids.tolist(),
                    "topk_logprobs_bits": r.topk_logprobs.view(np.uint16).tolist(),
                    "topk_logprobs": r.topk_logprobs.astype(float).tolist(),
                    "sample_id": r.sample_id,
                }
                for r in cache.iter_records()
            ],
        }


def write_vector(out_dir: str, name: str, spec: dict, seed: int) -> None:
    root = os.path.join(out_dir, name)
    shutil.rmtree(root, ignore_errors=True)
    with CacheWriter(
        root,
        k=spec["k"],
        vocab_size=spec["vocab_size"],
        positions=spec["positions"],
        codecs=spec["codecs"],
        chunk_bytes=spec["chunk_bytes"],
        shard_bytes=spec["shard_bytes"],
        teacher={"name": "spec-vector"},
        tokenizer={"name": "spec-vector"},
        threads=1,
        # A fixed generation token keeps regenerated shard names and footers byte-identical.
        generation=f"{seed:012x}",
        lossy_kl=spec.get("lossy_kl"),
    ) as writer:
        for record in _records(spec, seed):
            writer.add(**record)
    # A fixed timestamp keeps regenerated vectors byte-identical (the manifest is re-sealed).
    path = os.path.join(root, "manifest.json")
    with open(path, "rb") as f:
        manifest = Manifest.loads(f.read())
    manifest.created_at = "2026-01-01T00:00:00+00:00"
    manifest.created_by = "logitcache spec vectors"
    with open(path, "wb") as f:
        f.write(manifest.dumps())
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(decoded_json(root), f, indent=1)
        f.write("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "..", "spec", "vectors")
    )
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for seed, (name, spec) in enumerate(VECTORS.items()):
        write_vector(args.out, name, spec, seed)
        print(f"wrote {os.path.join(args.out, name)}")


if __name__ == "__main__":
    main()
