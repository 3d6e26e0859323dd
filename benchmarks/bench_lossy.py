"""Is lossy mode safe for training? The same small student trained on a lossless and on lossy
caches of the same teacher rows, held-out cross-entropy and KL to the teacher for each.

Method notes
- Data: the real-row cache of `tools/real_rows.py` (SmolLM2-135M-Instruct over standard-library
  source, positions "all", K=100, V=49152), from --real (default benchmarks/data/real-rows/k100).
  Records from HELD_OUT files are the evaluation set, the others the training set. Lossy caches
  are made from the lossless one with `logitcache.convert(..., lossy_kl=BUDGET)`, exactly what
  `logitcache convert --lossy-kl` does; "no-trunc" caches keep every entry of each row
  (`--lossy-no-truncation`), which separates the effect of the grid from that of truncation.
- Training: `kd.train` (what `kd train` runs) of a randomly initialised two-layer Llama
  (hidden 64, tied embeddings, the teacher's tokenizer and vocabulary; student_init=random, so
  every cache starts from the same weights per seed): AdamW lr 3e-3 with cosine decay, --steps
  steps of --batch records, KD in --mode (default renorm; weight 1) + SFT cross-entropy
  (weight 0.4), the weights of NeMo-Aligner's tutorial.
- Evaluation: kd.train's final eval on the held-out records, always the lossless teacher rows
  (a cache of them, `eval_data`): cross-entropy of the true next tokens and KL to the teacher
  (kd.evaluate: over the teacher's K ids, the student renormalised over them, whatever --mode).
- Noise: every cache is trained with --seeds seeds (initialisation and batch order); the
  run-to-run noise is the spread between seeds on the lossless cache, and a lossy cache passes
  when its mean differs from the lossless mean by no more than that spread.
This is a small setting, not the end-to-end demo's: it answers whether the stored error moves
training at all, in minutes on a CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import torch
from common import format_table, write_results

from logitcache import open_cache
from logitcache.convert import convert

REAL = "benchmarks/data/real-rows/k100"
HELD_OUT = ("shlex.py", "colorsys.py")
BUDGETS = (0.01, 0.02)
# Budgets also trained on with every entry kept (quantisation only), to tell the two apart.
NO_TRUNCATION_BUDGETS = (0.01,)
KD_WEIGHT, SFT_WEIGHT = 1.0, 0.4


def write_student(path: str) -> str:
    """A student directory for student_init=random: a tiny Llama config and the teacher's
    tokenizer (read from the GGUF file the teacher ships in)."""
    from transformers import LlamaConfig

    from kd.models import load_tokenizer, packaged_gguf

    tokenizer = load_tokenizer(packaged_gguf())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def split_cache(src: str, train_url: str, held_url: str) -> None:
    """Training and held-out caches: records from HELD_OUT files go to the held-out one."""
    from logitcache import CacheWriter

    with open_cache(src) as cache:
        m = cache.manifest
        kwargs = dict(
            k=m.k,
            vocab_size=m.vocab_size,
            positions=m.positions,
            teacher=m.teacher,
            tokenizer=m.tokenizer,
        )
        with CacheWriter(train_url, **kwargs) as train, CacheWriter(held_url, **kwargs) as held:
            for r in cache.iter_records():
                writer = held if r.sample_id.split("@")[0] in HELD_OUT else train
                writer.add(
                    input_ids=r.input_ids,
                    loss_mask=r.loss_mask,
                    topk_ids=r.topk_ids,
                    topk_logprobs=r.topk_logprobs,
                    sample_id=r.sample_id,
                )


def train_and_evaluate(
    student: str, cache: str, held: str, out: str, seed: int, args
) -> dict[str, Any]:
    from kd.config import TrainConfig, validate
    from kd.train import train

    config = TrainConfig(
        student=student,
        student_init="random",
        cache=cache,
        eval_data=held,
        output_dir=out,
        max_steps=args.steps,
        batch_size=args.batch,
        lr=args.lr,
        lr_schedule="cosine",
        seed=seed,
        mode=args.mode,
        kd_weight=KD_WEIGHT,
        sft_weight=SFT_WEIGHT,
        num_workers=0,
        eval_at_start=False,
        log_every=max(1, args.steps),
        plot=False,
    )
    validate(config)
    start = time.perf_counter()
    result = train(config, progress=False)
    final = result.summary["eval"]
    return {
        "ce": final["eval_ce"],
        "kl": final["eval_kd"],
        "accuracy": final.get("eval_accuracy"),
        "targets": final.get("eval_targets"),
        "train_s": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", default=REAL, help="the lossless real-row cache (K=100)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument(
        "--no-truncation-budgets", type=float, nargs="*", default=list(NO_TRUNCATION_BUDGETS)
    )
    parser.add_argument("--output", default="bench_lossy")
    parser.add_argument(
        "--mode",
        default="renorm",
        choices=["renorm", "teacher_renorm", "tail", "reverse", "jsd"],
        help="KD loss for training (default renorm)",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: one per core)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or max(1, len(os.sched_getaffinity(0))))

    tmp = tempfile.mkdtemp(prefix="bench-lossy-")
    try:
        student = write_student(f"{tmp}/student")
        held = f"{tmp}/held-out"
        caches = {"lossless": f"{tmp}/train"}
        split_cache(args.real, caches["lossless"], held)
        variants = [(b, True) for b in args.budgets]
        variants += [(b, False) for b in args.no_truncation_budgets]
        for budget, truncate in variants:
            name = f"lossy {budget}" + ("" if truncate else " no-trunc")
            url = f"{tmp}/{name.replace(' ', '-')}"
            convert(
                caches["lossless"], url, lossy_kl=budget, lossy_truncate=truncate, progress=False
            )
            caches[name] = url
        sizes, rows = {}, []
        for name, url in caches.items():
            with open_cache(url) as cache:
                sizes[name] = cache.manifest.bytes / cache.manifest.targets
            for seed in range(args.seeds):
                out = f"{tmp}/run-{name.replace(' ', '-')}-{seed}"
                result = train_and_evaluate(student, url, held, out, seed, args)
                rows.append({"cache": name, "seed": seed, **result})
                print(
                    f"{name} seed {seed}: ce {result['ce']:.4f} kl {result['kl']:.4f}", flush=True
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def mean(name: str, key: str) -> float:
        return float(np.mean([r[key] for r in rows if r["cache"] == name]))

    def spread(name: str, key: str) -> float:
        values = [r[key] for r in rows if r["cache"] == name]
        return float(max(values) - min(values))

    summary: list[dict[str, Any]] = []
    for name in caches:
        entry = {"cache": name, "bytes_per_target": sizes[name]}
        for key in ("ce", "kl"):
            entry[key] = mean(name, key)
            entry[f"{key}_seed_spread"] = spread(name, key)
            entry[f"{key}_diff_vs_lossless"] = mean(name, key) - mean("lossless", key)
            entry[f"{key}_within_noise"] = abs(entry[f"{key}_diff_vs_lossless"]) <= spread(
                "lossless", key
            )
        summary.append(entry)
    headers = [
        "cache",
        "B/target",
        "held-out CE",
        "CE spread",
        "d CE",
        "held-out KL",
        "KL spread",
        "d KL",
        "within noise",
    ]
    print(
        "\n"
        + format_table(
            headers,
            [
                [
                    e["cache"],
                    e["bytes_per_target"],
                    e["ce"],
                    e["ce_seed_spread"],
                    e["ce_diff_vs_lossless"],
                    e["kl"],
                    e["kl_seed_spread"],
                    e["kl_diff_vs_lossless"],
                    "yes" if e["ce_within_noise"] and e["kl_within_noise"] else "NO",
                ]
                for e in summary
            ],
        )
    )
    path = write_results(
        args.output,
        {
            "mode": args.mode,
            "steps": args.steps,
            "batch": args.batch,
            "lr": args.lr,
            "seeds": args.seeds,
            "held_out_files": list(HELD_OUT),
            "held_out_targets": rows[0]["targets"] if rows else 0,
            "runs": rows,
            "summary": summary,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
