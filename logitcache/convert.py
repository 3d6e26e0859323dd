"""Reshape a cache or bring data in from elsewhere: re-encode with other codecs, keep the top
K' < K, copy between local and object storage, export to Parquet, import Parquet / NeMo-Aligner
/ axolotl data.

Every conversion is a stream: a source yields records one at a time and a sink writes them, so
memory stays bounded whatever the size.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .format import POSITIONS_MODES, POSITIONS_SUPERVISED, Record
from .identity import tokenizer_identity as tokenizer_identity_of
from .interop import (
    FORMAT_AXOLOTL,
    FORMAT_CACHE,
    FORMAT_NEMO,
    FORMAT_PARQUET,
    SOURCE_FORMATS,
    detect_format,
    source_files,
)
from .interop.alignment import checked_alignment

DEST_FORMATS = (FORMAT_CACHE, FORMAT_PARQUET)
_RECORD_PREFIX = re.compile(r"^record \d+: ")
# The file a Parquet export writes when its destination is a directory.
PARQUET_PART_NAME = "part-00000.parquet"


@dataclass
class Source:
    """What a conversion reads: the cache identity and a stream of (location, add kwargs)."""

    format: str
    k: int
    vocab_size: int | None
    positions: str
    records: Iterator[tuple[str, dict]]
    teacher: dict | None = None
    tokenizer: dict | None = None
    metadata: dict = field(default_factory=dict)
    total: int | None = None  # number of records when known up front (for the progress bar)
    close: Any = None


@dataclass
class ConvertResult:
    src_format: str
    dst_format: str
    dst: str
    records: int
    k: int
    vocab_size: int
    skipped: list[str] = field(default_factory=list)


def truncate_topk(
    topk_ids: np.ndarray, topk_logprobs: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keep each row's k largest logprobs (ties: the smaller id first, as in canonical order)."""
    if topk_ids.shape[1] <= k:
        return topk_ids, topk_logprobs
    order = np.lexsort((topk_ids, -topk_logprobs.astype(np.float32)), axis=1)[:, :k]
    return np.take_along_axis(topk_ids, order, axis=1), np.take_along_axis(
        topk_logprobs, order, axis=1
    )


def _record_kwargs(record: Record) -> dict:
    return {
        "input_ids": record.input_ids,
        "loss_mask": record.loss_mask,
        "topk_ids": record.topk_ids,
        "topk_logprobs": record.topk_logprobs,
        "sample_id": record.sample_id,
    }


def guess_dest_format(dst: str) -> str:
    """Parquet when the destination ends in .parquet, else a cache."""
    return FORMAT_PARQUET if dst.lower().endswith((".parquet", ".pq")) else FORMAT_CACHE


def tokenizer_identity(path: str) -> tuple[dict, int]:
    """(identity dict for the manifest, vocabulary size) of a local Hugging Face tokenizer."""
    from .inspect import load_tokenizer

    tok = load_tokenizer(path)
    return tokenizer_identity_of(tok, name=os.path.abspath(path)), len(tok)


def _peek(records: Iterator[tuple[str, dict]]) -> tuple[tuple[str, dict] | None, Iterator]:
    first = next(records, None)
    if first is None:
        return None, iter(())

    def chained():
        yield first
        yield from records

    return first, chained()


