"""Checkpoints of a training run, written atomically and read back for an exact resume.

    output_dir/checkpoints/step-0000100/
        config.json, model.safetensors, tokenizer files   the student (from_pretrained loads it)
        optimizer.safetensors                              AdamW moments and step counts
        rng.safetensors                                    each rank's torch (and CUDA) RNG state
        trainer_state.json                                 step, scheduler, each rank's loader
                                                           position and Python / NumPy RNG state

Nothing is pickled: tensors go to safetensors, everything else to JSON, with a tensor's place
in the state marked by {"__tensor__": key}. A checkpoint is built in a hidden directory beside
its destination and renamed into place, so a crash leaves the previous checkpoints as they
were; only directories named step-N count, and old ones are renamed away before deletion.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .distributed import Ranks, barrier, gather_objects

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Files of a checkpoint that are not part of the model directory it also is.
TRAINER_FILES = (TRAINER_STATE, OPTIMIZER_FILE, RNG_FILE)


# --------------------------------------------------------------------------------------------
# Nested state <-> JSON + named tensors


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """JSON-able copy of `obj` with each tensor moved into `tensors` under a path-like key."""
    if isinstance(obj, torch.Tensor):
        key = path or "tensor"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {
                k: flatten_state(v, tensors, f"{path}/{k}" if path else k) for k, v in obj.items()
            }
        return {
            "__items__": [
                [k, flatten_state(v, tensors, f"{path}/{k}" if path else str(k))]
                for k, v in obj.items()
            ]
        }
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten_state(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"checkpoint state holds a {type(obj).__name__} at {path!r}")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: unflatten_state(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        if "__ndarray__" in obj:
            return np.array(obj["__ndarray__"], dtype=obj["dtype"])
        return {k: unflatten_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------
# RNG states


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from: Python, NumPy, torch CPU and CUDA."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# --------------------------------------------------------------------------------------------
# Finding checkpoints


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS)


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the committed checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, TRAINER_STATE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_checkpoint(output_dir: str, which: str = "latest") -> str:
    """The checkpoint directory `which` names: "latest", a step number, or a path."""
    if which in ("latest", ""):
        found = list_checkpoints(output_dir)
        if not found:
            raise ValueError(
                f"{checkpoint_root(output_dir)}: no checkpoint to resume from; run without "
                "--resume to start, or name a checkpoint directory"
            )
        return found[-1][1]
    if which.isdigit():
        path = os.path.join(checkpoint_root(output_dir), f"step-{int(which):07d}")
    else:
        path = which
    if not os.path.isfile(os.path.join(path, TRAINER_STATE)):
        raise ValueError(
            f"{path}: not a checkpoint (no {TRAINER_STATE}); --resume takes 'latest', a step or "
            "a checkpoint directory under output_dir/checkpoints"
        )
    return path


# --------------------------------------------------------------------------------------------
# Saving


def _full_state_dicts(wrapped, optimizer, ranks: Ranks):
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=ranks.distributed)
    model_sd = get_model_state_dict(wrapped, options=options)
    optim_sd = get_optimizer_state_dict(wrapped, optimizer, options=options)
    return model_sd, optim_sd


def _student_state_dict(model_sd: dict, student_model) -> dict:
    """StudentWithHead's keys ("model.<name>") as the transformers model's, ties removed."""
    sd = {k.removeprefix("model."): v.detach().cpu() for k, v in model_sd.items()}
    head = student_model.get_output_embeddings()
    if head is not None and head.weight is student_model.get_input_embeddings().weight:
        # Tied embeddings: one copy on disk; from_pretrained ties lm_head again.
        for name, module in student_model.named_modules():
            if module is head:
                sd.pop(f"{name}.weight", None)
    return sd


@dataclass
class SavedCheckpoint:
    path: str
    step: int


def save_checkpoint(
    output_dir: str,
    step: int,
    *,
    wrapped,
    student,
    optimizer,
    scheduler,
    rank_state: dict[str, Any],
    trainer_state: dict[str, Any],
    ranks: Ranks,
    keep: int = 0,
) -> SavedCheckpoint:
    """Write checkpoint `step` atomically (every rank calls this; rank 0 writes).

    `rank_state` is this rank's JSON-able state (its loader position); RNG states are added
    here. `keep` > 0 deletes all but the newest `keep` checkpoints afterwards.
    """
    model_sd, optim_sd = _full_state_dicts(wrapped, optimizer, ranks)
    per_rank = gather_objects({**rank_state, "rng": _rng_payload()}, ranks)
    path = os.path.join(checkpoint_root(output_dir), f"step-{step:07d}")
    if ranks.is_main:
        root = checkpoint_root(output_dir)
        os.makedirs(root, exist_ok=True)
        staging = os.path.join(root, f".step-{step:07d}.tmp-{uuid.uuid4().hex[:8]}")
        os.makedirs(staging)
        try:
            _write_checkpoint(
                staging,
                student=student,
                model_sd=model_sd,
                optim_sd=optim_sd,
                scheduler=scheduler,
                per_rank=per_rank,
                trainer_state={**trainer_state, "step": step},
            )
            _replace_dir(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if keep > 0:
            for _, old in list_checkpoints(output_dir)[:-keep]:
                _remove_dir(old)
    barrier(ranks)
    return SavedCheckpoint(path=path, step=step)


def _rng_payload() -> dict[str, Any]:
    tensors: dict[str, torch.Tensor] = {}
    state = flatten_state(rng_state(), tensors)
    return {"state": state, "tensors": tensors}


def _write_checkpoint(
    staging: str,
    *,
    student,
    model_sd: dict,
    optim_sd: dict,
    scheduler,
    per_rank: list[dict],
    trainer_state: dict,
) -> None:
    student.model.save_pretrained(
        staging, state_dict=_student_state_dict(model_sd, student.model), safe_serialization=True
    )
    student.tokenizer.save_pretrained(staging)
    optim_tensors: dict[str, torch.Tensor] = {}
    optim_json = flatten_state(optim_sd, optim_tensors)
    save_file(optim_tensors, os.path.join(staging, OPTIMIZER_FILE))
    rng_tensors: dict[str, torch.Tensor] = {}
    ranks_json = []
    for r, entry in enumerate(per_rank):
        entry = dict(entry)
        rng = entry.pop("rng")
        for key, tensor in rng["tensors"].items():
            rng_tensors[f"rank{r}/{key}"] = tensor
        ranks_json.append({**entry, "rng": rng["state"], "rng_prefix": f"rank{r}/"})
    save_file(rng_tensors, os.path.join(staging, RNG_FILE))
    sched_tensors: dict[str, torch.Tensor] = {}
    document = {
        "format": STATE_FORMAT,
        **trainer_state,
        "scheduler": flatten_state(scheduler.state_dict(), sched_tensors),
        "optimizer": optim_json,
        "ranks": ranks_json,
    }
    if sched_tensors:
        raise TypeError("the learning-rate scheduler's state holds tensors")
    # Written last: a directory holding trainer_state.json is complete.
    _write_json(os.path.join(staging, TRAINER_STATE), document)


def _write_json(path: str, document: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _replace_dir(staging: str, path: str) -> None:
    old = None
    if os.path.exists(path):
        old = f"{os.path.dirname(path)}/.old-{os.path.basename(path)}-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
    os.rename(staging, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_dir(path: str) -> None:
    """Rename away first, so a half-deleted directory never looks like a checkpoint."""
    trash = f"{os.path.dirname(path)}/.trash-{os.path.basename(path)}-{uuid.uuid4().hex[:8]}"
    with contextlib.suppress(OSError):
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def clean_staging(output_dir: str) -> None:
    """Remove what an interrupted save or delete left behind (hidden directories)."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if name.startswith((".step-", ".old-", ".trash-")):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def export_model(checkpoint: str, out_dir: str) -> str:
    """The model directory inside a checkpoint as `out_dir` (hard links where possible),
    replaced atomically."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    staging = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(staging)
    try:
        for name in os.listdir(checkpoint):
            if name in TRAINER_FILES:
                continue
            src, dst = os.path.join(checkpoint, name), os.path.join(staging, name)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        _replace_dir(staging, os.path.abspath(out_dir))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


# --------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedCheckpoint:
    path: str
    state: dict[str, Any]  # trainer_state.json
    optimizer: dict[str, Any]  # a full optimizer state dict (parameter names as keys)
    scheduler: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def rank(self, rank: int) -> dict[str, Any]:
        ranks = self.state["ranks"]
        if rank >= len(ranks):
            raise ValueError(
                f"{self.path}: written by {len(ranks)} ranks, resumed with more; resume with "
                "the same number of processes"
            )
        return ranks[rank]


def load_checkpoint(path: str) -> LoadedCheckpoint:
    """Read a checkpoint's trainer state and optimizer state (no pickle anywhere)."""
    with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as f:
        state = json.load(f)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(
            f"{path}: trainer state format {state.get('format')!r}, this kd reads {STATE_FORMAT}"
        )
    optim_tensors = load_file(os.path.join(path, OPTIMIZER_FILE))
    optimizer = unflatten_state(state.pop("optimizer"), optim_tensors)
    scheduler = unflatten_state(state.pop("scheduler"), {})
    return LoadedCheckpoint(path=path, state=state, optimizer=optimizer, scheduler=scheduler)


def restore_rank_rng(checkpoint: LoadedCheckpoint, rank: int) -> None:
    entry = checkpoint.rank(rank)
    tensors = load_file(os.path.join(checkpoint.path, RNG_FILE))
    prefix = entry["rng_prefix"]
    mine = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    set_rng_state(unflatten_state(entry["rng"], mine))


def restore_optimizer(wrapped, optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(
        wrapped, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
    )
