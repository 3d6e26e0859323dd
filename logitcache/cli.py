"""The `logitcache` command line: inspect, verify, convert, merge and ensemble caches, and
compile the read path's decoders for this machine.

This module only parses arguments and calls library functions. Exit status: 0 ok, 1 a problem
was found (or an error stopped the command), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from .format import POSITIONS_MODES, CacheError

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_MAX_SIZE = 1 << 40


def byte_size(text: str) -> int:
    """A byte count such as 2097152, 2M, 256MiB or 1G."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in _SIZE_UNITS and t[-1:] else ""
    number = t[: len(t) - len(unit)] if unit else t
    try:
        value = int(float(number) * _SIZE_UNITS[unit])
    except (ValueError, OverflowError):  # not a number, or inf / nan
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (e.g. 2097152, 2M, 256MiB)"
        ) from None
    if value > _MAX_SIZE:
        raise argparse.ArgumentTypeError(f"{text!r}: more than the 1 TiB this option allows")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
    return value


def add_layout_options(p) -> None:
    """The sizes a writing command lays its output out in."""
    p.add_argument(
        "--chunk-bytes",
        type=byte_size,
        metavar="SIZE",
        help="target raw bytes per chunk (default 256K; smaller: faster random reads, "
        "larger: faster scans, measured by benchmarks/bench_chunking.py)",
    )
    p.add_argument(
        "--shard-bytes",
        type=byte_size,
        metavar="SIZE",
        help="target bytes per shard (default 256M)",
    )


