"""Which KD objective the demo should use, chosen without looking at its held-out sets.

`kd demo` compares SFT with KD + SFT on held-out standard-library modules and HumanEval. Its
loss settings were chosen here instead, on a development split of the *training* modules: the
functions that follow the demo's training functions in the train split
(`stdlib_functions("train", limit=train + dev)[train:]`). Every variant trains the demo's own
pruned student against the demo's own cache for the demo's number of steps, batch, learning
rate and seed, then reports response-token cross-entropy and top-1 accuracy on that split.

Run `kd demo --out demo-out` first (it makes the student and the cache), then:

    python benchmarks/bench_demo_modes.py --demo-out demo-out      # ~12 minutes on 2 cores

Writes benchmarks/results/bench_demo_modes.json.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from common import format_table, write_results

from kd.codedata import stdlib_functions, write_jsonl
from kd.config import TrainConfig, validate
from kd.demo import DEMO_SEED, SCALES
from kd.train import train

# name -> loss keys; SFT first, then the demo's choice and what it was chosen against.
VARIANTS = {
    "sft": dict(kd_weight=0.0, sft_weight=1.0),
    "renorm kd+sft": dict(mode="renorm", kd_weight=1.0, sft_weight=0.4),
    "renorm kd+sft T=2": dict(mode="renorm", kd_weight=1.0, sft_weight=0.4, temperature=2.0),
    "renorm kd only": dict(mode="renorm", kd_weight=1.0, sft_weight=0.0),
    "tail kd+sft": dict(mode="tail", kd_weight=1.0, sft_weight=0.4),
    "tail kd only": dict(mode="tail", kd_weight=1.0, sft_weight=0.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-out", default="demo-out", help="output directory of kd demo")
    parser.add_argument("--dev", type=int, default=64, help="development functions")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    args = parser.parse_args()

    scale = SCALES["small"]
    demo = Path(args.demo_out).resolve()
    student, cache = demo / "student-init", demo / "cache"
    for needed in (student, cache):
        if not needed.exists():
            raise SystemExit(f"{needed} is missing: run `kd demo --out {args.demo_out}` first")
    work = demo / "dev-modes"
    work.mkdir(exist_ok=True)
    functions = stdlib_functions("train", limit=scale.train_functions + args.dev)
    dev = functions[scale.train_functions :]
    dev_path = write_jsonl([f.row() for f in dev], str(work / "dev.jsonl"))

    rows, results = [], {}
    for name in args.variants.split(","):
        out = work / name.replace(" ", "-").replace("=", "")
        config = TrainConfig(
            student=str(student), cache=str(cache), eval_data=dev_path, output_dir=str(out),
            overwrite=True, max_steps=scale.steps, batch_size=scale.batch_size, lr=scale.lr,
            warmup_steps=scale.warmup_steps, seed=DEMO_SEED, eval_every=scale.steps,
            eval_max_length=scale.max_length, num_workers=0, plot=False,
            threads=args.threads, **VARIANTS[name],
        )  # fmt: skip
        validate(config)
        start = time.perf_counter()
        result = train(config, progress=True)
        final = result.summary["eval"]
        results[name] = {
            "loss": VARIANTS[name],
            "dev_ce": final["eval_ce"],
            "dev_accuracy": final["eval_accuracy"],
            "dev_targets": final["eval_targets"],
            "train_ce": result.summary["ce"],
            "wall_s": round(time.perf_counter() - start, 1),
        }
        rows.append([name, final["eval_ce"], f"{final['eval_accuracy']:.1%}"])
        print(f"{name}: dev CE {final['eval_ce']:.3f}, accuracy {final['eval_accuracy']:.1%}")
        shutil.rmtree(out / "checkpoints", ignore_errors=True)

    table = format_table(["objective", "dev CE", "dev accuracy"], rows)
    print(table)
    path = write_results(
        "bench_demo_modes",
        {
            "config": {
                "dev_functions": len(dev),
                "dev_modules": sorted({f.module.split(".")[0] for f in dev}),
                "steps": scale.steps,
                "batch_size": scale.batch_size,
                "lr": scale.lr,
                "seed": DEMO_SEED,
                "threads": args.threads,
                "student": "kd demo's pruned student (student-init)",
                "cache": "kd demo's cache (K=100 over its training functions)",
            },
            "variants": results,
            "table": table,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
