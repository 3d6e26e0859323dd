"""Shapes of Llama-family models: what a target shape may be, what it costs in parameters, and
the documented rule that turns a parameter budget into a shape.

A shape is the handful of numbers pruning changes (layers, hidden size, MLP width, query and
key/value heads); head_dim never changes, since rotary embeddings are laid out per head.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

METHODS = ("width", "depth", "both")
PARAMS_SCOPES = ("total", "non-embedding")
SHAPE_OPTIONS = {  # Shape field -> the CLI option that sets it (for error messages)
    "num_layers": "--layers",
    "hidden_size": "--hidden-size",
    "intermediate_size": "--intermediate-size",
    "num_heads": "--num-heads",
    "num_kv_heads": "--num-kv-heads",
}
WIDTH_FIELDS = ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads")


class ShapeError(ValueError):
    """A target shape or parameter budget the teacher cannot be pruned to; says why and the fix."""


HIDDEN_RULES = ("free", "divisible", "equal")


@dataclass(frozen=True)
class Architecture:
    """What pruning needs to know about a transformers architecture beyond its config."""

    model_type: str
    # How the hidden size relates to the heads. "free": the config declares head_dim, any
    # hidden size works. "divisible": head_dim is declared, but the config class still refuses
    # a hidden size that the head count does not divide (transformers' LlamaConfig).
    # "equal": no head_dim field, every reader derives it as hidden / heads, so hidden must be
    # exactly heads x head_dim (Qwen2).
    hidden_rule: str
    biases: str  # "config": attention_bias / mlp_bias flags; "qkv": q, k, v always; "": none

    @property
    def head_dim_in_config(self) -> bool:
        return self.hidden_rule != "equal"


# Llama, Mistral and Qwen2 share one layout: embed_tokens, layers of (input_layernorm,
# self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj), norm, lm_head.
ARCHITECTURES = {
    "llama": Architecture("llama", hidden_rule="divisible", biases="config"),
    "mistral": Architecture("mistral", hidden_rule="free", biases=""),
    "qwen2": Architecture("qwen2", hidden_rule="equal", biases="qkv"),
}


def architecture(config) -> Architecture:
    """The Architecture of a transformers config; ShapeError for one pruning does not support."""
    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise ShapeError(
            f"pruning {model_type or type(config).__name__} models is not supported; supported "
            f"architectures: {', '.join(sorted(ARCHITECTURES))}"
        )
    return arch


@dataclass(frozen=True)
class Shape:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"{self.num_layers} layer{'s' if self.num_layers != 1 else ''}, hidden "
            f"{self.hidden_size}, MLP {self.intermediate_size}, "
            f"{self.num_heads} heads / {self.num_kv_heads} kv heads of {self.head_dim}"
        )


def shape_of(config) -> Shape:
    heads = int(config.num_attention_heads)
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Shape(
        num_layers=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size),
        intermediate_size=int(config.intermediate_size),
        num_heads=heads,
        num_kv_heads=int(kv),
        head_dim=int(head_dim),
    )


# --------------------------------------------------------------------------------------------
# Parameter counts


@dataclass(frozen=True)
class ParamCount:
    """Parameters of a model, tied embeddings counted once. `embedding` is the input embedding
    plus an untied output embedding; `non_embedding` is everything else (layers, final norm)."""

    total: int
    embedding: int
    non_embedding: int

    def scoped(self, scope: str) -> int:
        return self.total if scope == "total" else self.non_embedding

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _biases(arch: Architecture, config) -> tuple[bool, bool, bool, bool]:
    """(q/k/v bias, o_proj bias, gate/up bias, down_proj bias) for this config."""
    if arch.biases == "qkv":
        return True, False, False, False
    if arch.biases == "config":
        attention = bool(getattr(config, "attention_bias", False))
        mlp = bool(getattr(config, "mlp_bias", False))
        return attention, attention, mlp, mlp
    return False, False, False, False


def count_parameters(config, shape: Shape | None = None) -> ParamCount:
    """Exact parameter count of `config`'s model at `shape` (default: the config's own)."""
    arch = architecture(config)
    s = shape or shape_of(config)
    qkv_bias, o_bias, up_bias, down_bias = _biases(arch, config)
    h, d = s.hidden_size, s.head_dim
    q_out, kv_out = s.num_heads * d, s.num_kv_heads * d
    attention = h * q_out + 2 * h * kv_out + q_out * h
    attention += (q_out + 2 * kv_out) * qkv_bias + h * o_bias
    mlp = 3 * h * s.intermediate_size + 2 * s.intermediate_size * up_bias + h * down_bias
    layer = attention + mlp + 2 * h  # two RMSNorm weights
    tied = bool(getattr(config, "tie_word_embeddings", False))
    embedding = int(config.vocab_size) * h * (1 if tied else 2)
    non_embedding = s.num_layers * layer + h  # + final norm
    return ParamCount(embedding + non_embedding, embedding, non_embedding)


def parse_param_count(text: str | int | float) -> tuple[int | None, float | None]:
    """'45M', '1.5B', '45000000' -> (count, None); '50%' or '0.5' -> (None, fraction)."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        text = repr(text)
    value = str(text).strip().replace("_", "").replace(",", "")
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([kKmMbBgG%]?)", value)
    if not match:
        raise ShapeError(
            f"parameter target {text!r}: write a count (60000000, 60M, 1.2B) or a fraction of "
            "the teacher (50% or 0.5)"
        )
    number, suffix = float(match.group(1)), match.group(2).lower()
    if suffix == "%" or (not suffix and number < 1):
        fraction = number / 100 if suffix == "%" else number
        if not 0 < fraction <= 1:
            raise ShapeError(f"parameter target {text!r}: a fraction must be in (0, 100%]")
        return None, fraction
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}[suffix]
    count = int(round(number * scale))
    if count < 1:
        raise ShapeError(f"parameter target {text!r}: must be at least 1")
    return count, None


