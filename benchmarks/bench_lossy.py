"""Is lossy mode safe for training? The same small student trained on a lossless and on lossy
caches of the same teacher rows, held-out cross-entropy and KL to the teacher for each.

Method notes
- Data: the real-row cache of `tools/real_rows.py` (SmolLM2-135M-Instruct over standard-library
  source, positions "all", K=100, V=49152), from --real (default benchmarks/data/real-rows/k100).
  Records from HELD_OUT files are the evaluation set, the others the training set. Lossy caches
  are made from the lossless one with `logitcache.convert(..., lossy_kl=BUDGET)`, exactly what
  `logitcache convert --lossy-kl` does; "no-trunc" caches keep every entry of each row
  (`--lossy-no-truncation`), which separates the effect of the grid from that of truncation.
- Student: a randomly initialised two-layer Llama (hidden 64, tied embeddings, the teacher's
  vocabulary), trained from the same initialisation (per seed) on every cache: AdamW lr 3e-3,
  --steps steps of --batch records (collate_kd), loss kd_sft_loss renorm KD (weight 1) + SFT
  cross-entropy (weight 0.4), the weights of NeMo-Aligner's tutorial.
- Evaluation: on the held-out records, always against the lossless teacher rows: mean
  cross-entropy of the true next tokens and mean KL (renorm, the training loss's KD term).
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

from kd.losses import gather_target_rows, kd_sft_loss
from logitcache import open_cache
from logitcache.convert import convert
from logitcache.loader import collate_kd

REAL = "benchmarks/data/real-rows/k100"
HELD_OUT = ("shlex.py", "colorsys.py")
BUDGETS = (0.01, 0.02)
# Budgets also trained on with every entry kept (quantisation only), to tell the two apart.
NO_TRUNCATION_BUDGETS = (0.01,)
KD_WEIGHT, SFT_WEIGHT = 1.0, 0.4


def build_student(vocab_size: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def split(records: list) -> tuple[list, list]:
    held = [r for r in records if r.sample_id.split("@")[0] in HELD_OUT]
    train = [r for r in records if r.sample_id.split("@")[0] not in HELD_OUT]
    return train, held


def loss_of(
    model, batch: dict, *, mode: str = "renorm", kd_weight=KD_WEIGHT, sft_weight=SFT_WEIGHT
):
    hidden = model.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    rows = gather_target_rows(hidden, batch["labels"], batch["kd_index"])
    return kd_sft_loss(
        rows.hidden,
        model.lm_head.weight,
        rows.targets,
        batch["kd_ids"],
        batch["kd_logprobs"],
        kd_rows=rows.kd_rows,
        mode=mode,
        kd_weight=kd_weight,
        sft_weight=sft_weight,
    )


def train(records: list, vocab_size: int, seed: int, steps: int, batch: int, lr: float):
    model = build_student(vocab_size, seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch:
            order += rng.permutation(len(records)).tolist()
        picked, order = order[:batch], order[batch:]
        loss = loss_of(model, collate_kd([records[i] for i in picked], positions="all"))
        opt.zero_grad(set_to_none=True)
        loss.total.backward()
        opt.step()
    return model


@torch.no_grad()
def evaluate(model, held: list) -> dict[str, float]:
    """Token-weighted mean cross-entropy and KL (renorm) over the held-out records."""
    model.eval()
    ce = kl = 0.0
    tokens = 0
    for i in range(0, len(held), 4):
        batch = collate_kd(held[i : i + 4], positions="all")
        loss = loss_of(model, batch, kd_weight=1.0, sft_weight=1.0)
        n = int(batch["kd_index"].numel())
        ce += float(loss.ce) * n
        kl += float(loss.kd) * n
        tokens += n
    return {"ce": ce / tokens, "kl": kl / tokens, "tokens": tokens}


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
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))

    tmp = tempfile.mkdtemp(prefix="bench-lossy-")
    try:
        caches = {"lossless": args.real}
        variants = [(b, True) for b in args.budgets]
        variants += [(b, False) for b in args.no_truncation_budgets]
        for budget, truncate in variants:
            name = f"lossy {budget}" + ("" if truncate else " no-trunc")
            url = f"{tmp}/{name.replace(' ', '-')}"
            convert(args.real, url, lossy_kl=budget, lossy_truncate=truncate, progress=False)
            caches[name] = url
        sizes, rows = {}, []
        with open_cache(args.real) as cache:
            vocab_size = cache.manifest.vocab_size
            _, held = split(list(cache.iter_records()))  # evaluated against lossless rows
        for name, url in caches.items():
            with open_cache(url) as cache:
                records = list(cache.iter_records())
                sizes[name] = cache.manifest.bytes / cache.manifest.targets
            training, _ = split(records)
            for seed in range(args.seeds):
                start = time.perf_counter()
                model = train(training, vocab_size, seed, args.steps, args.batch, args.lr)
                result = evaluate(model, held)
                rows.append(
                    {"cache": name, "seed": seed, **result, "train_s": time.perf_counter() - start}
                )
                print(f"{name} seed {seed}: ce {result['ce']:.4f} kl {result['kl']:.4f}")
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
            "steps": args.steps,
            "batch": args.batch,
            "lr": args.lr,
            "seeds": args.seeds,
            "held_out_files": list(HELD_OUT),
            "held_out_targets": rows[0]["tokens"] if rows else 0,
            "runs": rows,
            "summary": summary,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
