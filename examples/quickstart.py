"""End-to-end example: write a cache of synthetic teacher outputs, inspect, verify, read it.

Run: python examples/quickstart.py OUT_DIR   (what `make demo` runs; local disk, no GPU)
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from tqdm import tqdm

from logitcache import CacheWriter, open_cache
from logitcache.synthetic import synthetic_records

K, VOCAB, RECORDS = 100, 128256, 400


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", nargs="?", default="demo-out")
    args = parser.parse_args()
    url = os.path.join(args.out, "cache")

    start = time.perf_counter()
    with CacheWriter(
        url, k=K, vocab_size=VOCAB, overwrite=True, shard_bytes=8 << 20,
        teacher={"name": "synthetic-teacher", "revision": "seed-0"},
        tokenizer={"name": "synthetic", "vocab_size": VOCAB},
    ) as writer:
        records = synthetic_records(RECORDS, k=K, vocab_size=VOCAB, seed=0, mean_length=512)
        for record in tqdm(records, total=RECORDS, desc="write", unit="rec"):
            writer.add(**record)
    elapsed = time.perf_counter() - start

    with open_cache(url) as cache:
        m = cache.manifest
        raw = m.targets * K * 6 + m.tokens * 5
        print(f"\ncache {url}")
        print(f"  records {m.records}  tokens {m.tokens}  target tokens {m.targets}")
        print(f"  K {m.k}  vocab {m.vocab_size}  positions {m.positions}  shards {len(m.shards)}")
        print(f"  {m.bytes / 1e6:.1f} MB on disk, {m.bytes / m.targets:.1f} B per target token "
              f"({m.bytes / raw:.3f}x raw fp16+int32), written in {elapsed:.1f}s")
        cache.verify()
        print("  verify: every checksum and invariant OK")

        record = cache[0]
        positions = record.target_positions(m.positions)
        print(f"\nrecord 0 ({record.sample_id}): {record.num_tokens} tokens, "
              f"{record.num_targets} targets; first three targets:")
        for j in range(min(3, record.num_targets)):
            probs = np.exp(record.topk_logprobs[j].astype(np.float32))
            top = ", ".join(f"{t}:{p:.3f}" for t, p in zip(record.topk_ids[j][:4], probs[:4]))
            print(f"  position {positions[j]} (token {record.input_ids[positions[j]]}): "
                  f"top-4 {top}  tail mass {1 - probs.sum():.4f}")


if __name__ == "__main__":
    main()
