"""Structured pruning of a teacher into a student (Minitron): activation importance on a small
calibration set, then the least important layers, heads, neurons and channels cut away.

    from kd.prune import prune_model
    result = prune_model("teacher/", "calib.jsonl", "student/", params="50%", method="width")

Modules: shapes (target shapes, parameter counts, the budget rule), calibration (sequences and
batches), importance (hooks and scores), plan (what to keep), slicing (the pruned weights),
pipeline (prune_model and the report). docs/kd-prune.md explains the choices.
"""

from .calibration import Calibration, is_cache, load_calibration
from .importance import (
    DEPTH_METRICS,
    Importance,
    collect_importance,
    heldout_loss,
    layer_loss_importance,
    random_importance,
)
from .pipeline import REPORT_NAME, SELECTIONS, PruneResult, prune_model
from .plan import PrunePlan, choose_heads, make_plan
from .shapes import (
    ARCHITECTURES,
    METHODS,
    PARAMS_SCOPES,
    ParamCount,
    Shape,
    ShapeError,
    count_parameters,
    parse_param_count,
    resolve_target,
    shape_for_params,
    shape_of,
)
from .slicing import slice_model

__all__ = [
    "ARCHITECTURES",
    "DEPTH_METRICS",
    "METHODS",
    "PARAMS_SCOPES",
    "REPORT_NAME",
    "SELECTIONS",
    "Calibration",
    "Importance",
    "ParamCount",
    "PrunePlan",
    "PruneResult",
    "Shape",
    "ShapeError",
    "choose_heads",
    "collect_importance",
    "count_parameters",
    "heldout_loss",
    "is_cache",
    "layer_loss_importance",
    "load_calibration",
    "make_plan",
    "parse_param_count",
    "prune_model",
    "random_importance",
    "resolve_target",
    "shape_for_params",
    "shape_of",
    "slice_model",
]
