"""prune_model: teacher + calibration data + target -> a pruned student directory and its report.

The steps, each in its own module: resolve the target shape (shapes), read calibration
sequences (calibration), score every unit with hooks (importance), choose what to keep (plan),
cut the weights (slicing), and save the directory with `prune_report.json` atomically.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..data import Example
from ..models import LoadedModel, load_model, save_hf
from .calibration import (
    DEFAULT_BATCH_TOKENS,
    DEFAULT_MAX_LENGTH,
    Calibration,
    load_calibration,
)
from .importance import (
    DEPTH_METRICS,
    Importance,
    collect_importance,
    layer_loss_importance,
    random_importance,
)
from .plan import PrunePlan, make_plan
from .shapes import Shape, architecture, count_parameters, resolve_target, shape_of
from .slicing import slice_model

REPORT_NAME = "prune_report.json"
SELECTIONS = ("activation", "random")


@dataclass
class PruneResult:
    model: Any  # the pruned transformers model, in eval mode, on the teacher's device
    tokenizer: Any
    plan: PrunePlan
    importance: Importance
    report: dict
    out: str | None  # the directory written, if any

    @property
    def shape(self) -> Shape:
        return self.plan.shape


def prune_model(
    model: str | LoadedModel,
    calib: str | Calibration | Sequence[Example] | None,
    out: str | None = None,
    *,
    method: str | None = None,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    params: str | int | float | None = None,
    params_scope: str = "total",
    depth_metric: str = "cosine",
    calib_samples: int | None = None,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    chat_template: bool = False,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    importance: Importance | None = None,
    selection: str = "activation",
    seed: int = 0,
    tokenizer: str | None = None,
    device: str = "cpu",
    dtype: str | None = "float32",
    trust_remote_code: bool = False,
    storage_options: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> PruneResult:
    """Prune `model` (a path: transformers directory or .gguf, or a LoadedModel) to a target.

    The target is explicit dimensions (`num_layers`, `hidden_size`, `intermediate_size`,
    `num_heads`, `num_kv_heads`; those left out keep the teacher's) or a parameter budget
    `params` ("60M", 45_000_000, "50%") counted over `params_scope` ("total" or
    "non-embedding"); see `shapes.resolve_target`. `calib` is SFT data or a logit cache (path
    or URL), a loaded Calibration, or a list of Examples. `importance` reuses scores already
    measured on this teacher (several targets from one pass); `selection="random"` keeps
    random units instead (a baseline; needs no calibration). With `out`, the pruned model, the
    teacher's tokenizer and prune_report.json are written there atomically.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection {selection!r}: choose one of {SELECTIONS}")
    if depth_metric not in DEPTH_METRICS:
        raise ValueError(f"--depth-metric {depth_metric!r}: choose one of {DEPTH_METRICS}")
    if out is not None and os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out}: already exists; pass --overwrite to replace it")
    loaded = model
    if not isinstance(model, LoadedModel):
        loaded = load_model(
            model,
            device=device,
            dtype=dtype,
            tokenizer=tokenizer,
            trust_remote_code=trust_remote_code,
        )
    teacher = loaded.model
    config = teacher.config
    architecture(config)  # a clear "not supported" before any work
    teacher_shape = shape_of(config)
    method, target = resolve_target(
        config,
        method=method,
        num_layers=num_layers,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        params=params,
        params_scope=params_scope,
    )
    timings: dict[str, float] = {}
    calibration = None
    if selection == "random":
        importance = random_importance(teacher_shape, seed)
    elif importance is None:
        if calib is None:
            raise ValueError("activation importance needs calibration data (--calib)")
        calibration = _calibration(
            calib, loaded, calib_samples, max_length, chat_template, storage_options
        )
        pad_id = loaded.tokenizer.pad_token_id or 0
        start = time.perf_counter()
        importance = collect_importance(
            teacher,
            calibration.examples,
            batch_tokens=batch_tokens,
            pad_id=pad_id,
            progress=progress,
        )
        if depth_metric == "loss" and target.num_layers < teacher_shape.num_layers:
            scores = layer_loss_importance(
                teacher,
                calibration.examples,
                batch_tokens=batch_tokens,
                pad_id=pad_id,
                progress=progress,
            )
            importance = replace(importance, layers=scores, layer_metric="loss")
        timings["importance"] = round(time.perf_counter() - start, 3)
    _check_importance(importance, teacher_shape)
    start = time.perf_counter()
    plan = make_plan(importance, teacher_shape, target)
    pruned = slice_model(teacher, plan)
    timings["slicing"] = round(time.perf_counter() - start, 3)
    report = build_report(
        loaded, plan, importance, method, selection, calibration, timings, params, params_scope
    )
    if selection == "random":
        report["seed"] = seed
    written = None
    if out is not None:
        text = json.dumps(report, indent=1) + "\n"
        written = save_hf(
            pruned, loaded.tokenizer, out, overwrite=overwrite, extra_files={REPORT_NAME: text}
        )
    return PruneResult(pruned, loaded.tokenizer, plan, importance, report, written)


def _calibration(calib, loaded, samples, max_length, chat_template, storage_options):
    if isinstance(calib, Calibration):
        return calib
    if isinstance(calib, str):
        from ..models import embedding_rows

        return load_calibration(
            calib,
            loaded.tokenizer,
            samples=samples,
            max_length=max_length,
            chat_template=chat_template,
            vocab_rows=embedding_rows(loaded.model),
            storage_options=storage_options,
        )
    examples = list(calib)[: samples if samples is not None else None]
    return Calibration(examples, "<examples>", "examples")


def _check_importance(importance: Importance, shape: Shape) -> None:
    expected = {
        "layers": (shape.num_layers,),
        "heads": (shape.num_layers, shape.num_heads),
        "neurons": (shape.num_layers, shape.intermediate_size),
        "final_channels": (shape.hidden_size,),
    }
    for name, dims in expected.items():
        got = tuple(getattr(importance, name).shape)
        if got != dims:
            raise ValueError(
                f"importance.{name} has shape {got}, this teacher needs {dims}: the scores were "
                "measured on another model"
            )


def build_report(
    loaded: LoadedModel,
    plan: PrunePlan,
    importance: Importance,
    method: str,
    selection: str,
    calibration: Calibration | None,
    timings: dict,
    params,
    params_scope: str,
) -> dict:
    """What prune_report.json holds: where the student came from and every choice made."""
    config = loaded.model.config
    teacher_count = count_parameters(config)
    pruned_count = count_parameters(config, plan.shape)
    return {
        "teacher": loaded.identity,
        "architecture": config.model_type,
        "method": method,
        "selection": selection,
        "target": {"params": None if params is None else str(params), "scope": params_scope},
        "shapes": {"teacher": shape_of(config).as_dict(), "pruned": plan.shape.as_dict()},
        "parameters": {
            "teacher": teacher_count.as_dict(),
            "pruned": pruned_count.as_dict(),
            "fraction_total": round(pruned_count.total / teacher_count.total, 6),
            "fraction_non_embedding": round(
                pruned_count.non_embedding / teacher_count.non_embedding, 6
            ),
        },
        "calibration": calibration.describe() if calibration is not None else None,
        "kept": plan.as_report(),
        "importance": importance.as_report(),
        "seconds": timings,
    }
