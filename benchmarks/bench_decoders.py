"""The read path's decoder sets, numpy, numba and the compiled ones (logitcache.compiled), on
the same blocks, and what loading numba or the compiled module costs a fresh process: the
figures behind codecs.JIT_AFTER_BYTES and behind building the compiled decoders.

Blocks: the topk_ids and topk_logprobs columns of synthetic teacher rows (K=100,
V=128256, the benchmark rows of bench_loader) in default 256 KiB chunks, zstd already undone,
so each figure is the decoder stage alone. Per value: nanoseconds per id or per logprob,
medians of --repeats. Load: seconds from `import numpy` to the first numba decode in a fresh
process (import numba, import the kernels, load their machine code from numba's cache),
median of --repeats processes, less the same process decoding with numpy (the imports of
numpy and logitcache, which every reader pays). Break-even: the bytes a process must pass
through the decoders (8 per id-logprob pair, as codecs.read_kernels counts them) before
numpy's extra time equals the load. The compiled decoders are measured when `make kernels`
has built them for this machine (their load: finding the module for this CPU and source,
loading it, one decode).

Run: .venv/bin/python benchmarks/bench_decoders.py  (a few seconds; results/bench_decoders.json)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

from common import format_table, median_time, single_thread_env, write_results

single_thread_env()

import numpy as np  # noqa: E402

from logitcache import codecs  # noqa: E402
from logitcache.codecs import DECODED_BYTES_PER_PAIR, default_pipelines  # noqa: E402
from logitcache.synthetic import SyntheticTeacher  # noqa: E402

K, VOCAB = 100, 128256
LOAD = """
import time
t0 = time.perf_counter()
import numpy as np
from logitcache import codecs
jit = codecs.kernels()
out = np.empty(64, dtype=np.uint8)
jit.byte_unshuffle(np.zeros(64, dtype=np.uint8), 2, out)
print(time.perf_counter() - t0)
"""
LOAD_COMPILED = LOAD.replace("codecs.kernels()", "codecs.compiled_kernels()")
LOAD_NONE = LOAD.replace("jit = codecs.kernels()", "").replace(  # the imports, then numpy
    "jit.byte_unshuffle(np.zeros(64, dtype=np.uint8), 2, out)",
    "codecs._numpy_kernels.byte_unshuffle(np.zeros(64, dtype=np.uint8), 2)",
)


def stage_inputs(chunks: int, rows: int) -> tuple[list, list]:
    """Per chunk, the bytes each decoder stage receives: (ids planes, logprob planes)."""
    pipes = default_pipelines(K)
    teacher = SyntheticTeacher(VOCAB, K, seed=7)
    ids_in, lp_in = [], []
    for _ in range(chunks):
        ids, logprobs = teacher.rows(rows)
        frame = pipes["topk_ids"].encode(ids)
        ids_in.append(
            pipes["topk_ids"].codecs[-1].decode(np.frombuffer(frame, np.uint8), 1 << 40, False)
        )
        frame = pipes["topk_logprobs"].encode(logprobs)
        lp_in.append(
            pipes["topk_logprobs"].codecs[-1].decode(np.frombuffer(frame, np.uint8), 1 << 40, False)
        )
    return ids_in, lp_in


def decoders(read_kernels):
    """The ids and logprob decoding of the default pipelines with the given kernel choice."""
    ids_codec = default_pipelines(K)["topk_ids"].codecs[0]
    # fp16_key_delta + shuffle(2): the one step the pipeline decodes the two through.
    key_delta_planes = codecs.KeyDeltaPlanes(default_pipelines(K)["topk_logprobs"].codecs[0])

    def ids(blocks):
        codecs.read_kernels = read_kernels
        for b in blocks:
            ids_codec.decode(b, _ids_size(b), True)

    def logprobs(blocks):
        codecs.read_kernels = read_kernels
        for b in blocks:
            key_delta_planes.decode(b, b.size)

    return ids, logprobs


def _ids_size(encoded: np.ndarray) -> int:
    """Decoded size of a byte_bit_shuffle(4, 2) stage: 2n + 16 * ceil(n / 8) bytes in."""
    n = encoded.size // 4
    while 2 * n + 16 * ((n + 7) // 8) > encoded.size:
        n -= 1
    return 4 * n


def _fresh_process_seconds(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--rows", type=int, default=780, help="rows per chunk (256 KiB at K=100)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    original = codecs.read_kernels
    numba_kernels = codecs.kernels()
    ids_in, lp_in = stage_inputs(args.chunks, args.rows)
    values = args.chunks * args.rows * K
    results, rows = {}, []
    from logitcache import compiled

    compiled_kernels = compiled.load()
    choices = [("numpy", lambda n: None), ("numba", lambda n: numba_kernels)]
    if compiled_kernels is not None:
        choices.append(("compiled", lambda n: compiled_kernels))
    else:
        print("compiled decoders not built (make kernels): measuring numpy and numba only")
    for label, choice in choices:
        ids, logprobs = decoders(choice)
        ids(ids_in[:2])
        logprobs(lp_in[:2])  # compiled and warm
        t_ids, _ = median_time(lambda ids=ids: ids(ids_in), args.repeats)
        t_lp, _ = median_time(lambda logprobs=logprobs: logprobs(lp_in), args.repeats)
        results[label] = {
            "ids_ns_per_value": t_ids.cpu_s / values * 1e9,
            "logprobs_ns_per_value": t_lp.cpu_s / values * 1e9,
        }
        rows.append(
            [label, results[label]["ids_ns_per_value"], results[label]["logprobs_ns_per_value"]]
        )
    codecs.read_kernels = original
    loads, compiled_loads, imports = [], [], []
    for _ in range(args.repeats):
        imports.append(_fresh_process_seconds(LOAD_NONE))
        loads.append(_fresh_process_seconds(LOAD))
        if compiled_kernels is not None:
            compiled_loads.append(_fresh_process_seconds(LOAD_COMPILED))
    # What each kernel set adds to a process that imports numpy and logitcache anyway.
    base_s = statistics.median(imports)
    load_s = statistics.median(loads) - base_s
    per_pair = {m: r["ids_ns_per_value"] + r["logprobs_ns_per_value"] for m, r in results.items()}
    saved_per_byte = (per_pair["numpy"] - per_pair["numba"]) * 1e-9 / DECODED_BYTES_PER_PAIR
    break_even = load_s / saved_per_byte
    print(format_table(["decoders", "ids ns/value", "logprobs ns/value"], rows))
    print(
        f"numpy {per_pair['numpy']:.2f} ns per pair, numba {per_pair['numba']:.2f} "
        f"({per_pair['numpy'] / per_pair['numba']:.2f}x); loading numba {load_s:.3f} s; "
        f"break-even after {break_even / 2**30:.2f} GiB through the decoders "
        f"(JIT_AFTER_BYTES = {codecs.JIT_AFTER_BYTES / 2**30:.2f} GiB)"
    )
    if compiled_kernels is not None:
        print(
            f"compiled {per_pair['compiled']:.2f} ns per pair "
            f"({per_pair['numpy'] / per_pair['compiled']:.2f}x numpy, "
            f"{per_pair['numba'] / per_pair['compiled']:.2f}x numba); loading them "
            f"{(statistics.median(compiled_loads) - base_s) * 1e3:.1f} ms (imports "
            f"{base_s:.3f} s, counted in neither)"
        )
    path = write_results(
        "bench_decoders",
        {
            "k": K,
            "vocab_size": VOCAB,
            "values": values,
            "repeats": args.repeats,
            "decoders": results,
            "ns_per_pair": per_pair,
            "speedup": per_pair["numpy"] / per_pair["numba"],
            "numba_load_s": load_s,
            "numba_load_s_runs": loads,
            "break_even_bytes": break_even,
            "jit_after_bytes": codecs.JIT_AFTER_BYTES,
            "imports_s": base_s,
            "imports_s_runs": imports,
            "compiled_load_s": (
                statistics.median(compiled_loads) - base_s if compiled_loads else None
            ),
            "compiled_load_s_runs": compiled_loads,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