def open_source(
    src: str,
    *,
    src_format: str | None = None,
    vocab_size: int | None = None,
    positions: str | None = None,
    k: int | None = None,
    storage_options: dict | None = None,
    skipped: list | None = None,
    layout: str | None = None,
) -> Source:
    """Open any supported source as a stream of records with the cache identity it implies.

    NeMo-Aligner and axolotl records pass through an alignment check (see interop.alignment).
    """
    fmt = src_format or detect_format(src, storage_options)
    if fmt not in SOURCE_FORMATS:
        raise ValueError(f"--from {fmt!r}: choose one of {SOURCE_FORMATS}")
    if positions is not None and positions not in POSITIONS_MODES:
        raise ValueError(f"--positions {positions!r}: choose one of {POSITIONS_MODES}")
    if fmt == FORMAT_CACHE:
        return _open_cache_source(src, positions=positions, storage_options=storage_options)
    if layout is not None and fmt != FORMAT_AXOLOTL:
        raise ValueError(f"--layout applies to axolotl data; {src} is {fmt} data")
    if fmt == FORMAT_PARQUET:
        return _open_parquet_source(
            src, vocab_size=vocab_size, positions=positions, storage_options=storage_options
        )
    mode = positions or POSITIONS_SUPERVISED
    if fmt == FORMAT_NEMO:
        from .interop.nemo import iter_nemo_records

        stream = iter_nemo_records(
            src, positions=mode, skipped=skipped, storage_options=storage_options
        )
        claimed = "NeMo-Aligner's layout (row t is the distribution of token t + 1)"
        hints = {}
    else:
        from .interop.axolotl import LAYOUT_NEXT_TOKEN, LAYOUT_TOKEN, iter_axolotl_records

        layout = layout or LAYOUT_TOKEN
        stream = iter_axolotl_records(
            src,
            k=k,
            positions=mode,
            skipped=skipped,
            layout=layout,
            storage_options=storage_options,
        )
        claimed = f"--layout {layout}"
        # Which layout a better-fitting neighbour means.
        hints = (
            {+1: f"--layout {LAYOUT_NEXT_TOKEN}"}
            if layout == LAYOUT_TOKEN
            else {-1: f"--layout {LAYOUT_TOKEN}"}
        )
    stream = checked_alignment(stream, source=src, claimed=claimed, positions=mode, hints=hints)
    first, stream = _peek(stream)
    if first is None:
        raise ValueError(f"{src}: no example with a supervised token; nothing to import")
    return Source(
        format=fmt,
        k=int(first[1]["topk_ids"].shape[1]),
        vocab_size=vocab_size,
        positions=mode,
        records=stream,
    )


def _open_cache_source(src: str, *, positions: str | None, storage_options: dict | None) -> Source:
    from . import open_cache

    cache = open_cache(src, storage_options=storage_options)
    m = cache.manifest
    if positions is not None and positions != m.positions:
        cache.close()
        raise ValueError(
            f"--positions {positions}: {src} stores positions {m.positions!r}; a conversion "
            "keeps the positions mode of a cache"
        )

    def stream():
        for i, record in enumerate(cache.iter_records()):
            yield f"{src} record {i}", _record_kwargs(record)

    return Source(
        format=FORMAT_CACHE,
        k=m.k,
        vocab_size=m.vocab_size,
        positions=m.positions,
        records=stream(),
        teacher=m.teacher,
        tokenizer=m.tokenizer,
        # Rows of a lossy source stay lossy whatever the destination: say so in its metadata.
        metadata={**(m.metadata or {}), **({"lossy_source": m.lossy} if m.lossy else {})},
        total=m.records,
        close=cache.close,
    )


def _open_parquet_source(
    src: str, *, vocab_size: int | None, positions: str | None, storage_options: dict | None
) -> Source:
    from .interop import parquet_file
    from .interop.parquet import iter_parquet_records, read_export_header

    files = source_files(src, storage_options)
    header = read_export_header(files[0], storage_options) or {}
    file_positions = header.get("positions")
    if positions is not None and file_positions is not None and positions != file_positions:
        raise ValueError(
            f"--positions {positions}: {files[0]} was exported with positions {file_positions!r}"
        )
    total = sum(parquet_file(f, storage_options).metadata.num_rows for f in files)
    stream = iter_parquet_records(src, k=header.get("k"), storage_options=storage_options)
    k = header.get("k")
    if k is None:
        first, stream = _peek(stream)
        if first is None:
            raise ValueError(f"{src}: no records and no logitcache header; cannot tell K")
        k = int(first[1]["topk_ids"].shape[1])
    return Source(
        format=FORMAT_PARQUET,
        k=int(k),
        vocab_size=vocab_size if vocab_size is not None else header.get("vocab_size"),
        positions=positions or file_positions or POSITIONS_SUPERVISED,
        records=stream,
        teacher=header.get("teacher"),
        tokenizer=header.get("tokenizer"),
        metadata=dict(header.get("metadata") or {}),
        total=total,
    )


