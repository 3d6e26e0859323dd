"""Activation importance of heads, MLP neurons, embedding channels and layers (Minitron).

One forward pass over the calibration batches with hooks on every decoder layer. Each hook
reduces the activation it sees at once to per-sequence sums, so no more than the one layer the
model is running holds activations. Aggregation (the best of those Muralidharan et al. 2024
compared):

    score[j] = mean over sequences b of  sqrt( sum over tokens t of a[b, t, j]^2 )

that is L2 over the sequence, then mean over the batch; padding tokens are left out. a is:

- a head: the L2 norm over head_dim of that head's attention output (o_proj's input);
- an MLP neuron: its activation act(gate) * up (down_proj's input);
- an embedding channel: the output of every RMSNorm (both per layer, and the final norm),
  aggregated per norm and summed over the norms of the layers that are kept.

A layer's block importance (ShortGPT; Minitron's depth metric) is 1 - cosine similarity of its
input and output hidden states, averaged over tokens: a layer that barely turns the residual
stream matters little. The alternative, `layer_loss_importance`, measures the calibration loss
increase when one layer at a time is skipped (one more pass per layer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .calibration import DEFAULT_BATCH_TOKENS, batches, iter_torch
from .shapes import Shape, shape_of

DEPTH_METRICS = ("cosine", "loss")


@dataclass
class Importance:
    """Scores of every prunable unit of a teacher; higher means keep."""

    layers: np.ndarray  # [L] block importance (by `layer_metric`)
    heads: np.ndarray  # [L, H] per query head
    neurons: np.ndarray  # [L, I] per MLP neuron
    channels: np.ndarray  # [L, h] per hidden channel: sum of the layer's two norms
    final_channels: np.ndarray  # [h] the final norm's channels
    layer_metric: str = "cosine"
    sequences: int = 0
    tokens: int = 0

    def channel_scores(self, kept_layers: Sequence[int]) -> np.ndarray:
        """Channel importance of a model made of `kept_layers`: their norms and the final one."""
        return self.channels[list(kept_layers)].sum(axis=0) + self.final_channels

    def as_report(self) -> dict:
        return {
            "aggregation": "mean over sequences of the L2 norm over tokens",
            "layer_metric": self.layer_metric,
            "sequences": self.sequences,
            "tokens": self.tokens,
            "layers": _floats(self.layers),
            "heads": [_floats(row) for row in self.heads],
            "neurons": [_floats(row) for row in self.neurons],
            "channels": _floats(self.channel_scores(range(len(self.layers)))),
        }


def _floats(values) -> list[float]:
    return [float(f"{v:.6g}") for v in np.asarray(values, dtype=np.float64)]


def random_importance(shape: Shape, seed: int) -> Importance:
    """Importance drawn at random: the baseline that activation importance has to beat."""
    rng = np.random.default_rng(seed)
    return Importance(
        layers=rng.random(shape.num_layers),
        heads=rng.random((shape.num_layers, shape.num_heads)),
        neurons=rng.random((shape.num_layers, shape.intermediate_size)),
        channels=np.zeros((shape.num_layers, shape.hidden_size)),
        final_channels=rng.random(shape.hidden_size),
        layer_metric=f"random(seed={seed})",
    )


class _Accumulator:
    """Hooks on one model: per-sequence reductions summed on the device, read once at the end."""

    def __init__(self, model, shape: Shape):
        import torch

        self.shape = shape
        device = next(model.parameters()).device
        zeros = lambda *size: torch.zeros(size, dtype=torch.float64, device=device)  # noqa: E731
        self.heads = zeros(shape.num_layers, shape.num_heads)
        self.neurons = zeros(shape.num_layers, shape.intermediate_size)
        self.channels = zeros(shape.num_layers, shape.hidden_size)
        self.final = zeros(shape.hidden_size)
        self.block = zeros(shape.num_layers)
        self.mask = None  # [B, S] 1.0 on the real tokens of the batch running now
        self.padded = False  # whether that batch has padding (else masking is skipped)
        self.layer_input = None
        self.handles = []
        base = model.model
        for index, layer in enumerate(base.layers):
            self._hook(layer, index)
        self.handles.append(base.norm.register_forward_hook(self._final_norm))

    def _hook(self, layer, index: int) -> None:
        def take_input(module, args, kwargs):
            self.layer_input = args[0] if args else kwargs["hidden_states"]

        def block(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            cos = _cosine(self.layer_input, out)
            self.block[index] += ((1.0 - cos) * self.mask).sum()
            self.layer_input = None

        def norm(module, args, output):
            self.channels[index] += self._l2_over_tokens(output).sum(0)

        def heads(module, args):
            x = args[0].unflatten(-1, (self.shape.num_heads, self.shape.head_dim))
            # Per head: L2 over head_dim at each token, then L2 over tokens = one norm over both.
            self.heads[index] += self._norm(x, dims=(1, 3)).sum(0)

        def neurons(module, args):
            self.neurons[index] += self._l2_over_tokens(args[0]).sum(0)

        self.handles += [
            layer.register_forward_pre_hook(take_input, with_kwargs=True),
            layer.register_forward_hook(block, with_kwargs=True),
            layer.input_layernorm.register_forward_hook(norm),
            layer.post_attention_layernorm.register_forward_hook(norm),
            layer.self_attn.o_proj.register_forward_pre_hook(heads),
            layer.mlp.down_proj.register_forward_pre_hook(neurons),
        ]

    def _final_norm(self, module, args, output):
        self.final += self._l2_over_tokens(output).sum(0)

    def _l2_over_tokens(self, x):
        """[B, S, N] -> [B, N]: the L2 norm over real tokens of each sequence."""
        return self._norm(x, dims=(1,))

    def _norm(self, x, dims):
        import torch

        if self.padded:
            x = x * self.mask.view(*self.mask.shape, *([1] * (x.dim() - 2)))
        return torch.linalg.vector_norm(x, dim=dims, dtype=torch.float32)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _cosine(a, b):
    import torch.nn.functional as F

    return F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)


def collect_importance(
    model,
    examples,
    *,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    pad_id: int = 0,
    progress: bool = True,
) -> Importance:
    """Importance of every head, neuron, channel and layer of `model` from one forward pass over
    `examples` (Example objects), in batches of at most `batch_tokens` padded tokens."""
    import torch
    from tqdm.auto import tqdm

    shape = shape_of(model.config)
    device = next(model.parameters()).device
    batch_list = batches(examples, batch_tokens=batch_tokens, pad_id=pad_id)
    acc = _Accumulator(model, shape)
    sequences = tokens = 0
    try:
        with torch.inference_mode():
            bar = tqdm(
                iter_torch(batch_list, device),
                total=len(batch_list),
                desc="importance",
                unit="batch",
                disable=not progress,
            )
            for input_ids, attention_mask, _ in bar:
                acc.mask = attention_mask.to(next(model.parameters()).dtype)
                acc.padded = not bool(attention_mask.all())
                model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                sequences += input_ids.shape[0]
                tokens += int(attention_mask.sum())
    finally:
        acc.remove()
    if not sequences:
        raise ValueError("no calibration sequences to measure importance on")
    mean = lambda t: (t / sequences).cpu().numpy()  # noqa: E731
    return Importance(
        layers=(acc.block / tokens).cpu().numpy(),
        heads=mean(acc.heads),
        neurons=mean(acc.neurons),
        channels=mean(acc.channels),
        final_channels=mean(acc.final),
        layer_metric="cosine",
        sequences=sequences,
        tokens=tokens,
    )


# --------------------------------------------------------------------------------------------
# Loss on target tokens, and layer importance as the loss increase when a layer is skipped


def _target_loss_sums(model, input_ids, attention_mask, loss_mask, chunk_rows: int = 1024):
    """(sum of cross-entropy over target tokens, number of targets) for one batch.

    Only target positions go through the output layer, a chunk of rows at a time, so the
    [tokens, vocab] logits of the whole batch never exist at once.
    """
    import torch
    import torch.nn.functional as F

    hidden = model.model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    targets_at = loss_mask[:, 1:] & attention_mask[:, 1:].bool()
    rows = hidden[:, :-1][targets_at]
    targets = input_ids[:, 1:][targets_at]
    head = model.get_output_embeddings()
    total = torch.zeros((), dtype=torch.float64, device=rows.device)
    for start in range(0, rows.shape[0], chunk_rows):
        logits = head(rows[start : start + chunk_rows]).float()
        total += F.cross_entropy(logits, targets[start : start + chunk_rows], reduction="sum")
    return total, int(targets.numel())


def heldout_loss(
    model,
    examples,
    *,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    pad_id: int = 0,
    progress: bool = False,
    desc: str = "loss",
) -> float:
    """Mean next-token cross-entropy (nats) of `model` over the target tokens of `examples`."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    batch_list = batches(examples, batch_tokens=batch_tokens, pad_id=pad_id)
    total, count = 0.0, 0
    with torch.inference_mode():
        for input_ids, attention_mask, loss_mask in tqdm(
            iter_torch(batch_list, device),
            total=len(batch_list),
            desc=desc,
            unit="batch",
            disable=not progress,
        ):
            s, n = _target_loss_sums(model, input_ids, attention_mask, loss_mask)
            total += float(s)
            count += n
    if not count:
        raise ValueError("no target tokens to measure a loss on")
    return total / count


def layer_loss_importance(
    model,
    examples,
    *,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    pad_id: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """[L] calibration loss increase when each layer alone is skipped (L + 1 passes).

    Skipping a decoder layer passes its input through unchanged, which is what removing it
    from the residual stream does.
    """
    from tqdm.auto import tqdm

    layers = model.model.layers
    bar = tqdm(total=len(layers) + 1, desc="layer loss", unit="pass", disable=not progress)
    base = heldout_loss(model, examples, batch_tokens=batch_tokens, pad_id=pad_id)
    bar.update()
    scores = np.zeros(len(layers))
    for index, layer in enumerate(layers):
        layer.forward = _skip
        try:
            loss = heldout_loss(model, examples, batch_tokens=batch_tokens, pad_id=pad_id)
        finally:
            del layer.forward
        scores[index] = loss - base if math.isfinite(loss) else np.inf
        bar.update()
    bar.close()
    return scores


def _skip(hidden_states, *args, **kwargs):
    return hidden_states
