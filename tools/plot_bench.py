"""Plot bytes per target token per method from benchmarks/results/bench_codec.json.

One group of bars per (K, vocab) configuration, with the index-set entropy bound marked.
"""

from __future__ import annotations

import argparse
import json
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
    ax.set_xticklabels([f"K={c['k']}\nV={c['vocab_size']}" for c in configs], fontsize=8)
    ax.set_ylabel("bytes per target token")
    ax.set_title("top-K cache size per method (dashed: log2 C(V, K) / 8 index-set bound)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
