"""How much memory and time the fused KD + SFT loss costs, against the reference on materialised
logits and against SFT-only cross-entropy computed the same fused way (forward + backward).

Each vocabulary size runs in a fresh subprocess that builds the inputs once, warms up on 64 rows,
then runs rounds of forward+backward passes with the variants interleaved (order rotated each
round), so that load from other processes hits all variants alike. The fused variants run
--repeats passes each and report the median; the reference, the slow and memory-hungry baseline,
runs --reference-repeats passes. Peak extra memory is measured per pass as growth above the
memory held before it, maximum over the variant's passes: on CPU the peak resident set (VmHWM of
/proc/self/status, reset through /proc/self/clear_refs before each pass; torch's CPU allocator is
invisible to tracemalloc), on GPU torch.cuda.max_memory_allocated. It includes the weight
gradient [V, D], which every variant allocates. Teacher rows come from
logitcache.synthetic.SyntheticTeacher.

    python benchmarks/bench_loss.py            # M=4096, D=1024, V in {32000, 128256, 151936}
    python benchmarks/bench_loss.py --quick    # M=1024, V in {32000, 128256}, 5 repeats
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import proc_status_kib, reset_peak_rss

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
VARIANTS = ("reference", "fused_sft", "fused_kd_sft")
VARIANT_HELP = {
    "reference": "logits = h @ W.T materialised, reference_kd_sft_loss (autograd)",
    "fused_sft": "kd_sft_loss with no teacher rows: SFT cross-entropy only, same chunks",
    "fused_kd_sft": "kd_sft_loss with a teacher row for every target",
}


# ------------------------------------------------------------------------------ worker


def _run_worker(config: dict) -> list[dict]:
    import gc

    import numpy as np
    import torch

    from kd.losses import kd_sft_loss, reference_kd_sft_loss
    from logitcache.synthetic import SyntheticTeacher

    device = torch.device(config["device"])
    dtype = getattr(torch, config["dtype"])
    m, d, v, k = config["tokens"], config["dim"], config["vocab"], config["k"]
    mode = config["mode"]
    cuda = device.type == "cuda"

    teacher = SyntheticTeacher(vocab_size=v, k=k, seed=0)
    ids_np, logprobs_np = teacher.rows(m)
    kd_ids = torch.from_numpy(ids_np).to(device)
    kd_logprobs = torch.from_numpy(logprobs_np).to(device)
    # The student's target is the teacher's favourite token most of the time, as in SFT data.
    rng = np.random.default_rng(1)
    targets_np = np.where(rng.random(m) < 0.8, ids_np[:, 0], rng.integers(0, v, m))
    targets = torch.from_numpy(targets_np.astype(np.int64)).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(m, d, generator=gen, device=device, dtype=dtype).requires_grad_(True)
    weight = torch.randn(v, d, generator=gen, device=device, dtype=dtype) * d**-0.5
    weight.requires_grad_(True)

    def step(variant: str, rows: int) -> None:
        h = hidden[:rows]
        # SFT-only: the same call with no teacher rows.
        n_kd = 0 if variant == "fused_sft" else rows
        if variant == "reference":
            logits = h @ weight.t()
            loss = reference_kd_sft_loss(
                logits, targets[:rows], kd_ids[:n_kd], kd_logprobs[:n_kd], mode=mode
            )
        else:
            loss = kd_sft_loss(
                h,
                weight,
                targets[:rows],
                kd_ids[:n_kd],
                kd_logprobs[:n_kd],
                mode=mode,
                chunk_size=config["chunk_size"],
            )
        loss.total.backward()
        hidden.grad = weight.grad = None

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def measured(variant: str) -> tuple[float, int]:
        gc.collect()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
        else:
            reset_peak_rss()
            baseline = proc_status_kib("VmRSS") * 1024
        start = time.perf_counter()
        step(variant, m)
        sync()
        elapsed = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() if cuda else proc_status_kib("VmHWM") * 1024
        return elapsed, peak - baseline

    for variant in VARIANTS:
        step(variant, min(m, 64))  # warm-up: kernels, thread pools, lazy initialisation
    del teacher, ids_np, logprobs_np
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    peaks: dict[str, list[int]] = {variant: [] for variant in VARIANTS}
    for round_index in range(max(config["repeats"], config["reference_repeats"])):
        order = [
            variant
            for variant in VARIANTS
            if round_index < config["reference_repeats" if variant == "reference" else "repeats"]
        ]
        shift = round_index % len(order)
        for variant in order[shift:] + order[:shift]:
            elapsed, extra = measured(variant)
            times[variant].append(elapsed)
            peaks[variant].append(extra)
    return [
        {
            **config,
            "variant": variant,
            "times_s": times[variant],
            "median_s": statistics.median(times[variant]),
            "peak_extra_bytes": max(peaks[variant]),
            "threads": torch.get_num_threads(),
        }
        for variant in VARIANTS
    ]


# ------------------------------------------------------------------------------ driver


def _measure(config: dict) -> list[dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(config)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"benchmark worker for {config} failed (exit {proc.returncode}):\n{proc.stderr}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> str:
    header = (
        f"{'device':6} {'dtype':8} {'V':>7} {'variant':13} {'median s':>9} {'x ref':>6} "
        f"{'x sft':>6} {'peak extra MiB':>15} {'mem x ref':>9}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['device']:6} {row['dtype']:8} {row['vocab']:>7} {row['variant']:13} "
            f"{row['median_s']:>9.3f} {row['time_vs_reference']:>6.2f} "
            f"{row['time_vs_fused_sft']:>6.2f} {row['peak_extra_bytes'] / 2**20:>15.1f} "
            f"{row['memory_vs_reference']:>9.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="M=1024, V 32000 and 128256")
    parser.add_argument("--tokens", type=int, help="M, target rows (default 4096)")
    parser.add_argument("--dim", type=int, help="D, hidden size (default 1024)")
    parser.add_argument("--vocab", type=int, nargs="+", help="V values")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--mode", default="renorm", help="KD mode of the KD+SFT variants")
    parser.add_argument("--repeats", type=int, help="fused passes (default 3, quick 5)")
    parser.add_argument("--reference-repeats", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: kd_sft_loss's")
    parser.add_argument("--out", type=Path, help="default: results/bench_loss_cpu.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_run_worker(json.loads(args.worker))))
        return

    import torch

    tokens = args.tokens or (1024 if args.quick else 4096)
    dim = args.dim or 1024
    repeats = args.repeats or (5 if args.quick else 3)
    vocabs = args.vocab or ([32000, 128256] if args.quick else [32000, 128256, 151936])
    devices = [("cpu", "float32")]
    if torch.cuda.is_available():
        devices.append(("cuda", "bfloat16"))
    else:
        print("GPU rows skipped: torch.cuda.is_available() is False on this machine.")
    print(
        f"M={tokens} D={dim} K={args.k} mode={args.mode} repeats={repeats} "
        f"reference repeats={args.reference_repeats} "
        f"torch={torch.__version__} cpu threads={torch.get_num_threads()}"
    )
    rows = []
    for device, dtype in devices:
        for vocab in vocabs:
            config = {
                "device": device,
                "dtype": dtype,
                "tokens": tokens,
                "dim": dim,
                "vocab": vocab,
                "k": args.k,
                "mode": args.mode,
                "repeats": repeats,
                "reference_repeats": args.reference_repeats,
                "chunk_size": args.chunk_size,
            }
            by_variant = {result["variant"]: result for result in _measure(config)}
            print(f"  measured {device} V={vocab}", flush=True)
            ref, sft = by_variant["reference"], by_variant["fused_sft"]
            for result in by_variant.values():
                result["time_vs_reference"] = result["median_s"] / ref["median_s"]
                result["time_vs_fused_sft"] = result["median_s"] / sft["median_s"]
                result["memory_vs_reference"] = result["peak_extra_bytes"] / ref["peak_extra_bytes"]
                rows.append(result)
    print(_table(rows))
    print(
        "peak extra memory: growth of peak RSS (CPU) or of torch.cuda.max_memory_allocated (GPU) "
        "above the inputs; includes the [V, D] weight gradient."
    )
    out = args.out or RESULTS / "bench_loss_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "command": " ".join(["python", "benchmarks/bench_loss.py", *(argv or sys.argv[1:])]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
        },
        "variants": VARIANT_HELP,
        "memory_method": "per pass: peak RSS growth (VmHWM reset via /proc/self/clear_refs) on "
        "CPU, torch.cuda.max_memory_allocated growth on GPU; max over the variant's passes",
        "timing_method": "median of the variant's passes, variants interleaved in one fresh "
        "subprocess per vocabulary size",
        "rows": rows,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")


if __name__ == "__main__":
    main()
