"""The data and loss plan of a `kd train` run: sources (a mixture of caches) and stages.

A run trains on one cache (`cache`), on a mixture of caches (`sources`: each a cache with a
sampling weight and its own loss settings), or in stages run one after another (`stages`: each
with its own data, steps, learning-rate schedule and loss settings), as in the general phase
followed by a domain-alignment phase of Kothari et al. (2024). Every form resolves to a list of
`Stage`s, each holding a full TrainConfig and its `Source`s, so the trainer has one shape to run:

    stage keys      = the run's keys, overridden by the stage table
    source settings = the stage's keys, overridden by the source table (loss keys only)

Tables are checked as strictly as the flat keys: an unknown key, a wrong type or a value out of
range is an error naming the stage, the source and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass
from typing import Any

# Keys a source table may set besides its cache, name and weight: the loss of its records.
LOSS_KEYS = ("mode", "kd_weight", "sft_weight", "temperature", "scale_by_t2", "beta", "k")
SOURCE_KEYS = ("name", "cache", "weight", *LOSS_KEYS)
# Keys a stage table may set: its data, its length, its learning-rate schedule, its loss.
STAGE_KEYS = (
    "name",
    "cache",
    "sources",
    "max_steps",
    "epochs",
    "lr",
    "lr_schedule",
    "warmup_steps",
    "min_lr_ratio",
    *LOSS_KEYS,
)


@dataclass(frozen=True)
class Source:
    """One cache of a stage: what share of the records it supplies and how they are scored."""

    name: str
    cache: str
    weight: float  # sampling proportion, normalised over the stage's sources
    config: Any  # TrainConfig: the stage's keys with this source's loss keys applied


@dataclass(frozen=True)
class Stage:
    """A stretch of optimizer steps with one data mixture, one schedule and one loss plan."""

    index: int
    name: str  # "" for a run without stages
    config: Any  # TrainConfig with the stage's keys applied (stages and sources cleared)
    sources: tuple[Source, ...]
    mixture: bool  # the data was given as `sources` (per-source metrics are reported)

    @property
    def label(self) -> str:
        return f"stage {self.name!r}" if self.name else "the run"


class PlanError(ValueError):
    """A `sources` or `stages` table that cannot run; the message names the table and key."""


def plan_stages(config) -> list[Stage]:
    """The stages of `config`: one for a plain run or a mixture, else one per `stages` table.

    Raises PlanError (a ValueError) naming the stage, source and key at fault.
    """
    if config.stages:
        if config.max_steps:
            raise PlanError(
                "max_steps is set for the whole run and stages are given: each stage sets its "
                "own max_steps (or epochs); remove the top-level max_steps"
            )
        tables = [_table(t, f"stages[{i}]", STAGE_KEYS) for i, t in enumerate(config.stages)]
        names = [str(t.get("name") or f"stage-{i + 1}") for i, t in enumerate(tables)]
        _unique(names, "stages", "stages")
        return [_stage(config, i, names[i], t) for i, t in enumerate(tables)]
    return [_stage(config, 0, "", {})]


def _stage(config, index: int, name: str, table: dict) -> Stage:
    from .config import ConfigError, validate_values

    where = f"stage {name!r}" if name else "the run"
    if table and not (table.get("max_steps") or table.get("epochs")):
        raise PlanError(f"{where}: set max_steps (optimizer steps) or epochs for the stage")
    overrides = {k: v for k, v in table.items() if k not in ("name", "cache", "sources")}
    if table:
        # A stage's length is its own: the run's epochs do not leak into a stage of steps.
        overrides.setdefault("epochs", 0.0)
        overrides.setdefault("max_steps", 0)
    cache = table.get("cache", config.cache if "sources" not in table else "")
    source_tables = table.get("sources", config.sources if "cache" not in table else [])
    if cache and source_tables:
        raise PlanError(f"{where}: give either cache (one cache) or sources (a mixture), not both")
    if not cache and not source_tables:
        raise PlanError(
            f"{where}: no training data; set cache = URL or sources = [{{cache = URL, "
            "weight = 1.0}, ...]"
        )
    try:
        stage_config = dataclasses.replace(
            config, **_typed(overrides, where), cache=cache, sources=[], stages=[]
        )
        validate_values(stage_config)
    except ConfigError as exc:
        raise PlanError(f"{where}: {exc}") from None
    if not source_tables:
        source = Source(name=_default_name(cache), cache=cache, weight=1.0, config=stage_config)
        return Stage(index, name, stage_config, (source,), mixture=False)
    if not isinstance(source_tables, list) or not source_tables:
        raise PlanError(f"{where}: sources must be a non-empty list of tables")
    sources = [
        _source(stage_config, _table(t, f"{where} sources[{i}]", SOURCE_KEYS), where)
        for i, t in enumerate(source_tables)
    ]
    _unique([s.name for s in sources], "sources", where)
    total = sum(s.weight for s in sources)
    sources = [dataclasses.replace(s, weight=s.weight / total) for s in sources]
    return Stage(index, name, stage_config, tuple(sources), mixture=True)


def _source(stage_config, table: dict, where: str) -> Source:
    from .config import ConfigError, validate_values

    cache = table.get("cache")
    if not isinstance(cache, str) or not cache:
        raise PlanError(f"{where}: every source needs cache = URL (a logit cache)")
    name = str(table.get("name") or _default_name(cache))
    here = f"{where} source {name!r}"
    weight = table.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise PlanError(f"{here}: weight must be a number, got {weight!r}")
    if not (math.isfinite(weight) and weight > 0):
        raise PlanError(f"{here}: weight is {weight}; it must be a finite number > 0")
    loss = {k: table[k] for k in LOSS_KEYS if k in table}
    try:
        config = dataclasses.replace(stage_config, **_typed(loss, here), cache=cache)
        validate_values(config)
    except ConfigError as exc:
        raise PlanError(f"{here}: {exc}") from None
    return Source(name=name, cache=cache, weight=float(weight), config=config)


def _table(value: Any, where: str, allowed: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise PlanError(f"{where} must be a table ({{key = value, ...}}), got {value!r}")
    for key in value:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PlanError(f"{where}: unknown key {key!r}{hint}; allowed: {', '.join(allowed)}")
    return value


def _typed(values: dict, where: str) -> dict:
    """Table values with the kinds of the flat keys (an integer where a float is expected)."""
    from .config import ConfigError, _from_toml

    try:
        return {k: _from_toml(k, v, where) for k, v in values.items()}
    except ConfigError as exc:
        raise PlanError(str(exc)) from None


def _unique(names: list[str], what: str, where: str) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise PlanError(f"{where}: two {what} are named {name!r}; give each its own name")
        seen.add(name)


def _default_name(cache: str) -> str:
    return os.path.basename(cache.rstrip("/")) or cache


def comparable(tables: list) -> list:
    """Stage or source tables without cache URLs: a resumed run may read a cache moved elsewhere
    (as the flat `cache` key may change), but not a different mixture."""
    out = []
    for table in tables:
        if isinstance(table, dict):
            table = {
                k: comparable(v) if k == "sources" and isinstance(v, list) else v
                for k, v in table.items()
                if k != "cache"
            }
        out.append(table)
    return out
