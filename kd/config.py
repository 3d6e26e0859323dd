"""The configuration of a `kd train` run: one flat set of keys, read from TOML and `key=value`.

Every key has a default and a one-line meaning (`kd train --help` prints them all). A run writes
its resolved configuration to `output_dir/run.toml`, which `kd train --config` reads back to
reproduce it. Unknown keys, wrong types and out-of-range values are errors before anything runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from .losses import KD_MODES

if sys.version_info >= (3, 11):
    import tomllib
else:  # the standard library reads TOML from Python 3.11 on
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

STUDENT_INITS = ("pretrained", "random")
LR_SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
STRATEGIES = ("ddp", "fsdp")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key, its source and the fix."""


def _key(meaning: str, default: Any, **extra: Any) -> Any:
    """A config field: its default and what it means (shown by `kd train --help`)."""
    metadata = {"help": meaning, **extra}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    # -- what to train on what -------------------------------------------------------------
    student: str = _key(
        "the student: a transformers model directory (config.json, *.safetensors, tokenizer)",
        "",
        required=True,
    )
    student_init: str = _key(
        "'pretrained': the directory's weights; 'random': fresh weights from its config.json",
        "pretrained",
        choices=STUDENT_INITS,
    )
    tokenizer: str = _key("tokenizer directory (default: the student's own)", "")
    cache: str = _key(
        "the training logit cache: a local directory or an fsspec URL (s3://bucket/prefix)",
        "",
        required=True,
    )
    storage_options: dict = _key(
        "fsspec options for remote caches and eval data (a TOML table; JSON on the command line)",
        {},
    )
    cache_dir: str = _key(
        "local directory for shards fetched from a remote cache (default: a temporary one)", ""
    )
    eval_data: str = _key(
        "held-out data for periodic eval: a logit cache (adds KL to the teacher) or jsonl/Parquet",
        "",
    )
    output_dir: str = _key(
        "where run.toml, metrics.jsonl, checkpoints/, model/ and the plots go", "", required=True
    )
    overwrite: bool = _key("replace a finished or abandoned run in output_dir", False)
    # -- the loss ----------------------------------------------------------------------------
    mode: str = _key(
        "KD loss over the teacher's top-K: renorm (NeMo fwd_kl), teacher_renorm (axolotl), "
        "tail (Megatron ghost token), reverse, jsd",
        "renorm",
        choices=KD_MODES,
    )
    kd_weight: float = _key(
        "weight of the KD term (0: plain SFT, the teacher columns are not used)", 1.0
    )
    sft_weight: float = _key("weight of the SFT cross-entropy on the cached tokens", 0.4)
    temperature: float = _key("KD temperature tau (tail mode: 1 only)", 1.0)
    scale_by_t2: bool = _key("multiply the KD term by tau^2 (Hinton et al.)", True)
    beta: float = _key("jsd mode: teacher weight of the mixture (0: forward KL, 1: reverse)", 0.5)
    k: int = _key("use the teacher's top k' <= K of each row (0: all K of the cache)", 0)
    vocab_size: int = _key(
        "student columns in the softmax (0: the cache's vocab_size; padding columns excluded)", 0
    )
    ignore_tokenizer_mismatch: bool = _key(
        "train although the student's tokenizer differs from the cache's (ids mean other tokens)",
        False,
    )
    ignore_vocab_mismatch: bool = _key(
        "train although the student scores fewer columns than the cache's vocab_size", False
    )
    # -- optimisation ------------------------------------------------------------------------
    max_steps: int = _key("optimizer steps to take (0: `epochs` passes over the cache)", 0)
    epochs: float = _key("passes over the cache when max_steps is 0 (may be fractional)", 1.0)
    batch_size: int = _key("records per micro-batch on each rank", 8)
    grad_accum: int = _key("micro-batches per optimizer step (gradient accumulation)", 1)
    lr: float = _key("peak learning rate of AdamW", 1e-4)
    lr_schedule: str = _key(
        "after warmup: cosine or linear decay to min_lr_ratio * lr, or constant",
        "cosine",
        choices=LR_SCHEDULES,
    )
    warmup_steps: int = _key("linear warmup steps from 0 to lr", 0)
    min_lr_ratio: float = _key("final learning rate as a fraction of lr", 0.0)
    weight_decay: float = _key("AdamW weight decay (not applied to biases and norms)", 0.0)
    adam_beta1: float = _key("AdamW beta1", 0.9)
    adam_beta2: float = _key("AdamW beta2", 0.999)
    adam_eps: float = _key("AdamW epsilon", 1e-8)
    max_grad_norm: float = _key("clip the global gradient norm to this (0: no clipping)", 1.0)
    seed: int = _key("seed of the data order, a random student's weights and every RNG", 0)
    # -- data --------------------------------------------------------------------------------
    num_workers: int = _key("DataLoader worker processes per rank (0: read in the trainer)", 2)
    prefetch_factor: int = _key("batches each worker prepares ahead", 2)
    shuffle: bool = _key("shuffle the cache's records each epoch (seeded)", True)
    group_by_length: bool = _key(
        "batch records of similar length together (less padding); order shuffled", True
    )
    group_batches: int = _key(
        "micro-batches whose records are sorted by length together when group_by_length", 16
    )
    packing: bool = _key(
        "pack each micro-batch's records into shared rows (block-diagonal attention)", False
    )
    pack_length: int = _key("tokens per packed row (0: the micro-batch's longest record)", 0)
    # -- hardware ------------------------------------------------------------------------------
    device: str = _key(
        "cpu, cuda, cuda:N or auto (cuda when available; the local rank's GPU)", "auto"
    )
    precision: str = _key(
        "auto (bf16 autocast on CUDA, fp32 elsewhere), fp32 or bf16", "auto", choices=PRECISIONS
    )
    gradient_checkpointing: bool = _key("recompute activations in backward to save memory", False)
    distributed: str = _key(
        "under torchrun: ddp (replicated) or fsdp (FSDP2 fully_shard, sharded)",
        "ddp",
        choices=STRATEGIES,
    )
    threads: int = _key("torch CPU threads per process (0: torch's default)", 0)
    loss_chunk_rows: int = _key("rows per chunk of the fused loss (0: automatic)", 0)
    # -- eval, logging, checkpoints --------------------------------------------------------------
    eval_every: int = _key("evaluate on eval_data every N steps (0: only at the end)", 0)
    eval_at_start: bool = _key("also evaluate before the first step", True)
    eval_max_records: int = _key("evaluate on the first N held-out records (0: all)", 0)
    eval_batch_size: int = _key("records per eval batch (0: batch_size)", 0)
    eval_max_length: int = _key("jsonl eval data: truncate examples to this many tokens", 2048)
    eval_chat_template: bool = _key(
        "jsonl eval data: render prompt/response rows with the tokenizer's chat template", False
    )
    log_every: int = _key("write train metrics every N steps", 10)
    save_every: int = _key("write a checkpoint every N steps (0: only at the end)", 0)
    keep_checkpoints: int = _key("checkpoints kept, newest first (0: all)", 2)
    plot: bool = _key("write loss.png (train and eval curves) in output_dir", True)


