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

# name -> (add the subparser, run the parsed arguments)
COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "export": (add_export, run_export),
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
