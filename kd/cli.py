"""The `kd` command line: make a teacher cache, prune a student, train and evaluate it.

This module only parses arguments and calls library functions. Each command registers a
parser builder and a runner in COMMANDS. Exit status: 0 ok, 1 an error stopped the command,
2 a usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

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
        "--storage-options", metavar="JSON", help="fsspec options for a remote cache, as JSON"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run_eval(args) -> int:
    import json

    from .evaluate import evaluate_model

    options = None
    if args.storage_options:
        try:
            options = json.loads(args.storage_options)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--storage-options is not JSON: {exc}") from None
    result = evaluate_model(
        args.model,
        args.data,
        batch_size=args.batch_size,
        max_records=args.max_records,
        max_length=args.max_length,
        device=args.device,
        tokenizer=args.tokenizer,
        storage_options=options,
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

# name -> (add the subparser, run the parsed arguments)
COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "export": (add_export, run_export),
    "train": (add_train, run_train),
    "eval": (add_eval, run_eval),
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
