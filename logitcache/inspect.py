"""Look inside a cache: a summary of its identity and size, statistics of the teacher's
distributions, one record token by token, and PNG histograms.

Statistics stream over whole chunks spread evenly through the cache, so a huge cache is
summarised by reading only a bounded sample of it; the report says when it is a sample.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

# Bytes of one uncompressed value per column: input_ids int32 + loss_mask bool per token,
# topk_ids int32 + topk_logprobs float16 per (target, k).
RAW_BYTES_PER_TOKEN = 4 + 1
RAW_BYTES_PER_ENTRY = 4 + 2
QUANTILES = (0.0, 0.01, 0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95, 0.99, 1.0)
DEFAULT_SAMPLE_RECORDS = 2000
STAT_NAMES = ("top1_prob", "entropy_topk_nats", "tail_mass")


def row_statistics(topk_logprobs: np.ndarray) -> dict[str, np.ndarray]:
    """Per-row teacher statistics of a [N, K] array of log-probabilities.

    top1_prob: the largest probability in the row. entropy_topk_nats: entropy of the row
    renormalised over its K entries. tail_mass: 1 - sum(p), the teacher's probability outside
    the stored K ids (fp16 rounding can make it slightly negative; it is reported as is).
    """
    lp = np.asarray(topk_logprobs, dtype=np.float32)
    if lp.ndim != 2:
        raise ValueError(f"topk_logprobs must be [N, K], got shape {lp.shape}")
    if lp.shape[0] == 0 or lp.shape[1] == 0:
        empty = np.zeros(0, np.float32)
        return {name: empty for name in STAT_NAMES}
    p = np.exp(lp)
    mass = p.sum(axis=1)
    q = p / mass[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(q > 0, q * np.log(q), 0.0)
    return {
        "top1_prob": p.max(axis=1),
        "entropy_topk_nats": np.maximum(-plogp.sum(axis=1), 0.0).astype(np.float32),
        "tail_mass": (1.0 - mass).astype(np.float32),
    }


def quantile_summary(values: np.ndarray) -> dict[str, float | int | None]:
    """count, mean and the QUANTILES of `values` (min p01 ... p99 max), as plain floats."""
    values = np.asarray(values, dtype=np.float64)
    out: dict[str, float | int | None] = {"count": int(values.size)}
    if values.size == 0:
        out["mean"] = None
        for q in QUANTILES:
            out[_quantile_name(q)] = None
        return out
    out["mean"] = float(values.mean())
    for q, v in zip(QUANTILES, np.quantile(values, QUANTILES), strict=True):
        out[_quantile_name(q)] = float(v)
    return out


def _quantile_name(q: float) -> str:
    if q == 0.0:
        return "min"
    if q == 1.0:
        return "max"
    return f"p{round(q * 100):02d}"


@dataclass
class TeacherSample:
    """Per-target statistics over the records read, and how they were chosen."""

    records: int
    targets: int
    total_records: int
    values: dict[str, np.ndarray]

    @property
    def is_sample(self) -> bool:
        return self.records < self.total_records


def sample_chunks(
    chunk_records: list[tuple[int, int, int]], max_records: int
) -> list[tuple[int, int]]:
    """Pick whole chunks spread evenly through the cache holding about `max_records` records.

    `chunk_records` lists (shard index, chunk index, records) in cache order. All chunks are
    chosen when they hold at most `max_records` records in total.
    """
    total = sum(n for _, _, n in chunk_records)
    if total <= max_records or not chunk_records:
        return [(s, c) for s, c, _ in chunk_records]
    per_chunk = total / len(chunk_records)
    wanted = max(1, min(len(chunk_records), math.ceil(max_records / per_chunk)))
    picks = np.unique(np.linspace(0, len(chunk_records) - 1, wanted).round().astype(np.int64))
    return [(chunk_records[i][0], chunk_records[i][1]) for i in picks]


def collect_teacher_sample(
    cache, *, sample_records: int = DEFAULT_SAMPLE_RECORDS, progress: bool | None = None
) -> TeacherSample:
    """Read at most about `sample_records` records (whole chunks, spread evenly) and compute
    the per-target statistics of their teacher rows."""
    from tqdm import tqdm

    manifest = cache.manifest
    chunks = [
        (s, c, n)
        for s, shard in enumerate(manifest.shards)
        for c, n in enumerate(shard.chunk_records)
    ]
    picks = sample_chunks(chunks, max(1, sample_records))
    parts: dict[str, list[np.ndarray]] = {name: [] for name in STAT_NAMES}
    records = 0
    targets = 0
    bar = tqdm(picks, desc="teacher statistics", unit="chunk", disable=_progress_off(progress))
    for shard_index, chunk_index in bar:
        for record in cache.read_chunk(shard_index, chunk_index):
            if records >= sample_records:
                break
            stats = row_statistics(record.topk_logprobs)
            for name in STAT_NAMES:
                parts[name].append(stats[name])
            records += 1
            targets += record.topk_logprobs.shape[0]
    values = {
        name: np.concatenate(parts[name]) if parts[name] else np.zeros(0, np.float32)
        for name in STAT_NAMES
    }
    return TeacherSample(
        records=records, targets=targets, total_records=manifest.records, values=values
    )


def _progress_off(progress: bool | None) -> bool | None:
    # tqdm: disable=None turns the bar off when stderr is not a terminal.
    return None if progress is None else not progress


def cache_summary(cache) -> dict[str, Any]:
    """Identity, totals, size and per-shard table of a cache, as JSON-able values."""
    m = cache.manifest
    raw = m.tokens * RAW_BYTES_PER_TOKEN + m.targets * m.k * RAW_BYTES_PER_ENTRY
    shards = [
        {
            "path": s.path,
            "records": s.records,
            "tokens": s.tokens,
            "targets": s.targets,
            "bytes": s.bytes,
            "chunks": len(s.chunk_records),
            "bytes_per_target": s.bytes / s.targets if s.targets else None,
        }
        for s in m.shards
    ]
    return {
        "url": getattr(cache, "url", None),
        "format_version": m.format_version,
        "k": m.k,
        "vocab_size": m.vocab_size,
        "positions": m.positions,
        "lossy": m.lossy,
        "teacher": m.teacher,
        "tokenizer": m.tokenizer,
        "metadata": m.metadata,
        "columns": m.columns,
        "records": m.records,
        "tokens": m.tokens,
        "targets": m.targets,
        "bytes": m.bytes,
        "bytes_per_target": m.bytes / m.targets if m.targets else None,
        "raw_bytes": raw,
        "compression_ratio": raw / m.bytes if m.bytes else None,
        "shards": shards,
    }


def inspect_report(
    cache, *, sample_records: int = DEFAULT_SAMPLE_RECORDS, progress: bool | None = None
) -> tuple[dict[str, Any], TeacherSample]:
    """The full `inspect` report (summary + teacher statistics) and the sample behind it."""
    report = cache_summary(cache)
    sample = collect_teacher_sample(cache, sample_records=sample_records, progress=progress)
    report["teacher_stats"] = {
        "records": sample.records,
        "targets": sample.targets,
        "is_sample": sample.is_sample,
        **{name: quantile_summary(sample.values[name]) for name in STAT_NAMES},
    }
    return report, sample


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def _identity(obj: dict | None) -> str:
    if not obj:
        return "(not recorded)"
    return ", ".join(f"{k}={v}" for k, v in obj.items())


def _lossy_mode(lossy: dict | None) -> str:
    """'lossless', or the lossy budget and what the writer measured (spec section 12)."""
    if not lossy:
        return "lossless"
    text = f"lossy: KL budget {lossy.get('kl_budget')} nats per row"
    if lossy.get("grid_step") is not None:
        text += f", grid {lossy['grid_step']:.4g} nats"
    measured = lossy.get("measured") or {}
    if measured.get("rows"):
        text += (
            f"; measured mean row KL {measured.get('mean_row_kl', 0):.3g}, max "
            f"{measured.get('max_row_kl', 0):.3g}, {measured.get('mean_entries', 0):.1f} "
            f"entries per row kept"
        )
    return text


def format_report(report: dict[str, Any], *, max_shards: int = 20) -> str:
    """The human-readable text of an `inspect` report."""
    r = report
    bpt = r["bytes_per_target"]
    ratio = r["compression_ratio"]
    lines = [
        f"cache            {r['url']}",
        f"format version   {r['format_version']}",
        f"K                {r['k']}",
        f"vocab size       {r['vocab_size']}",
        f"positions        {r['positions']}",
        f"mode             {_lossy_mode(r.get('lossy'))}",
        f"teacher          {_identity(r['teacher'])}",
        f"tokenizer        {_identity(r['tokenizer'])}",
        f"records          {r['records']:,}",
        f"tokens           {r['tokens']:,}",
        f"target tokens    {r['targets']:,}",
        f"bytes            {r['bytes']:,} ({_fmt_bytes(r['bytes'])})",
        f"bytes / target   {bpt:.1f}" if bpt is not None else "bytes / target   -",
        (
            f"compression      {ratio:.2f}x against raw int32 ids + fp16 logprobs "
            f"({_fmt_bytes(r['raw_bytes'])})"
            if ratio is not None
            else "compression      -"
        ),
        "",
        f"shards ({len(r['shards'])})",
        f"  {'path':<28} {'records':>9} {'tokens':>11} {'targets':>11} {'bytes':>12} "
        f"{'B/target':>9}",
    ]
    for s in r["shards"][:max_shards]:
        per = f"{s['bytes_per_target']:.1f}" if s["bytes_per_target"] is not None else "-"
        lines.append(
            f"  {s['path']:<28} {s['records']:>9,} {s['tokens']:>11,} {s['targets']:>11,} "
            f"{s['bytes']:>12,} {per:>9}"
        )
    if len(r["shards"]) > max_shards:
        lines.append(f"  ... {len(r['shards']) - max_shards} more (use --json for all)")
    stats = r.get("teacher_stats")
    if stats:
        scope = (
            f"a sample of {stats['records']:,} of {r['records']:,} records (whole chunks spread "
            "evenly; raise --sample-records for more)"
            if stats["is_sample"]
            else f"all {stats['records']:,} records"
        )
        lines += ["", f"teacher distributions over {stats['targets']:,} target tokens, {scope}"]
        names = [n for n in ("min", "p01", "p10", "p50", "p90", "p99", "max", "mean")]
        lines.append(f"  {'':<22}" + "".join(f"{n:>9}" for n in names))
        labels = {
            "top1_prob": "top-1 probability",
            "entropy_topk_nats": "entropy in top-K (nats)",
            "tail_mass": "tail mass 1-sum(p)",
        }
        for key, label in labels.items():
            q = stats[key]
            cells = "".join(f"{q[n]:>9.4f}" if q[n] is not None else f"{'-':>9}" for n in names)
            lines.append(f"  {label:<22}{cells}")
        tail_min = stats["tail_mass"]["min"]
        if tail_min is not None and tail_min < 0:
            lines.append(
                f"  (a negative tail mass, down to {tail_min:.4f}, is fp16 rounding: each stored "
                "logprob is within half an fp16 step of the teacher's, so a row's probabilities "
                "can add up to slightly more than 1; the writer allows up to 1.05)"
            )
    return "\n".join(lines)


def load_tokenizer(path: str):
    """A Hugging Face tokenizer from a local directory (never downloads)."""
    if not os.path.isdir(path):
        raise ValueError(f"--tokenizer {path}: not a directory; give a local tokenizer directory")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ValueError(
            "--tokenizer needs the 'transformers' package: pip install 'logitcache[kd]'"
        ) from None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/... for unreadable dirs
        raise ValueError(f"--tokenizer {path}: cannot load a tokenizer from it ({e})") from None


def record_view(cache, index: int, *, top: int = 5, tokenizer=None) -> dict[str, Any]:
    """One record as JSON-able values: each target token with the teacher's top candidates."""
    n = len(cache)
    if not -n <= index < n:
        raise ValueError(f"--record {index}: the cache has {n} records (valid: 0..{n - 1})")
    index %= n
    record = cache[index]
    positions = record.target_positions(cache.manifest.positions)
    decode = (lambda i: tokenizer.decode([int(i)])) if tokenizer is not None else None
    stats = row_statistics(record.topk_logprobs)
    rows = []
    for j, p in enumerate(positions.tolist()):
        ids = record.topk_ids[j]
        lps = record.topk_logprobs[j].astype(np.float32)
        token = int(record.input_ids[p])
        hit = np.flatnonzero(ids == token)
        row = {
            "position": p,
            "token_id": token,
            "is_target": bool(record.loss_mask[p]),
            "rank": int(hit[0]) + 1 if hit.size else None,
            "tail_mass": float(stats["tail_mass"][j]),
            "candidates": [
                {"id": int(i), "prob": float(np.exp(lp)), "logprob": float(lp)}
                for i, lp in zip(ids[:top].tolist(), lps[:top].tolist(), strict=True)
            ],
        }
        if decode is not None:
            row["token"] = decode(token)
            for c in row["candidates"]:
                c["token"] = decode(c["id"])
        rows.append(row)
    view = {
        "index": index,
        "sample_id": record.sample_id,
        "tokens": record.num_tokens,
        "targets": record.num_targets,
        "rows": rows,
    }
    if decode is not None:
        view["text"] = tokenizer.decode(record.input_ids.tolist())
    return view