KEYS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Names other trainers use, suggested when given (never accepted: one name per key).
ALIASES = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs",
    "max_grad_norm_clip": "max_grad_norm",
    "kd_alpha": "kd_weight",
    "kd_ce_alpha": "sft_weight",
    "kd_loss_weight": "kd_weight",
    "sft_loss_weight": "sft_weight",
    "kd_temperature": "temperature",
    "kd_beta": "beta",
    "model": "student",
    "model_name_or_path": "student",
    "output": "output_dir",
    "bf16": "precision",
}


# --------------------------------------------------------------------------------------------
# Reading


def load_config(
    path: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """The configuration from a TOML file (optional) and `key=value` overrides, validated."""
    if tomllib is None:
        raise ConfigError("reading TOML needs Python 3.11+ (tomllib) or `pip install tomli`")
    values: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        for name, value in data.items():
            _known(name, path)
            values[name] = _from_toml(name, value, path)
    for item in overrides:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(
                f"command line: {item!r} is not key=value; `kd train --help` lists the keys"
            )
        _known(name, "command line")
        values[name] = _from_text(name, text.strip())
    config = TrainConfig(**values)
    validate(config)
    return config


def _known(name: str, where: str) -> None:
    if name in KEYS:
        return
    close = [ALIASES[name]] if name in ALIASES else difflib.get_close_matches(name, KEYS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    if isinstance(name, str) and "." in name:
        hint += "; keys are flat, without tables"
    raise ConfigError(f"{where}: unknown key {name!r}{hint}; `kd train --help` lists every key")


def _kind(name: str) -> type:
    return {"str": str, "int": int, "float": float, "bool": bool, "dict": dict}[KEYS[name].type]


def _from_toml(name: str, value: Any, where: str) -> Any:
    kind = _kind(name)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{where}: key {name!r} must be {_kind_name(kind)}, got {value!r}")
    return value


def _from_text(name: str, text: str) -> Any:
    """A command-line value: strings as written, other kinds as TOML (JSON for tables)."""
    kind = _kind(name)
    where = "command line"
    if kind is str:
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
            return _toml_value(text, name, where)
        return text
    if kind is dict:
        if not text:
            return {}
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = _toml_value(text, name, where)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key {name!r} must be a table, e.g. {name}='{{\"a\": 1}}'")
        return value
    if kind is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: key {name!r} must be true or false, got {text!r}")
    return _from_toml(name, _toml_value(text, name, where), where)


def _toml_value(text: str, name: str, where: str) -> Any:
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        raise ConfigError(f"{where}: key {name!r}: cannot read {text!r} as a value") from None


def _kind_name(kind: type) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        dict: "a table",
    }[kind]


# --------------------------------------------------------------------------------------------
# Checking


def validate(config: TrainConfig) -> None:
    """Raise ConfigError for a configuration that cannot run, naming the key and the fix."""
    for name, f in KEYS.items():
        value = getattr(config, name)
        if f.metadata.get("required") and not value:
            raise ConfigError(f"key {name!r} is required: {f.metadata['help']}")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"key {name!r} is {value!r}; choose one of {', '.join(choices)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"key {name!r} is {value}; it must be a finite number")

    def at_least(name: str, low: float) -> None:
        if getattr(config, name) < low:
            raise ConfigError(f"key {name!r} is {getattr(config, name)}; it must be >= {low}")

    for name in ("batch_size", "grad_accum", "group_batches", "log_every"):
        at_least(name, 1)
    for name in (
        "max_steps",
        "warmup_steps",
        "k",
        "vocab_size",
        "num_workers",
        "pack_length",
        "threads",
        "loss_chunk_rows",
        "eval_every",
        "eval_max_records",
        "eval_batch_size",
        "save_every",
        "keep_checkpoints",
        "kd_weight",
        "sft_weight",
        "weight_decay",
        "max_grad_norm",
        "adam_eps",
        "epochs",
    ):
        at_least(name, 0)
    at_least("prefetch_factor", 1)
    at_least("eval_max_length", 2)
    if config.lr <= 0:
        raise ConfigError(f"key 'lr' is {config.lr}; it must be > 0")
    if config.temperature <= 0:
        raise ConfigError(f"key 'temperature' is {config.temperature}; it must be > 0")
    if config.mode == "tail" and config.temperature != 1.0:
        raise ConfigError(
            "mode 'tail' is defined at temperature 1 only (the teacher's outside mass is known "
            "at the temperature it was cached at); use renorm or teacher_renorm to scale"
        )
    for name in ("beta", "min_lr_ratio", "adam_beta1", "adam_beta2"):
        value = getattr(config, name)
        if not 0 <= value <= 1:
            raise ConfigError(f"key {name!r} is {value}; it must be in [0, 1]")
    if config.kd_weight == 0 and config.sft_weight == 0:
        raise ConfigError("kd_weight and sft_weight are both 0: there is nothing to learn")
    if config.max_steps == 0 and config.epochs == 0:
        raise ConfigError("set max_steps (optimizer steps) or epochs (passes over the cache)")


# --------------------------------------------------------------------------------------------
# Writing


# storage_options entries that hold credentials: never written to run.toml or a checkpoint.
SECRET_OPTIONS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "session_token",
        "access_key",
        "secret_key",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "account_key",
        "sas_token",
        "client_secret",
        "credentials",
    }
)


