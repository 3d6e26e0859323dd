"""Bring teacher outputs made by other tools into logitcache, and take caches out to Parquet.

This module reads the rows of a source (JSON lines or Parquet files) and recognises its format;
`parquet`, `nemo` and `axolotl` turn rows into `CacheWriter.add` keyword arguments.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

FORMAT_CACHE = "cache"
FORMAT_PARQUET = "parquet"
FORMAT_NEMO = "nemo"
FORMAT_AXOLOTL = "axolotl"
SOURCE_FORMATS = (FORMAT_CACHE, FORMAT_PARQUET, FORMAT_NEMO, FORMAT_AXOLOTL)

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


def source_files(path: str) -> list[str]:
    """The data files of a source: the file, or the JSON lines / Parquet files in a directory."""
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        files = [
            os.path.join(path, n)
            for n in names
            if n.lower().endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES)
        ]
        if not files:
            raise ValueError(
                f"{path}: no .jsonl or .parquet files in this directory; "
                "point at a data file or a directory of them"
            )
        return files
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file or directory")
    return [path]


def _is_parquet(path: str) -> bool:
    if path.lower().endswith(PARQUET_SUFFIXES):
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


def iter_rows(path: str, *, columns: list[str] | None = None) -> Iterator[tuple[str, int, dict]]:
    """Yield (file, row index within the file, row dict) for every example of a source.

    JSON lines are parsed one at a time and Parquet files one row group at a time, so a source
    of any size streams in bounded memory.
    """
    for file in source_files(path):
        if _is_parquet(file):
            yield from _iter_parquet_rows(file, columns)
        else:
            yield from _iter_jsonl_rows(file)


def _iter_jsonl_rows(file: str) -> Iterator[tuple[str, int, dict]]:
    index = 0
    with open(file, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{file} line {line_number}: not valid JSON ({e.msg}); "
                    "each line must hold one JSON object"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{file} line {line_number}: expected a JSON object, got {type(row).__name__}"
                )
            yield file, index, row
            index += 1


def _iter_parquet_rows(file: str, columns: list[str] | None) -> Iterator[tuple[str, int, dict]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(file)
    present = set(pf.schema_arrow.names)
    wanted = None if columns is None else [c for c in columns if c in present]
    index = 0
    for group in range(pf.num_row_groups):
        for row in pf.read_row_group(group, columns=wanted).to_pylist():
            yield file, index, row
            index += 1


def first_row(path: str) -> tuple[str, dict] | None:
    """The first example of a source and its file, or None when the source has no rows."""
    for file, _, row in iter_rows(path):
        return file, row
    return None


def detect_format(path: str) -> str:
    """Recognise a source: a logitcache cache, a logitcache Parquet export, NeMo or axolotl data.

    Raises ValueError naming the path and the fields it expected when nothing matches.
    """
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "manifest.json")):
        return FORMAT_CACHE
    if "://" in path and not path.startswith("file://"):
        return FORMAT_CACHE  # remote URLs are caches; imports read local files
    for file in source_files(path):
        if _is_parquet(file):
            from .parquet import read_export_header

            if read_export_header(file) is not None:
                return FORMAT_PARQUET
        break
    found = first_row(path)
    if found is None:
        raise ValueError(f"{path}: the source has no rows")
    file, row = found
    keys = set(row)
    if {"topk_logits", "topk_token_ids"} <= keys:
        return FORMAT_NEMO
    if {"target_token_ids", "target_logprobs"} <= keys:
        return FORMAT_AXOLOTL
    if {"input_ids", "loss_mask", "topk_ids", "topk_logprobs"} <= keys:
        return FORMAT_PARQUET
    raise ValueError(
        f"{file}: cannot tell the source format from its fields {sorted(keys)[:12]}; expected "
        "NeMo-Aligner KD fields (topk_logits, topk_token_ids, log_sum_exp_logits), axolotl KD "
        "fields (target_token_ids, target_logprobs, target_mask) or a logitcache Parquet export; "
        "pass --from to name the format"
    )


# The most negative finite float16; the writer clamps to it too (probability 0 at any precision).
FP16_MIN = -65504.0


def to_fp16_logprobs(values: np.ndarray) -> np.ndarray:
    """Round log-probabilities to float16 once, from full precision, as the writer would."""
    return np.maximum(np.asarray(values, dtype=np.float64), FP16_MIN).astype(np.float16)


def require_field(row: dict, names: tuple[str, ...], *, where: str) -> Any:
    """The value of the first of `names` present in `row`; ValueError naming them otherwise."""
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    wanted = " or ".join(repr(n) for n in names)
    raise ValueError(f"{where}: missing field {wanted} (fields present: {sorted(row)[:12]})")