def format_record_view(view: dict[str, Any]) -> str:
    """The human-readable text of one record: a line per target token."""
    lines = [
        f"record {view['index']}  sample_id={view['sample_id']!r}  tokens={view['tokens']}  "
        f"targets={view['targets']}"
    ]
    if "text" in view:
        lines.append(f"text: {view['text']!r}")
    lines.append("  pos  token                     rank  teacher's top candidates (probability)")
    for row in view["rows"]:
        shown = repr(row["token"]) if "token" in row else str(row["token_id"])
        rank = str(row["rank"]) if row["rank"] is not None else "-"
        cands = "  ".join(
            f"{c['token']!r} {c['prob']:.3f}" if "token" in c else f"{c['id']} {c['prob']:.3f}"
            for c in row["candidates"]
        )
        mark = "" if row["is_target"] else " (not a target)"
        lines.append(
            f"  {row['position']:>4} {shown[:24]:<24} {rank:>5}  {cands}  "
            f"tail {row['tail_mass']:.4f}{mark}"
        )
    return "\n".join(lines)


def write_plots(sample: TeacherSample, out_dir: str) -> list[str]:
    """Write PNG histograms of tail mass, top-1 probability and entropy; returns the paths."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'logitcache[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    scope = f"{sample.targets:,} targets of {sample.records:,} records" + (
        " (sample)" if sample.is_sample else ""
    )
    specs = [
        ("tail_mass", "tail mass 1 - sum(p) over the top-K", "tail_mass.png"),
        ("top1_prob", "top-1 probability", "top1_prob.png"),
        ("entropy_topk_nats", "entropy of the renormalised top-K (nats)", "entropy.png"),
    ]
    paths = []
    for key, label, name in specs:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        values = sample.values[key]
        ax.hist(values, bins=50, color="#3a6ea5")
        ax.set_xlabel(label)
        ax.set_ylabel("target tokens")
        ax.set_title(scope, fontsize=9)
        if key == "tail_mass" and values.size and values.max() > 0:
            ax.set_yscale("log")
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