def json_object(text: str) -> dict:
    """A JSON object given inline or as @path/to/file.json."""
    source = text
    if text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as f:
                source = f.read()
        except OSError as e:
            raise argparse.ArgumentTypeError(f"cannot read {text[1:]}: {e.strerror}") from None
    try:
        value = json.loads(source)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {text[:80]!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(value).__name__}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def _weights(text: str) -> list[float]:
    """Comma-separated positive numbers, e.g. 0.7,0.3."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of numbers like 0.7,0.3"
        ) from None
    if any(not 0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every weight must be a finite number > 0")
    return values


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive number")
    return value


def _add_store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-options",
        type=json_object,
        metavar="JSON",
        help="fsspec storage options for remote URLs, inline JSON or @file.json "
        '(e.g. \'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\')',
    )


def _add_cache_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir", metavar="DIR", help="local directory for shards fetched from remote URLs"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logitcache",
        description="Inspect, verify, convert and merge logitcache caches "
        "(a teacher's top-K next-token distributions for offline distillation).",
        epilog="Exit status: 0 ok, 1 problem found, 2 usage error. "
        "Run 'logitcache COMMAND --help' for the options of a command.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"logitcache {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "inspect",
        help="summarise a cache and the teacher's distributions",
        description="Print a summary of a cache (format version, K, vocabulary size, positions "
        "mode, teacher and tokenizer, records, tokens, target tokens, bytes, bytes per target, "
        "compression against raw int32 ids + fp16 logprobs, shards) and quantiles of the "
        "teacher's distributions (top-1 probability, entropy within the top-K, tail mass "
        "1 - sum(p)) over a sample of records. With --record, show one record instead.",
    )
    p.add_argument("url", help="cache directory or URL (s3://..., memory://...)")
    p.add_argument("--record", type=int, metavar="I", help="show record I token by token")
    p.add_argument(
        "--top",
        type=_positive_int,
        default=5,
        metavar="N",
        help="candidates shown per token with --record (default 5)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="local tokenizer directory to decode tokens as text; refused when its vocabulary "
        "fingerprint differs from the one the cache records",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="decode with --tokenizer even when its fingerprint differs from the cache's "
        "(the text shown is then not what the teacher saw)",
    )
    p.add_argument("--json", action="store_true", help="print JSON for machines instead of text")
    p.add_argument(
        "--plot",
        metavar="DIR",
        help="write PNG histograms (tail mass, top-1 probability, entropy) to DIR",
    )
    p.add_argument(
        "--sample-records",
        type=_positive_int,
        default=2000,
        metavar="N",
        help="statistics read at most about N records, whole chunks spread evenly (default 2000)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_store_options(p)
    _add_cache_dir(p)

    p = sub.add_parser(
        "verify",
        help="check every checksum and structural invariant",
        description="Check the checksum of every shard file, footer and block and every "
        "structural invariant of a cache; print every problem found (not just the first). "
        "Exit status 1 when any is found.",
    )
    p.add_argument("url", help="cache directory or URL")
    p.add_argument("--json", action="store_true", help="print JSON: {url, ok, problems}")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_store_options(p)
    _add_cache_dir(p)

    p = sub.add_parser(
        "convert",
        help="re-encode, truncate K, copy, export to Parquet, import Parquet/NeMo/axolotl",
        description="Convert SRC into DST. SRC is a cache (local or URL), a logitcache Parquet "
        "export, NeMo-Aligner KD JSON lines (compute_topk_logits.py output) or an axolotl KD "
        "dataset (JSON lines or Parquet); the format is detected unless --from is given. DST "
        "is a cache, or a Parquet file when it ends in .parquet (or with --to parquet). "
        "docs/interop.md documents how each source's positions map onto the cache's.",
    )
    p.add_argument("src", help="source: cache URL, .parquet, .jsonl, or a directory of them")
    p.add_argument("dst", help="destination: cache URL or .parquet file")
    p.add_argument(
        "--from",
        dest="src_format",
        choices=["cache", "parquet", "nemo", "axolotl"],
        help="source format (default: detected)",
    )
    p.add_argument(
        "--to",
        dest="dst_format",
        choices=["cache", "parquet"],
        help="destination format (default: parquet for *.parquet, else cache)",
    )
    p.add_argument(
        "--k",
        type=_positive_int,
        metavar="K",
        help="keep each row's top K values (K <= the source's K)",
    )
    p.add_argument(
        "--vocab-size",
        type=_positive_int,
        metavar="N",
        help="teacher vocabulary size (needed for NeMo/axolotl sources unless --tokenizer)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="local tokenizer directory: gives the vocabulary size; its identity is recorded",
    )
    p.add_argument("--teacher", metavar="NAME", help="teacher name to record in the manifest")
    p.add_argument(
        "--positions",
        choices=POSITIONS_MODES,
        help="positions mode of an import (default supervised)",
    )
    p.add_argument(
        "--layout",
        choices=["token", "next-token"],
        help="axolotl row layout: 'token' (default): row p is the distribution of token p, "
        "rows right-aligned (axolotl's dataset transform); 'next-token': row t is the "
        "distribution of token t+1 (axolotl's online-teacher collator). Every NeMo and axolotl "
        "import checks the alignment from the data and refuses one that fits a neighbour "
        "clearly better",
    )
    p.add_argument(
        "--codecs",
        type=json_object,
        metavar="JSON",
        help="codec pipelines per column as JSON or @file.json, e.g. "
        '\'{"topk_logprobs": [{"id": "zstd", "level": 9}]}\'',
    )
    add_layout_options(p)
    p.add_argument(
        "--logprob-dtype",
        choices=["float32", "float16"],
        default="float32",
        help="Parquet export: logprob column type (float32 is read everywhere and holds fp16 "
        "values exactly)",
    )
    p.add_argument(
        "--dst-storage-options",
        type=json_object,
        metavar="JSON",
        help="storage options for DST when they differ from --storage-options",
    )
    p.add_argument(
        "--lossy-kl",
        type=_positive_float,
        metavar="NATS",
        help="write a lossy cache: every row within NATS of the lossless row (KL per row, "
        "e.g. 0.01): logprobs on a grid, light tails cut; the manifest records the budget",
    )
    p.add_argument(
        "--lossy-no-truncation",
        action="store_true",
        help="with --lossy-kl: keep every entry of each row, spend the budget on the grid only",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_store_options(p)

    p = sub.add_parser(
        "merge",
        help="join the partial manifests of distributed writers into one manifest",
        description="Join the partial manifests (_partial/rank-*.json) that writers with a rank "
        "left in URL into URL/manifest.json, which commits the cache. Refused unless every rank "
        "0..N-1 of the recorded world size is there exactly once with every shard it lists.",
    )
    p.add_argument("url", help="cache directory or URL")
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="commit the ranks that are there even when some are missing (their records are "
        "then absent from the cache)",
    )
    p.add_argument(
        "--world-size",
        type=_positive_int,
        metavar="N",
        help="number of ranks, for partials written without one (format 1.0 writers)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="also check every shard's whole-file checksum (reads every shard)",
    )
    p.add_argument("--json", action="store_true", help="print the merged manifest's totals as JSON")
    _add_store_options(p)

    p = sub.add_parser(
        "ensemble",
        help="combine caches of several teachers over the same records into one mixture cache",
        description="Write DST, a cache whose rows are the top-K of the weighted mixture "
        "sum_j w_j p_j of the teachers' distributions cached at SRC1, SRC2, ... (probabilities "
        "mixed, not logprobs averaged). The sources must hold the same records in the same "
        "order (checked record by record) and the same tokenizer. Each teacher's mass outside "
        "its top-K is unknown: with --tail lower (default) it counts as 0, so every stored "
        "logprob is a lower bound of the mixture's, exact where every teacher listed the id; "
        "with --tail uniform it is spread evenly over the ids the teacher did not list.",
    )
    p.add_argument("paths", nargs="+", metavar="SRC ... DST", help="source caches, then DST")
    p.add_argument(
        "--weights",
        type=_weights,
        metavar="W1,W2,...",
        help="one weight per source, normalised to sum to 1 (default: equal)",
    )
    p.add_argument(
        "--k", type=_positive_int, metavar="K", help="ids per row (default: the largest K)"
    )
    p.add_argument(
        "--tail",
        choices=["lower", "uniform"],
        default="lower",
        help="how the mass outside each teacher's top-K counts (default lower: a bound)",
    )
    p.add_argument("--teacher", metavar="NAME", help="teacher name to record in the manifest")
    p.add_argument(
        "--skip-tokenizer-check",
        action="store_true",
        help="combine caches that record no tokenizer fingerprint (ids are assumed to agree)",
    )
    p.add_argument(
        "--codecs", type=json_object, metavar="JSON", help="codec pipelines per column (JSON)"
    )
    add_layout_options(p)
    p.add_argument(
        "--dst-storage-options",
        type=json_object,
        metavar="JSON",
        help="storage options for DST when they differ from --storage-options",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST atomically")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_store_options(p)

    p = sub.add_parser(
        "kernels",
        help="compile the read path's decoders for this machine (faster reads, no numba load)",
        description="build: compile the decoders ahead of time for this CPU and Python (a few "
        "seconds, needs a C compiler) into DIR, where every later process loads them in well "
        "under a millisecond and decodes at numba's speed from its first byte. status: say "
        "whether they are built for this machine and in use (exit status 1 when not). "
        "LOGITCACHE_COMPILED_KERNELS=0 turns them off for a process.",
    )
    p.add_argument("action", choices=["build", "status"])
    p.add_argument(
        "--dir",
        metavar="DIR",
        help="where compiled modules are kept (default $LOGITCACHE_KERNELS_DIR, else "
        "$XDG_CACHE_HOME/logitcache/kernels, else ~/.cache/logitcache/kernels)",
    )
    p.add_argument("--force", action="store_true", help="build again even when already built")
    p.add_argument("--json", action="store_true", help="print JSON: {path, built, enabled}")
    return parser


def _open(args):
    from . import open_cache

    return open_cache(
        args.url, storage_options=args.storage_options, cache_dir=getattr(args, "cache_dir", None)
    )


def cmd_inspect(args) -> int:
    from .inspect import (
        format_record_view,
        format_report,
        inspect_report,
        load_tokenizer,
        record_view,
        write_plots,
    )

    progress = False if args.no_progress else None
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    with _open(args) as cache:
        if tokenizer is not None and not args.force:
            from .identity import check_tokenizer

            try:
                check_tokenizer(cache.manifest.tokenizer, tokenizer)
            except CacheError as e:
                raise CacheError(f"{e}; pass --force to decode with it anyway") from None
        if args.record is not None:
            view = record_view(cache, args.record, top=args.top, tokenizer=tokenizer)
            print(json.dumps(view, indent=1) if args.json else format_record_view(view))
            return EXIT_OK
        report, sample = inspect_report(
            cache, sample_records=args.sample_records, progress=progress
        )
        report["url"] = args.url
        if args.plot:
            report["plots"] = write_plots(sample, args.plot)
        print(json.dumps(report, indent=1) if args.json else format_report(report))
        if args.plot and not args.json:
            print("\nplots: " + ", ".join(report["plots"]))
    return EXIT_OK


def cmd_verify(args) -> int:
    with _open(args) as cache:
        # The bar goes to stderr, and only when it is a terminal.
        progress = not args.no_progress and sys.stderr.isatty()
        problems = cache.verify(raise_errors=False, progress=progress)
        n_records, n_shards = len(cache), len(cache.manifest.shards)
    if args.json:
        print(json.dumps({"url": args.url, "ok": not problems, "problems": problems}, indent=1))
    else:
        for problem in problems:
            print(f"PROBLEM: {problem}")
        if problems:
            print(
                f"{args.url}: {len(problems)} problem(s) found; the cache is damaged: re-copy the "
                "damaged shards or re-run the job that wrote them"
            )
        else:
            print(f"{args.url}: ok ({n_records:,} records in {n_shards} shards, all checks passed)")
    return EXIT_PROBLEM if problems else EXIT_OK


def cmd_convert(args) -> int:
    from .convert import convert

    result = convert(
        args.src,
        args.dst,
        src_format=args.src_format,
        dst_format=args.dst_format,
        k=args.k,
        vocab_size=args.vocab_size,
        tokenizer=args.tokenizer,
        teacher=args.teacher,
        positions=args.positions,
        codecs=args.codecs,
        chunk_bytes=args.chunk_bytes,
        shard_bytes=args.shard_bytes,
        logprob_dtype=args.logprob_dtype,
        storage_options=args.storage_options,
        dst_storage_options=args.dst_storage_options,
        overwrite=args.overwrite,
        progress=False if args.no_progress else None,
        layout=args.layout,
        lossy_kl=args.lossy_kl,
        lossy_truncate=not args.lossy_no_truncation,
    )
    print(
        f"wrote {result.records:,} records ({result.src_format} -> {result.dst_format}, "
        f"K={result.k}, vocab={result.vocab_size}) to {result.dst}"
    )
    if result.skipped:
        print(
            f"skipped {len(result.skipped)} example(s) without a supervised token, "
            f"first: {result.skipped[0]}"
        )
    return EXIT_OK


def cmd_merge(args) -> int:
    from .manifest import merge_partials

    manifest = merge_partials(
        args.url,
        storage_options=args.storage_options,
        allow_incomplete=args.allow_incomplete,
        world_size=args.world_size,
        verify=args.verify,
    )
    totals = {
        "url": args.url,
        "shards": len(manifest.shards),
        "records": manifest.records,
        "tokens": manifest.tokens,
        "targets": manifest.targets,
        "bytes": manifest.bytes,
    }
    if args.json:
        print(json.dumps(totals, indent=1))
    else:
        print(
            f"merged {totals['shards']} shards ({totals['records']:,} records, "
            f"{totals['targets']:,} target tokens) into {args.url}/manifest.json"
        )
    return EXIT_OK


def cmd_ensemble(args) -> int:
    from dataclasses import asdict

    from .ensemble import ensemble_caches

    if len(args.paths) < 3:
        raise ValueError("give at least two source caches and the destination: SRC1 SRC2 DST")
    *sources, dst = args.paths
    result = ensemble_caches(
        sources,
        dst,
        weights=args.weights,
        k=args.k,
        tail=args.tail,
        teacher=args.teacher,
        check_tokenizers=not args.skip_tokenizer_check,
        codecs=args.codecs,
        chunk_bytes=args.chunk_bytes,
        shard_bytes=args.shard_bytes,
        storage_options=args.storage_options,
        dst_storage_options=args.dst_storage_options,
        overwrite=args.overwrite,
        progress=False if args.no_progress else None,
    )
    if args.json:
        print(json.dumps(asdict(result), indent=1))
        return EXIT_OK
    weights = ", ".join(f"{w:.3g}" for w in result.weights)
    print(
        f"wrote {result.records:,} records ({result.targets:,} target rows, K={result.k}) to "
        f"{dst}: the mixture of {len(sources)} teachers with weights {weights}"
    )
    if result.tail == "lower":
        print(
            f"stored probabilities are lower bounds: {result.exact_share:.1%} of entries exact "
            f"(listed by every teacher); largest possible understatement {result.max_gap:.3g}, "
            f"mean {result.mean_gap:.3g}"
        )
    return EXIT_OK


def cmd_kernels(args) -> int:
    import time
    from pathlib import Path

    from . import compiled

    directory = Path(args.dir) if args.dir else None
    path = compiled.module_path(directory)
    if args.action == "build":
        fresh = args.force or not path.exists()
        start = time.perf_counter()
        try:
            path = compiled.build(directory, force=args.force)
        except compiled.CompiledKernelsError as e:
            print(f"logitcache kernels: error: {e}", file=sys.stderr)
            return EXIT_PROBLEM
        if not args.json:
            took = f"built in {time.perf_counter() - start:.1f} s" if fresh else "already built"
            print(f"compiled decoders for this machine: {path} ({took})")
    built, enabled = path.exists(), compiled.enabled()
    if args.json:
        print(json.dumps({"path": str(path), "built": built, "enabled": enabled}))
    elif args.action == "status":
        state = "built" if built else "not built (run `logitcache kernels build`)"
        off = "" if enabled else f"; turned off by {compiled.ENV_SWITCH}"
        print(f"compiled decoders for this machine: {path}: {state}{off}")
    return EXIT_OK if built and enabled else EXIT_PROBLEM


COMMANDS = {
    "inspect": cmd_inspect,
    "verify": cmd_verify,
    "convert": cmd_convert,
    "merge": cmd_merge,
    "ensemble": cmd_ensemble,
    "kernels": cmd_kernels,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:
        # The reader of our output went away (`| head`): not an error of the cache.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (CacheError, ValueError, OSError) as e:
        # One clear line, no traceback: the message names the file and the fix.
        print(f"logitcache {args.command}: error: {e}", file=sys.stderr)
        return EXIT_PROBLEM
    except KeyboardInterrupt:
        print(f"logitcache {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