# --------------------------------------------------------------------------------------------
# Validating a target shape


def check_target(config, target: Shape) -> None:
    """ShapeError naming the option and the fix when `target` cannot be cut from the teacher.

    Every target dimension is at most the teacher's; key/value heads divide query heads; and
    since a kept query head can only use the key/value head of its own teacher group, a target
    group (heads / kv heads) is at most the teacher's group.
    """
    arch = architecture(config)
    teacher = shape_of(config)
    for name, option in SHAPE_OPTIONS.items():
        value, limit = getattr(target, name), getattr(teacher, name)
        if not isinstance(value, int) or value < 1:
            raise ShapeError(f"{option} {value!r}: must be a positive integer")
        if value > limit:
            raise ShapeError(
                f"{option} {value}: the teacher has only {limit}; pruning can only remove, so "
                f"choose at most {limit}"
            )
    if target.head_dim != teacher.head_dim:
        raise ShapeError(
            f"head_dim {target.head_dim}: pruning keeps the teacher's {teacher.head_dim}"
        )
    if target.num_heads % target.num_kv_heads:
        raise ShapeError(
            f"--num-kv-heads {target.num_kv_heads} does not divide --num-heads "
            f"{target.num_heads}: grouped-query attention shares each key/value head between "
            "an equal number of query heads; choose kv heads that divide the heads"
        )
    if target.group_size > teacher.group_size:
        raise ShapeError(
            f"--num-heads {target.num_heads} with --num-kv-heads {target.num_kv_heads} puts "
            f"{target.group_size} query heads on each key/value head, but the teacher has "
            f"{teacher.group_size} per group and a kept query head keeps its own key/value head; "
            f"keep at least {math.ceil(target.num_heads / teacher.group_size)} kv heads or "
            f"fewer query heads"
        )
    if arch.hidden_rule == "divisible" and target.hidden_size % target.num_heads:
        raise ShapeError(
            f"--hidden-size {target.hidden_size} is not a multiple of --num-heads "
            f"{target.num_heads}: transformers' {arch.model_type} config requires hidden_size "
            f"to be divisible by num_attention_heads (head_dim stays {teacher.head_dim}); "
            f"choose a multiple of {target.num_heads}, e.g. "
            f"{_round_to(target.hidden_size, target.num_heads) or target.num_heads}"
        )
    if arch.hidden_rule == "equal" and target.hidden_size != target.num_heads * teacher.head_dim:
        raise ShapeError(
            f"--hidden-size {target.hidden_size} with --num-heads {target.num_heads}: "
            f"{arch.model_type} configs have no head_dim field, so head_dim is read as "
            f"hidden_size / num_attention_heads and must stay {teacher.head_dim}; choose "
            f"--hidden-size {target.num_heads * teacher.head_dim} (= heads x {teacher.head_dim})"
        )