def redact_options(options: dict[str, Any], prefix: str = "") -> tuple[dict[str, Any], list[str]]:
    """`options` without credential entries (at any depth), and the dotted names left out."""
    kept, removed = {}, []
    for k, v in options.items():
        if str(k).lower() in SECRET_OPTIONS:
            removed.append(prefix + str(k))
        elif isinstance(v, dict):
            kept[k], inner = redact_options(v, f"{prefix}{k}.")
            removed += inner
        else:
            kept[k] = v
    return kept, removed


def dumps_config(config: TrainConfig) -> str:
    """TOML text holding every key of `config`, in declaration order (credentials left out)."""
    lines = [
        "# The configuration of a kd train run; `kd train --config run.toml` reproduces it.",
    ]
    values = to_dict(config)
    _, removed = redact_options(config.storage_options)
    if removed:
        lines.append(
            f"# storage_options: {', '.join(removed)} left out; give them again on the command "
            "line or through the environment (AWS_ACCESS_KEY_ID, ...)"
        )
    for name in KEYS:
        lines.append(f"{name} = {_toml(values[name])}")
    return "\n".join(lines) + "\n"


def write_config(config: TrainConfig, path: str) -> None:
    """Write run.toml beside its destination and rename it into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(dumps_config(config))
    os.replace(tmp, path)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def keys_help() -> str:
    """Every key with its default and meaning, for `kd train --help`."""
    rows = []
    for name, f in KEYS.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = "(required)" if f.metadata.get("required") else _toml(default)
        rows.append((f"{name} = {shown}", f.metadata["help"]))
    width = max(len(left) for left, _ in rows)
    return "\n".join(f"  {left.ljust(width)}  {meaning}" for left, meaning in rows)


def to_dict(config: TrainConfig) -> dict[str, Any]:
    """Every key and value, as written to run.toml and checkpoints (credentials left out)."""
    values = dataclasses.asdict(config)
    values["storage_options"] = redact_options(config.storage_options)[0]
    return values
