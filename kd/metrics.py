"""What a training run reports: metrics as JSON lines, a loss-curve PNG and a final summary.

metrics.jsonl holds one object per logged step ({"kind": "train", "step", "loss", "kd", "ce",
"lr", "grad_norm", "tokens_per_s", ...}) and one per evaluation ({"kind": "eval", "step",
"eval_ce", "eval_kd", "eval_accuracy", ...}). A resumed run first drops the lines written after
its checkpoint, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
SUMMARY_FILE = "summary.json"


class MetricsLog:
    """Append-only JSON lines, flushed per line; a no-op on ranks other than 0."""

    def __init__(self, output_dir: str, *, enabled: bool, resume_step: int | None = None):
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.enabled = enabled
        self._file = None
        if not enabled:
            return
        kept = []
        if resume_step is not None and os.path.exists(self.path):
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(_finite(record)) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: non-finite numbers are written as null."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (a run directory or the file itself)."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    return records


def plot_losses(output_dir: str, *, title: str = "") -> str | None:
    """loss.png: training total, KD and CE against steps, with eval CE and KD when present."""
    records = read_metrics(output_dir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)

    def line(rows, key, label, **style):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), label=label, **style)

    line(train, "loss", "train loss (weighted)", color="black", linewidth=1.2)
    line(train, "kd", "train KD", color="tab:blue", linewidth=1, alpha=0.8)
    line(train, "ce", "train CE", color="tab:orange", linewidth=1, alpha=0.8)
    line(evals, "eval_kd", "eval KL to teacher", color="tab:blue", marker="o", linestyle="--")
    line(evals, "eval_ce", "eval CE", color="tab:orange", marker="o", linestyle="--")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats per target token")
    ax.set_title(title or os.path.basename(os.path.abspath(output_dir)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(output_dir, PLOT_FILE)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_summary(output_dir: str, summary: dict[str, Any]) -> str:
    path = os.path.join(output_dir, SUMMARY_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_finite(summary), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the terminal at the end of a run."""
    lines = [
        f"trained {summary['steps']} steps ({summary['records']:,} records, "
        f"{summary['tokens']:,} tokens) in {summary['elapsed_s']:.0f}s "
        f"({summary['tokens_per_s']:,.0f} tokens/s)",
        f"final train loss {summary['loss']:.4f} (KD {summary['kd']:.4f}, CE {summary['ce']:.4f})",
    ]
    last_eval = summary.get("eval")
    if last_eval:
        kl = last_eval.get("eval_kd")
        lines.append(
            f"eval at step {last_eval['step']}: CE {last_eval['eval_ce']:.4f}, accuracy "
            f"{last_eval['eval_accuracy']:.4f}"
            + (f", KL to teacher {kl:.4f}" if kl is not None else "")
        )
    lines.append(f"model: {summary['model_dir']}")
    return "\n".join(lines)
