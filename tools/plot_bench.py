"""Plot bytes per target token per method from benchmarks/results/bench_codec.json.

One group of bars per (K, vocab) configuration, with the index-set entropy bound marked.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
# JSON text is 4x raw: it would flatten every other bar, so it is left out of the plot.
SKIP = {"nemo-jsonl"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=RESULTS / "bench_codec.json")
    parser.add_argument("--output", type=Path, default=RESULTS / "bench_codec.png")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(args.input.read_text())
    configs = doc["configs"]
    methods: list[str] = []
    for cfg in configs:
        for r in cfg["results"]:
            name = "ours smallest" if r["name"].startswith("ours smallest") else r["name"]
            if name not in SKIP and name not in methods:
                methods.append(name)

    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(configs)), 4.5))
    width = 0.8 / len(methods)
    for m, method in enumerate(methods):
        xs, ys = [], []
        for c, cfg in enumerate(configs):
            for r in cfg["results"]:
                name = "ours smallest" if r["name"].startswith("ours smallest") else r["name"]
                if name == method:
                    xs.append(c + (m - (len(methods) - 1) / 2) * width)
                    ys.append(r["bytes_per_token"])
        ax.bar(xs, ys, width, label=method)
    for c, cfg in enumerate(configs):
        bound = cfg["bounds"]["uniform_set_bytes"]
        ax.hlines(bound, c - 0.4, c + 0.4, colors="black", linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels(
        [f"{c.get('data', 'synthetic')}\nK={c['k']}\nV={c['vocab_size']}" for c in configs],
        fontsize=8,
    )
    ax.set_ylabel("bytes per target token")
    ax.set_title("top-K cache size per method (dashed: log2 C(V, K) / 8 index-set bound)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")
    lossy = [c for c in configs if c.get("lossy")]
    if lossy:
        path = args.output.with_name(args.output.stem + "_lossy.png")
        plot_lossy(plt, lossy, path)
        print(f"wrote {path}")
    return 0


def plot_lossy(plt, configs: list[dict], path: Path) -> None:
    """Bytes per target against mean KL of lossy mode on the real rows, one line per K, with
    the lossless entropy-coded and default sizes for reference."""
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for cfg in configs:
        rows = [r for r in cfg["lossy"] if r.get("truncation", True)]
        line = ax.plot(
            [r["mean_renorm_fwd"] for r in rows],
            [r["bytes_per_token"] for r in rows],
            marker="o",
            label=f"lossy, K={cfg['k']} (budgets {', '.join(str(r['budget']) for r in rows)})",
        )
        kept = [r for r in cfg["lossy"] if not r.get("truncation", True)]
        if kept:
            ax.plot(
                [r["mean_renorm_fwd"] for r in kept],
                [r["bytes_per_token"] for r in kept],
                marker="x",
                linestyle="none",
                color=line[0].get_color(),
                label=f"lossy without truncation, K={cfg['k']}",
            )
        for r in cfg["results"]:
            if r["name"].startswith(("ours entropy (", "ours default")):
                ax.axhline(
                    r["bytes_per_token"],
                    color=line[0].get_color(),
                    linestyle="dashed" if r["name"].startswith("ours entropy") else "dotted",
                    linewidth=1,
                )
    ax.set_xscale("log")
    # Label the minor ticks at 2, 3 and 5 times a power of ten: the range is under a decade.
    ax.xaxis.set_minor_formatter(
        FuncFormatter(
            lambda v, _: (
                f"{v:.0e}" if round(v / 10 ** math.floor(math.log10(v))) in (2, 3, 5) else ""
            )
        )
    )
    ax.set_xlabel("mean KL per row, stored vs lossless (nats, renormalised over stored ids)")
    ax.set_ylabel("bytes per target token (ids + logprobs)")
    ax.set_title("lossy mode on real teacher rows (dashed: lossless rANS, dotted: default)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