# --------------------------------------------------------------------------------------------
# From options to a target shape


def resolve_target(
    config,
    *,
    method: str | None = None,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    params: str | int | float | None = None,
    params_scope: str = "total",
) -> tuple[str, Shape]:
    """(method, target shape) from explicit dimensions or a parameter budget, validated.

    Dimensions left out keep the teacher's value. Without `method`, it follows from the
    dimensions given (only layers: depth; only widths: width; both kinds: both), and a
    parameter budget defaults to width, which Minitron found best at these sizes.
    """
    architecture(config)
    teacher = shape_of(config)
    if method is not None and method not in METHODS:
        raise ShapeError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if params_scope not in PARAMS_SCOPES:
        raise ShapeError(f"--params-scope {params_scope!r}: choose one of {PARAMS_SCOPES}")
    given = {
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if params is not None:
        if given:
            options = ", ".join(SHAPE_OPTIONS[k] for k in given)
            raise ShapeError(
                f"pass either a parameter target (--params) or target dimensions ({options}), "
                "not both"
            )
        method = method or "width"
        budget = _budget(config, params, params_scope)
        return method, shape_for_params(config, budget, method=method, scope=params_scope)
    if not given:
        raise ShapeError(
            "no target: pass target dimensions (--layers, --hidden-size, --intermediate-size, "
            "--num-heads, --num-kv-heads) or a parameter target (--params)"
        )
    changes_depth = "num_layers" in given and given["num_layers"] != teacher.num_layers
    changes_width = any(
        given.get(k, getattr(teacher, k)) != getattr(teacher, k) for k in WIDTH_FIELDS
    )
    if method is None:
        method = (
            "both" if changes_depth and changes_width else "depth" if changes_depth else "width"
        )
    if method == "depth" and changes_width:
        options = ", ".join(SHAPE_OPTIONS[k] for k in WIDTH_FIELDS if k in given)
        raise ShapeError(f"--method depth removes layers only; drop {options} or use --method both")
    if method == "width" and changes_depth:
        raise ShapeError("--method width keeps every layer; drop --layers or use --method both")
    fields = teacher.as_dict() | given
    if "num_heads" in given and "num_kv_heads" not in given:
        # Fewer query heads alone: keep every kv head when the groups still divide evenly.
        fields["num_kv_heads"] = _default_kv_heads(teacher, given["num_heads"])
    if architecture(config).hidden_rule == "equal" and "hidden_size" not in given:
        fields["hidden_size"] = fields["num_heads"] * teacher.head_dim
    target = Shape(**fields)
    check_target(config, target)
    return method, target


def _default_kv_heads(teacher: Shape, heads: int) -> int:
    """The most kv heads (at most the teacher's) that divide `heads` in groups it can form."""
    for kv in range(min(teacher.num_kv_heads, heads), 0, -1):
        if heads % kv == 0 and heads // kv <= teacher.group_size:
            return kv
    return teacher.num_kv_heads  # check_target explains why no split works


def _budget(config, params, scope: str) -> int:
    count, fraction = parse_param_count(params)
    teacher = count_parameters(config).scoped(scope)
    if fraction is not None:
        count = int(teacher * fraction)
    if count > teacher:
        raise ShapeError(
            f"--params {params}: the teacher has only {teacher:,} {scope} parameters; pruning "
            "can only remove"
        )
    return count


def _step(size: int, multiple_of: int = 1) -> int:
    """The step a width takes under a parameter budget: a multiple of `multiple_of` and of 64
    (so matrix kernels stay efficient), or of 8, or of nothing more, whichever first leaves at
    least 16 sizes to choose from below `size` (coarse steps land far from the budget)."""
    for align in (64, 8, 1):
        step = math.lcm(align, multiple_of)
        if size // step >= 16:
            return step
    return step


def hidden_step(arch: Architecture, teacher: Shape) -> int:
    """Hidden sizes a parameter budget may choose are the multiples of this."""
    if arch.hidden_rule == "equal":
        return teacher.head_dim
    return _step(teacher.hidden_size, teacher.num_heads if arch.hidden_rule == "divisible" else 1)


def shape_for_params(config, budget: int, *, method: str, scope: str = "total") -> Shape:
    """The shape a parameter budget buys, by the documented rule (docs/kd-prune.md):

    - depth: the most layers whose model fits the budget; widths unchanged.
    - width: layers and attention heads kept; the hidden size is the largest multiple of
      `hidden_step` whose model fits with the MLP scaled by the same factor (rounded to its
      step), then the MLP grows back step by step while it still fits. A step is a multiple
      of 64 (efficient matrix kernels), else of 8, else of 1, whichever first leaves at least
      16 sizes below the teacher's; a Llama hidden size is also a multiple of the head count
      (its config requires it). Where the config derives head_dim from the hidden size (Qwen2)
      the hidden size moves in steps of head_dim and query heads follow it (hidden /
      head_dim), with as many kv heads kept as divide them.
    - both: the number of layers scales by the square root of the budget's fraction of the
      teacher, then the width rule fills the budget at that depth.
    """
    if method not in METHODS:
        raise ShapeError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    teacher = shape_of(config)
    full = count_parameters(config).scoped(scope)

    def fits(shape: Shape) -> bool:
        return count_parameters(config, shape).scoped(scope) <= budget

    if fits(teacher):
        return teacher
    if method == "depth":
        for layers in range(teacher.num_layers - 1, 0, -1):
            shape = _replace(teacher, num_layers=layers)
            if fits(shape):
                return shape
        raise _too_small(config, budget, scope, _replace(teacher, num_layers=1))
    layers = teacher.num_layers
    if method == "both":
        layers = min(
            teacher.num_layers, max(1, round(teacher.num_layers * math.sqrt(budget / full)))
        )
    return _width_for_params(config, teacher, layers, fits, budget, scope)


def _width_for_params(config, teacher: Shape, layers: int, fits, budget: int, scope: str) -> Shape:
    arch = architecture(config)
    step = hidden_step(arch, teacher)
    mlp_step = _step(teacher.intermediate_size)
    ratio = teacher.intermediate_size / teacher.hidden_size
    smallest = None
    for hidden in range((teacher.hidden_size // step) * step, 0, -step):
        heads, kv = teacher.num_heads, teacher.num_kv_heads
        if arch.hidden_rule == "equal":
            heads = hidden // teacher.head_dim
            kv = _default_kv_heads(teacher, heads)
            if heads % kv or heads // kv > teacher.group_size:
                continue
        mlp = min(teacher.intermediate_size, max(mlp_step, _round_to(hidden * ratio, mlp_step)))
        shape = Shape(layers, hidden, mlp, heads, kv, teacher.head_dim)
        smallest = shape
        if not fits(shape):
            continue
        while mlp + mlp_step <= teacher.intermediate_size:
            wider = _replace(shape, intermediate_size=mlp + mlp_step)
            if not fits(wider):
                break
            shape, mlp = wider, mlp + mlp_step
        return shape
    raise _too_small(config, budget, scope, smallest or teacher)


def _too_small(config, budget: int, scope: str, smallest: Shape) -> ShapeError:
    need = count_parameters(config, smallest).scoped(scope)
    return ShapeError(
        f"--params {budget:,} ({scope}): the smallest shape this method reaches "
        f"({smallest.describe()}) has {need:,}; raise the target, or use --method both or "
        "explicit dimensions"
    )


def _round_to(value: float, step: int) -> int:
    return int(round(value / step)) * step


def _replace(shape: Shape, **changes) -> Shape:
    return Shape(**(shape.as_dict() | changes))
