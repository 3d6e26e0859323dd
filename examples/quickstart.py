"""End-to-end example: write a cache of synthetic teacher outputs, inspect, verify, stream it
into a tiny student and take a few KD+SFT steps.

Run: python examples/quickstart.py OUT_DIR   (local disk, no GPU, about half a minute)
"""

from __future__ import annotations

import argparse
import os
import time

from tqdm import tqdm

from logitcache import CacheWriter, open_cache
from logitcache.inspect import (
    format_record_view,
    format_report,
    inspect_report,
    record_view,
    write_plots,
)
from logitcache.synthetic import synthetic_records

K, VOCAB, RECORDS = 100, 128256, 400


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", nargs="?", default="demo-out")
    args = parser.parse_args()
    url = os.path.join(args.out, "cache")

    start = time.perf_counter()
    with CacheWriter(
        url,
        k=K,
        vocab_size=VOCAB,
        overwrite=True,
        shard_bytes=8 << 20,
        teacher={"name": "synthetic-teacher", "revision": "seed-0"},
        tokenizer={"name": "synthetic", "vocab_size": VOCAB},
    ) as writer:
        records = synthetic_records(RECORDS, k=K, vocab_size=VOCAB, seed=0, mean_length=512)
        for record in tqdm(records, total=RECORDS, desc="write", unit="rec"):
            writer.add(**record)
    elapsed = time.perf_counter() - start

    with open_cache(url) as cache:
        # What `logitcache inspect URL --record 0 --plot DIR` prints and writes.
        report, sample = inspect_report(cache, progress=False)
        print()
        print(format_report(report))
        view = format_record_view(record_view(cache, 0, top=4)).splitlines()
        print("\n".join(view[:6]))
        plots = write_plots(sample, os.path.join(args.out, "plots"))
        print(f"\nplots: {', '.join(plots)}")
        cache.verify()
        print(f"verify: every checksum and invariant OK (written in {elapsed:.1f}s)")

    distill_a_few_steps(url)


def distill_a_few_steps(url: str, steps: int = 12, batch_size: int = 4) -> None:
    """Stream the cache into a tiny, randomly initialised Llama-style student and take a few
    AdamW steps on kd_weight * top-K forward KL + sft_weight * cross-entropy (NeMo-Aligner's
    tutorial weights 1.0 and 0.4). It shows the pieces fit; it is not a training recipe."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kd.losses import gather_target_rows, kd_sft_loss
    from logitcache.loader import LogitCacheDataset, LogitCacheLoader

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    student = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    loader = LogitCacheLoader(LogitCacheDataset(url, seed=0), batch_size)
    print(
        f"\nstudent: {sum(p.numel() for p in student.parameters()) / 1e6:.1f}M parameters; "
        f"{steps} steps of {batch_size} records"
    )
    for step, batch in zip(range(1, steps + 1), loader, strict=False):
        out = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        rows = gather_target_rows(out.last_hidden_state, batch["labels"], batch["kd_index"])
        loss = kd_sft_loss(
            rows.hidden,
            student.lm_head.weight,
            rows.targets,
            batch["kd_ids"],
            batch["kd_logprobs"],
            kd_rows=rows.kd_rows,
            kd_weight=1.0,
            sft_weight=0.4,
        )
        optimizer.zero_grad()
        loss.total.backward()
        optimizer.step()
        if step == 1 or step % 3 == 0:
            print(
                f"  step {step:3d}  total {loss.total.item():.3f}  "
                f"KD {loss.kd.item():.3f}  CE {loss.ce.item():.3f}"
            )


if __name__ == "__main__":
    main()