def convert(
    src: str,
    dst: str,
    *,
    src_format: str | None = None,
    dst_format: str | None = None,
    k: int | None = None,
    vocab_size: int | None = None,
    tokenizer: str | None = None,
    teacher: str | None = None,
    positions: str | None = None,
    codecs: dict | None = None,
    chunk_bytes: int | None = None,
    shard_bytes: int | None = None,
    logprob_dtype: str = "float32",
    storage_options: dict | None = None,
    dst_storage_options: dict | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    layout: str | None = None,
    lossy_kl: float | None = None,
    lossy_truncate: bool = True,
) -> ConvertResult:
    """Convert `src` into `dst` (a cache URL or a .parquet file); see the module docstring.

    `k` keeps each row's top k values. `vocab_size` or `tokenizer` (a local tokenizer
    directory) is required for NeMo-Aligner and axolotl sources, which do not record it.
    `lossy_kl` writes a lossy cache with that per-row KL budget in nats (logitcache.lossy);
    `lossy_truncate=False` keeps every entry of each row (quantisation only).
    """
    from tqdm import tqdm

    dst_format = dst_format or guess_dest_format(dst)
    if dst_format not in DEST_FORMATS:
        raise ValueError(f"--to {dst_format!r}: choose one of {DEST_FORMATS}")
    if k is not None and k < 1:
        raise ValueError(f"--k {k}: must be at least 1")
    if lossy_kl is not None and dst_format != FORMAT_CACHE:
        raise ValueError("--lossy-kl writes a lossy cache; it does not apply to a Parquet export")
    tokenizer_id = None
    if tokenizer is not None:
        tokenizer_id, tokenizer_vocab = tokenizer_identity(tokenizer)
        if vocab_size is None:
            vocab_size = tokenizer_vocab
    skipped: list[str] = []
    source = open_source(
        src,
        src_format=src_format,
        vocab_size=vocab_size,
        positions=positions,
        k=k,
        storage_options=storage_options,
        skipped=skipped,
        layout=layout,
    )
    try:
        if source.vocab_size is None:
            raise ValueError(
                f"{src}: {source.format} data does not record the vocabulary size; pass "
                "--vocab-size N (the teacher's config.json vocab_size) or --tokenizer DIR"
            )
        if k is not None and k > source.k:
            raise ValueError(f"--k {k}: the source has only K = {source.k}; choose k <= {source.k}")
        out_k = k or source.k
        metadata = dict(source.metadata)
        metadata["converted_from"] = {"format": source.format, "url": src}
        if out_k != source.k:
            metadata["converted_from"]["k"] = source.k
        records = _truncated(source.records, out_k, canonical=source.format == FORMAT_CACHE)
        bar = tqdm(
            records,
            total=source.total,
            desc=f"convert {source.format} -> {dst_format}",
            unit="rec",
            disable=None if progress is None else not progress,
        )
        identity = {
            "k": out_k,
            "vocab_size": int(source.vocab_size),
            "positions": source.positions,
            "teacher": {"name": teacher} if teacher else source.teacher,
            "tokenizer": tokenizer_id or source.tokenizer,
            "metadata": metadata,
        }
        if dst_format == FORMAT_PARQUET:
            count, dst = _write_parquet(
                bar, dst, identity, logprob_dtype, dst_storage_options or storage_options, overwrite
            )
        else:
            count = _write_cache(
                bar,
                dst,
                identity,
                codecs=codecs,
                chunk_bytes=chunk_bytes,
                shard_bytes=shard_bytes,
                storage_options=dst_storage_options or storage_options,
                overwrite=overwrite,
                lossy_kl=lossy_kl,
                lossy_truncate=lossy_truncate,
            )
    finally:
        if source.close is not None:
            source.close()
    return ConvertResult(
        src_format=source.format,
        dst_format=dst_format,
        dst=dst,
        records=count,
        k=out_k,
        vocab_size=int(source.vocab_size),
        skipped=skipped,
    )


