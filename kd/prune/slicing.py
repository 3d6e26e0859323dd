"""Cut a pruned model out of the teacher: a config with the new shape and the teacher's weights
at the kept rows and columns, nothing retrained. Every parameter name must match a slicing rule,
so a layout this module does not know (an extra norm, a new projection) fails loudly.
"""

from __future__ import annotations

import copy
import json
import re

from .plan import PrunePlan
from .shapes import architecture, count_parameters, shape_of

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# parameter suffix -> (index of dim 0, index of dim 1): which kept set slices each dimension.
# "q"/"kv" expand heads to their head_dim rows; "hidden" is the kept channels.
_LAYER_RULES = {
    "input_layernorm.weight": ("hidden",),
    "post_attention_layernorm.weight": ("hidden",),
    "self_attn.q_proj.weight": ("q", "hidden"),
    "self_attn.q_proj.bias": ("q",),
    "self_attn.k_proj.weight": ("kv", "hidden"),
    "self_attn.k_proj.bias": ("kv",),
    "self_attn.v_proj.weight": ("kv", "hidden"),
    "self_attn.v_proj.bias": ("kv",),
    "self_attn.o_proj.weight": ("hidden", "q"),
    "self_attn.o_proj.bias": ("hidden",),
    "mlp.gate_proj.weight": ("neurons", "hidden"),
    "mlp.gate_proj.bias": ("neurons",),
    "mlp.up_proj.weight": ("neurons", "hidden"),
    "mlp.up_proj.bias": ("neurons",),
    "mlp.down_proj.weight": ("hidden", "neurons"),
    "mlp.down_proj.bias": ("hidden",),
}
_MODEL_RULES = {
    "model.embed_tokens.weight": (None, "hidden"),
    "model.norm.weight": ("hidden",),
    "lm_head.weight": (None, "hidden"),
    "lm_head.bias": (None,),
}


def pruned_config(config, plan: PrunePlan):
    """The teacher's config with the plan's shape (and per-layer lists cut to the kept layers)."""
    arch = architecture(config)
    data = json.loads(config.to_json_string(use_diff=False))
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        data.pop(key, None)
    s = plan.shape
    data.update(
        num_hidden_layers=s.num_layers,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_kv_heads,
    )
    if arch.head_dim_in_config:
        data["head_dim"] = s.head_dim  # explicit: hidden / heads need not give it any more
    if isinstance(data.get("layer_types"), list):
        data["layer_types"] = [data["layer_types"][i] for i in plan.layers]
    if "max_window_layers" in data and data["max_window_layers"] is not None:
        data["max_window_layers"] = sum(1 for i in plan.layers if i < data["max_window_layers"])
    return type(config).from_dict(data)


def _index(plan: PrunePlan, position: int, kind: str | None, head_dim: int):
    import torch

    if kind is None:
        return None
    if kind == "hidden":
        values = plan.channels
    elif kind == "neurons":
        values = plan.neurons[position]
    else:
        heads = plan.heads[position] if kind == "q" else plan.kv_heads[position]
        values = [h * head_dim + j for h in heads for j in range(head_dim)]
    return torch.tensor(values, dtype=torch.long)


def _cut(tensor, indices):
    for dim, index in enumerate(indices):
        if index is not None:
            tensor = tensor.index_select(dim, index.to(tensor.device))
    return tensor.contiguous()


def slice_model(model, plan: PrunePlan):
    """A new model of the plan's shape holding the teacher's weights at the kept indices.

    Built on the meta device and filled by assignment (no random initialisation); buffers that
    are not saved (rotary frequencies, unchanged since head_dim is) come from the teacher.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = pruned_config(model.config, plan)
    head_dim = shape_of(model.config).head_dim
    new_position = {old: new for new, old in enumerate(plan.layers)}
    cache: dict[tuple, object] = {}

    def index(position, kind):
        key = (position, kind)
        if key not in cache:
            cache[key] = _index(plan, position, kind, head_dim)
        return cache[key]

    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # the input embedding, sliced once
        match = _LAYER.match(name)
        if match:
            old, suffix = int(match.group(1)), match.group(2)
            if old not in new_position:
                continue
            if suffix not in _LAYER_RULES:
                raise NotImplementedError(
                    f"cannot prune {name}: this {config.model_type} layout has a parameter "
                    "kd prune does not know how to slice"
                )
            position = new_position[old]
            rule = _LAYER_RULES[suffix]
            state[f"model.layers.{position}.{suffix}"] = _cut(
                tensor, [index(position, k) for k in rule]
            )
        elif name in _MODEL_RULES:
            state[name] = _cut(tensor, [index(None, k) for k in _MODEL_RULES[name]])
        else:
            raise NotImplementedError(
                f"cannot prune {name}: this {config.model_type} layout has a parameter kd prune "
                "does not know how to slice"
            )
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        pruned = AutoModelForCausalLM.from_config(config, dtype=dtype)
    pruned.load_state_dict(state, strict=not tied, assign=True)
    if tied:
        pruned.tie_weights()
    teacher_buffers = dict(model.named_buffers())
    for name, buffer in list(pruned.named_buffers()):
        if buffer.is_meta:
            module_name, _, attr = name.rpartition(".")
            module = pruned.get_submodule(module_name)
            module._buffers[attr] = teacher_buffers[name].clone()
    missing = [n for n, p in pruned.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"pruned model has uninitialised parameters: {missing[:5]}")
    if getattr(model, "generation_config", None) is not None:
        pruned.generation_config = copy.deepcopy(model.generation_config)
    pruned.eval()
    expected = count_parameters(config).total
    actual = sum(p.numel() for p in pruned.parameters())
    if actual != expected:
        raise RuntimeError(f"pruned model has {actual:,} parameters, its shape says {expected:,}")
    return pruned