def _truncated(
    records: Iterator[tuple[str, dict]], k: int, *, canonical: bool
) -> Iterator[tuple[str, dict]]:
    for where, kwargs in records:
        if kwargs["topk_ids"].shape[1] > k:
            if canonical:  # rows of a cache are sorted: the first k columns are the top k
                ids, lps = kwargs["topk_ids"][:, :k], kwargs["topk_logprobs"][:, :k]
            else:
                ids, lps = truncate_topk(kwargs["topk_ids"], kwargs["topk_logprobs"], k)
            kwargs = {
                **kwargs,
                "topk_ids": np.ascontiguousarray(ids),
                "topk_logprobs": np.ascontiguousarray(lps),
            }
        yield where, kwargs


def _write_cache(
    records,
    dst: str,
    identity: dict,
    *,
    codecs,
    chunk_bytes,
    shard_bytes,
    storage_options,
    overwrite,
    lossy_kl=None,
    lossy_truncate=True,
) -> int:
    from . import CacheWriter

    sizes = {}
    if chunk_bytes is not None:
        sizes["chunk_bytes"] = chunk_bytes
    if shard_bytes is not None:
        sizes["shard_bytes"] = shard_bytes
    count = 0
    with CacheWriter(
        dst,
        k=identity["k"],
        vocab_size=identity["vocab_size"],
        positions=identity["positions"],
        storage_options=storage_options,
        teacher=identity["teacher"],
        tokenizer=identity["tokenizer"],
        metadata=identity["metadata"],
        codecs=codecs,
        overwrite=overwrite,
        lossy_kl=lossy_kl,
        lossy_truncate=lossy_truncate,
        **sizes,
    ) as writer:
        for where, kwargs in records:
            try:
                writer.add(**kwargs)
            except ValueError as e:
                # The writer counts records itself ("record 3: ..."); the source's location
                # is the one a user can look up.
                raise ValueError(f"{where}: {_RECORD_PREFIX.sub('', str(e))}") from None
            count += 1
    return count


def _write_parquet(
    records, dst: str, identity: dict, logprob_dtype: str, storage_options, overwrite: bool
) -> tuple[int, str]:
    """Export to the Parquet file `dst` (or a file inside the directory `dst`); returns the
    record count and the file written."""
    import fsspec

    from .interop.parquet import export_header, write_parquet

    fs, _, (path,) = fsspec.get_fs_token_paths(dst, storage_options=storage_options or {})
    if dst.endswith("/") or fs.isdir(path):
        # A directory destination gets one file inside it, which an import of the directory
        # reads back; the directory itself is never replaced.
        path = f"{path.rstrip('/')}/{PARQUET_PART_NAME}"
        dst = f"{dst.rstrip('/')}/{PARQUET_PART_NAME}"
    if fs.exists(path):
        if not overwrite:
            raise ValueError(f"{dst}: already exists; pass --overwrite to replace it")
        if fs.info(path).get("type") != "file" or (
            _is_local_fs(fs) and not stat.S_ISREG(os.lstat(path).st_mode)
        ):
            raise ValueError(
                f"{dst}: exists and is not a regular file; logitcache writes only regular "
                "files: choose another destination"
            )
    header = export_header(
        k=identity["k"],
        vocab_size=identity["vocab_size"],
        positions=identity["positions"],
        teacher=identity["teacher"],
        tokenizer=identity["tokenizer"],
        metadata=identity["metadata"],
    )
    k = identity["k"]
    vocab = identity["vocab_size"]

    def checked():
        for where, kwargs in records:
            ids = kwargs["topk_ids"]
            if ids.ndim != 2 or ids.shape[1] != k:
                raise ValueError(f"{where}: topk_ids has shape {ids.shape}, expected [N, {k}]")
            if ids.size and (ids.min() < 0 or ids.max() >= vocab):
                raise ValueError(
                    f"{where}: topk_ids holds id {int(ids.max())} outside the vocabulary "
                    f"0..{vocab - 1}; pass the right --vocab-size"
                )
            yield Record(**kwargs)

    count = write_parquet(
        checked(), dst, header=header, logprob_dtype=logprob_dtype, storage_options=storage_options
    )
    return count, dst


def _is_local_fs(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
