"""Top-K knowledge-distillation losses plus the SFT cross-entropy, for a student trained on cached
teacher logprobs: a fused path from hidden states in token chunks, and a plain reference path.

Definitions, per target row with student logits z over the vocabulary V, teacher ids i_1..i_K and
teacher logprobs l_1..l_K (full-vocabulary log-softmax at temperature 1), temperature tau:

- ``renorm`` (NeMo-Aligner ``fwd_kl``, and the top-K logit loss of NVIDIA ModelOpt):
  p = softmax_K(l / tau), q = softmax_K(z[i] / tau); KD = sum_k p_k (log p_k - log q_k).
- ``teacher_renorm`` (axolotl, DistillKit "zero"): p as above,
  log q_k = log_softmax_V(z / tau)[i_k].
- ``tail`` (Megatron-LM's offline top-K KD, its "ghost token"): p_k = exp(l_k),
  q_k = softmax_V(z)[i_k], plus one bucket for the mass outside the K ids on both sides:
  p_t = max(0, 1 - sum p), q_t = 1 - sum q. Here q_t is computed as a logsumexp over the other
  V - K columns, so it stays exact however small it is; Megatron-LM computes 1 - sum q and floors
  it at 1e-8, which differs from this loss when the student's outside mass is below 1e-8.
  Defined at tau = 1 only. When K == V there is no outside bucket and it is dropped.
- ``reverse``: sum_k q_k (log q_k - log p_k) with p, q as in ``renorm``.
- ``jsd`` (generalised Jensen-Shannon of the GKD paper, TRL's and Liger's ``beta``, axolotl's
  ``kd_beta``): with p, q as in ``renorm`` and m = beta * p + (1 - beta) * q,
  KD = beta * KL(p || m) + (1 - beta) * KL(q || m). JSD(beta) vanishes as beta -> 0 or 1 (like
  beta * KL(p || q) and (1 - beta) * KL(q || p)), so, as in those libraries, beta = 0 is defined
  as the forward KL (``renorm``) and beta = 1 as the reverse KL (``reverse``).

With ``scale_by_t2`` the KD term is multiplied by tau**2 (Hinton et al.). The SFT cross-entropy is
at tau = 1 over the full vocabulary, whatever tau the KD term uses; NeMo-Aligner's SFT term at
tau != 1 is instead the cross-entropy of z / tau, so at tau != 1 the two totals differ in their SFT
part. ``kd_weight``, ``sft_weight`` and ``temperature`` must be finite (a ValueError otherwise).

Averaging: ``kd`` is the mean over rows that have teacher data (M_kd rows), ``ce`` the mean
over rows whose target is not ``IGNORE_INDEX`` (M_ce rows), and
``total = kd_weight * kd + sft_weight * ce``; an empty set gives 0 for its part, never NaN.
``reduction="sum"`` returns sums instead, for callers that normalise by a global token count.

``vocab_size`` (default: every row of the lm_head) keeps a student's padding columns out of both
softmaxes, as DistillKit does: a Qwen2.5 student scores 152064 columns for 151936 real tokens,
and the columns past ``vocab_size`` get no probability mass and no gradient.

Teacher ids in a row must be distinct (they are a top-K) and logprobs finite and <= 0; fp16
logprobs from the cache are computed in fp32 (fp64 when the student runs in fp64).

Entries with a logprob of -65504 or below (``PAD_LOGPROB``: the padding of rows that lossy caches
cut short, or a probability that underflows fp16) are not part of the row: they carry no teacher
mass, and their ids are left out of the student's renormalisation (``renorm``, ``reverse``) and
counted in the outside bucket (``tail``), so a padded row gives the loss of the short row.

The fused ``kd_sft_loss`` never holds [M, V] logits. For each chunk of rows it computes the logits
once, derives the student logsumexp shared by both terms, gathers the K teacher columns, and turns
the chunk's logits in place into d(total)/d(logits), which it multiplies into the gradients of the
hidden states, weight and bias right away (as Liger's fused linear cross-entropy does). Backward
only scales those stored gradients, so fused forward+backward costs the same three matmuls as the
plain path. The KD term only touches K columns per row beyond what the cross-entropy needs:
  d total / d z = a * (softmax(z) - e_y) + b * dKD/dz,
with dKD/dz non-zero on the K columns only for ``renorm`` and ``reverse``, and a multiple of
softmax(z) (or of softmax(z / tau)) plus K columns for ``teacher_renorm`` and ``tail``.
"""

from __future__ import annotations

import math
import operator
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100
# A teacher logprob at or below this (fp16's lowest value) marks an entry that is not in the row.
PAD_LOGPROB = -65504.0
# Stands in for -inf at padded entries: exp() of it is 0 and products with 0 stay finite.
_ABSENT = -1e30
KD_MODES = ("renorm", "teacher_renorm", "tail", "reverse", "jsd")
REDUCTIONS = ("mean", "sum")
BACKENDS = ("torch",)

# One [chunk, V] buffer in the compute dtype stays below this size when chunk_size is not given.
# The chunk's three matmuls need a few hundred rows to run at full speed (on 2 CPU cores with
# D=1024, V=128256: ~70 GFLOP/s at 130-260 rows, ~110 at 520+); 256 MiB gives 523 rows there,
# while the loss memory stays a small fraction of the [M, V] logits it replaces.
DEFAULT_CHUNK_BYTES = 256 << 20


class KDSFTLoss(NamedTuple):
    """The loss to optimise and its two parts (``total = kd_weight * kd + sft_weight * ce``)."""

    total: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


class TargetRows(NamedTuple):
    """Rows the loss scores: hidden states predicting each row's token, the token, teacher map."""

    hidden: torch.Tensor  # [M, D]: the student's hidden state at the position before each row
    targets: torch.Tensor  # [M] int64: token to predict, IGNORE_INDEX where it is not a target
    kd_rows: torch.Tensor  # [M_kd] int64: the row each teacher row (kd_ids[j]) describes


def gather_target_rows(
    hidden: torch.Tensor, labels: torch.Tensor, kd_index: torch.Tensor
) -> TargetRows:
    """Select the rows of a padded batch that the loss scores, with the next-token shift applied.

    ``hidden`` [B, L, D] are the student's last hidden states, ``labels`` [B, L] the batch labels
    (IGNORE_INDEX where a token is not a training target) and ``kd_index`` [M_kd] the flat index
    into [B, L] of the token each teacher row describes (``logitcache.loader.collate_kd``).

    The token at flat position p is predicted from the hidden state at p - 1 of the same sequence.
    A row is kept for every target token and for every teacher row, in flat-position order; a
    target without a teacher row counts in the cross-entropy only, and a teacher row at a position
    that is not a target (caches written with positions "all") counts in the KD term only, its
    target being IGNORE_INDEX. Pass the result as
    ``kd_sft_loss(rows.hidden, weight, rows.targets, kd_ids, kd_logprobs, kd_rows=rows.kd_rows)``.
    """
    if hidden.dim() != 3:
        raise ValueError(
            f"gather_target_rows: hidden must be [batch, length, dim], got shape "
            f"{tuple(hidden.shape)}; pass the model's last hidden states before the lm_head"
        )
    batch, length, dim = hidden.shape
    if tuple(labels.shape) != (batch, length):
        raise ValueError(
            f"gather_target_rows: labels shape {tuple(labels.shape)} does not match hidden "
            f"[{batch}, {length}, {dim}]; both must come from the same padded batch"
        )
    if kd_index.dim() != 1 or kd_index.dtype.is_floating_point or kd_index.dtype == torch.bool:
        raise ValueError(
            f"gather_target_rows: kd_index must be a 1-D integer tensor, got dtype "
            f"{kd_index.dtype} shape {tuple(kd_index.shape)}"
        )
    labels = labels.to(hidden.device)
    kd_index = kd_index.to(device=hidden.device, dtype=torch.long)
    if length > 0 and bool((labels[:, 0] != IGNORE_INDEX).any()):
        seq = int((labels[:, 0] != IGNORE_INDEX).nonzero()[0, 0])
        raise ValueError(
            f"gather_target_rows: labels[{seq}, 0] is a target, but the first token of a "
            "sequence has nothing before it to predict it from; loss_mask[0] must be false"
        )
    if kd_index.numel():
        _check_kd_index(kd_index, batch, length)

    flat_labels = labels.reshape(-1)
    has_row = flat_labels != IGNORE_INDEX
    has_row[kd_index] = True
    positions = has_row.nonzero().squeeze(1)
    row_of_position = torch.full_like(flat_labels, -1, dtype=torch.long)
    row_of_position[positions] = torch.arange(positions.numel(), device=positions.device)
    return TargetRows(
        hidden=hidden.reshape(batch * length, dim)[positions - 1],
        targets=flat_labels[positions].long(),
        kd_rows=row_of_position[kd_index],
    )


def _check_kd_index(kd_index: torch.Tensor, batch: int, length: int) -> None:
    bad = (kd_index < 0) | (kd_index >= batch * length)
    if bool(bad.any()):
        j = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"gather_target_rows: kd_index[{j}] = {int(kd_index[j])} is outside the batch of "
            f"{batch} x {length} tokens; kd_index must come from the same collate_kd batch"
        )
    at_start = kd_index % length == 0
    if bool(at_start.any()):
        j = int(at_start.nonzero()[0, 0])
        raise ValueError(
            f"gather_target_rows: teacher row {j} describes the first token of sequence "
            f"{int(kd_index[j]) // length}, which nothing predicts; the cache's loss_mask[0] "
            "must be false"
        )
    sorted_index, _ = kd_index.sort()
    repeated = sorted_index[1:] == sorted_index[:-1]
    if bool(repeated.any()):
        p = int(sorted_index[1:][repeated][0])
        raise ValueError(
            f"gather_target_rows: two teacher rows describe the token at flat position {p} "
            f"(sequence {p // length}, position {p % length}); each target has at most one row"
        )


# --------------------------------------------------------------------------------------------
# Input checks and the per-row plan shared by both entry points


class _Spec(NamedTuple):
    mode: str
    temperature: float
    kd_scale: float  # tau**2 or 1
    kd_weight: float
    sft_weight: float
    reduction: str
    beta: float = 0.5  # jsd only: the weight of the teacher in the mixture


class _Plan(NamedTuple):
    """Teacher data spread over all M rows (dummy uniform rows where a row has none)."""

    targets: torch.Tensor  # [M] int64, IGNORE_INDEX replaced by 0
    ce_mask: torch.Tensor  # [M] bool
    kd_ids: torch.Tensor | None  # [M, K] int64, None when there are no teacher rows
    kd_logprobs: torch.Tensor | None  # [M, K] compute dtype
    kd_mask: torch.Tensor  # [M] bool
    ce_coef: torch.Tensor  # [M]: d total / d ce_row
    kd_coef: torch.Tensor  # [M]: d total / d kd_row (kd_row without the tau**2 factor)
    ce_norm: float
    kd_norm: float
    # [M, K]: 0, or _ABSENT at entries that are padding; None when no row has any.
    kd_pad_bias: torch.Tensor | None = None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _make_spec(
    mode: str,
    kd_weight: float,
    sft_weight: float,
    temperature: float,
    scale_by_t2: bool,
    reduction: str,
    where: str,
) -> _Spec:
    if mode not in KD_MODES:
        raise ValueError(f"{where}: unknown mode {mode!r}; choose one of {', '.join(KD_MODES)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{where}: unknown reduction {reduction!r}; choose 'mean' or 'sum'")
    temperature = float(temperature)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"{where}: temperature must be a positive number, got {temperature}")
    for name, value in (("kd_weight", kd_weight), ("sft_weight", sft_weight)):
        if not math.isfinite(float(value)):
            # A NaN or infinite weight would turn every gradient into NaN without an error.
            raise ValueError(f"{where}: {name} must be a finite number, got {value}")
    if mode == "tail" and temperature != 1.0:
        raise ValueError(
            f"{where}: mode 'tail' is defined at temperature 1 only (the teacher's outside "
            f"mass is known only at the temperature it was cached at), got {temperature}; "
            "use 'renorm' or 'teacher_renorm' for temperature scaling"
        )
    return _Spec(
        mode=mode,
        temperature=temperature,
        kd_scale=temperature**2 if scale_by_t2 else 1.0,
        kd_weight=float(kd_weight),
        sft_weight=float(sft_weight),
        reduction=reduction,
    )


def _with_beta(spec: _Spec, beta: float, where: str) -> _Spec:
    """Check ``beta`` and resolve the jsd end points to the KL they are defined as."""
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(
            f"{where}: beta must be in [0, 1] (0: forward KL, 1: reverse KL), got {beta}"
        )
    if spec.mode == "jsd" and beta in (0.0, 1.0):
        return spec._replace(mode="renorm" if beta == 0.0 else "reverse", beta=beta)
    return spec._replace(beta=beta)


def _check_vocab_size(vocab_size: int | None, columns: int, where: str) -> int:
    """The columns that take part in the softmax: the first ``vocab_size`` of ``columns``."""
    if vocab_size is None:
        return columns
    try:
        vocab_size = operator.index(vocab_size)
    except TypeError:
        raise ValueError(f"{where}: vocab_size must be an integer, got {vocab_size!r}") from None
    if not 1 <= vocab_size <= columns:
        raise ValueError(
            f"{where}: vocab_size {vocab_size} is not in [1, {columns}], the student's "
            "output columns; pass the number of real tokens of a padded vocabulary"
        )
    return vocab_size


def _first_bad_row(bad: torch.Tensor) -> int:
    return int(bad.reshape(bad.shape[0], -1).any(1).nonzero()[0, 0])


def _plan_rows(
    n_rows: int,
    vocab: int,
    targets: torch.Tensor,
    kd_ids: torch.Tensor,
    kd_logprobs: torch.Tensor,
    kd_rows: torch.Tensor | None,
    spec: _Spec,
    dtype: torch.dtype,
    device: torch.device,
    where: str,
) -> _Plan:
    """Check the rows and teacher data, then lay the teacher data out over all rows."""
    if targets.dim() != 1 or targets.shape[0] != n_rows:
        raise ValueError(
            f"{where}: targets must have shape [{n_rows}] (one per row), got {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"{where}: targets must be integer token ids, got dtype {targets.dtype}")
    targets = targets.to(device=device, dtype=torch.long)
    ce_mask = targets != IGNORE_INDEX
    bad = ce_mask & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{where}: targets[{row}] = {int(targets[row])} is outside the student vocabulary "
            f"[0, {vocab}) and is not IGNORE_INDEX ({IGNORE_INDEX}); the labels come from another "
            "tokenizer than the student's"
        )

    if kd_ids.dim() != 2 or tuple(kd_logprobs.shape) != tuple(kd_ids.shape):
        raise ValueError(
            f"{where}: kd_ids and kd_logprobs must both be [M_kd, K], got "
            f"{tuple(kd_ids.shape)} and {tuple(kd_logprobs.shape)}"
        )
    if kd_ids.dtype.is_floating_point or kd_ids.dtype == torch.bool:
        raise ValueError(f"{where}: kd_ids must be integer token ids, got dtype {kd_ids.dtype}")
    if not kd_logprobs.dtype.is_floating_point:
        raise ValueError(f"{where}: kd_logprobs must be floating point, got {kd_logprobs.dtype}")
    n_kd, k = kd_ids.shape
    if kd_rows is None:
        if n_kd not in (0, n_rows):
            raise ValueError(
                f"{where}: {n_kd} teacher rows for {n_rows} rows; pass kd_rows (the row each "
                "teacher row describes, e.g. from gather_target_rows) when they differ"
            )
        kd_rows = torch.arange(n_kd, device=device)
    else:
        if kd_rows.dim() != 1 or kd_rows.shape[0] != n_kd:
            raise ValueError(
                f"{where}: kd_rows must have shape [{n_kd}] (one per teacher row), got "
                f"{tuple(kd_rows.shape)}"
            )
        if kd_rows.dtype.is_floating_point or kd_rows.dtype == torch.bool:
            raise ValueError(f"{where}: kd_rows must be integer row indices, got {kd_rows.dtype}")
        kd_rows = kd_rows.to(device=device, dtype=torch.long)
        if n_kd:
            bad = (kd_rows < 0) | (kd_rows >= n_rows)
            if bool(bad.any()):
                j = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"{where}: kd_rows[{j}] = {int(kd_rows[j])} is not a row index in [0, {n_rows})"
                )
            ordered, _ = kd_rows.sort()
            if bool((ordered[1:] == ordered[:-1]).any()):
                row = int(ordered[1:][ordered[1:] == ordered[:-1]][0])
                raise ValueError(f"{where}: two teacher rows are mapped to row {row} by kd_rows")

    kd_mask = torch.zeros(n_rows, dtype=torch.bool, device=device)
    dense_ids = dense_logprobs = pad_bias = None
    if n_kd:
        if k > vocab:
            raise ValueError(
                f"{where}: K = {k} teacher ids per row exceed the student vocabulary of {vocab}"
            )
        ids = kd_ids.to(device=device, dtype=torch.long)
        bad = (ids < 0) | (ids >= vocab)
        if bool(bad.any()):
            j = _first_bad_row(bad)
            raise ValueError(
                f"{where}: teacher row {j} has token id {int(ids[j][bad[j]][0])} outside the "
                f"student vocabulary [0, {vocab}); the cache was written with another tokenizer "
                "(compare its vocab_size and tokenizer fingerprint with the student's)"
            )
        ordered, _ = ids.sort(dim=1)
        repeated = ordered[:, 1:] == ordered[:, :-1]
        if bool(repeated.any()):
            j = _first_bad_row(repeated)
            raise ValueError(
                f"{where}: teacher row {j} lists token id "
                f"{int(ordered[j, 1:][repeated[j]][0])} twice; a top-K row holds K distinct ids"
            )
        logprobs = kd_logprobs.to(device=device, dtype=dtype)
        bad = ~torch.isfinite(logprobs) | (logprobs > 0)
        if bool(bad.any()):
            j = _first_bad_row(bad)
            raise ValueError(
                f"{where}: teacher row {j} has logprob {float(logprobs[j][bad[j]][0])}; cached "
                "values must be finite log-probabilities (<= 0), not raw logits"
            )
        kd_mask[kd_rows] = True
        if n_kd == n_rows:
            dense_ids = torch.empty_like(ids)
            dense_ids[kd_rows] = ids
            dense_logprobs = torch.empty_like(logprobs)
            dense_logprobs[kd_rows] = logprobs
        else:
            # Rows without teacher data get a distinct-id uniform row: every formula stays
            # finite there, and their zero coefficient removes them from loss and gradient.
            dense_ids = torch.arange(k, device=device).expand(n_rows, k).clone()
            dense_ids[kd_rows] = ids
            dense_logprobs = torch.full((n_rows, k), -math.log(k), dtype=dtype, device=device)
            dense_logprobs[kd_rows] = logprobs
        pad_bias = _pad_entries(dense_ids, dense_logprobs)

    n_ce = int(ce_mask.sum())
    if spec.reduction == "mean":
        ce_norm, kd_norm = float(max(n_ce, 1)), float(max(n_kd, 1))
    else:
        ce_norm = kd_norm = 1.0
    zero = torch.zeros((), dtype=dtype, device=device)
    ce_coef = torch.where(ce_mask, torch.full_like(zero, spec.sft_weight / ce_norm), zero)
    kd_value = spec.kd_weight * spec.kd_scale / kd_norm
    kd_coef = torch.where(kd_mask, torch.full_like(zero, kd_value), zero)
    return _Plan(
        targets=torch.where(ce_mask, targets, 0),
        ce_mask=ce_mask,
        kd_ids=dense_ids,
        kd_logprobs=dense_logprobs,
        kd_mask=kd_mask,
        ce_coef=ce_coef,
        kd_coef=kd_coef,
        ce_norm=ce_norm,
        kd_norm=kd_norm,
        kd_pad_bias=pad_bias,
    )


def _pad_entries(ids: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor | None:
    """Take padded entries out of the row, in place: no teacher mass, and their id replaced by
    the row's first id (so the outside bucket keeps the padding ids' student mass) with a
    student bias of _ABSENT (so the duplicate adds nothing). Returns the bias, or None."""
    pad = logprobs <= PAD_LOGPROB
    if not bool(pad.any()):
        return None
    logprobs.masked_fill_(pad, _ABSENT)
    ids.copy_(torch.where(pad, ids[:, :1], ids))
    return torch.where(pad, _ABSENT, 0.0).to(logprobs.dtype)


def _combine(kd_sum: torch.Tensor, ce_sum: torch.Tensor, plan: _Plan, spec: _Spec) -> KDSFTLoss:
    kd = kd_sum * (spec.kd_scale / plan.kd_norm)
    ce = ce_sum / plan.ce_norm
    return KDSFTLoss(total=spec.kd_weight * kd + spec.sft_weight * ce, kd=kd, ce=ce)


# --------------------------------------------------------------------------------------------
# Reference: autograd through materialised logits, written straight from the definitions


def reference_kd_sft_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    kd_ids: torch.Tensor,
    kd_logprobs: torch.Tensor,
    *,
    kd_rows: torch.Tensor | None = None,
    mode: str = "renorm",
    kd_weight: float = 1.0,
    sft_weight: float = 1.0,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
    reduction: str = "mean",
    beta: float = 0.5,
    vocab_size: int | None = None,
) -> KDSFTLoss:
    """KD + SFT loss from materialised student logits [M, V]; the plain version for tests.

    Same arguments and result as ``kd_sft_loss`` except that it takes the logits; gradients flow
    through all three returned values by ordinary autograd.
    """
    where = "reference_kd_sft_loss"
    spec = _make_spec(mode, kd_weight, sft_weight, temperature, scale_by_t2, reduction, where)
    spec = _with_beta(spec, beta, where)
    if logits.dim() != 2:
        raise ValueError(f"{where}: logits must be [M, V], got shape {tuple(logits.shape)}")
    logits = logits[:, : _check_vocab_size(vocab_size, logits.shape[1], where)]
    dtype = _compute_dtype(logits.dtype)
    n_rows, vocab = logits.shape
    plan = _plan_rows(
        n_rows, vocab, targets, kd_ids, kd_logprobs, kd_rows, spec, dtype, logits.device, where
    )
    z = logits.to(dtype)
    ce_rows = torch.logsumexp(z, dim=1) - z.gather(1, plan.targets[:, None]).squeeze(1)
    ce_sum = torch.where(plan.ce_mask, ce_rows, 0).sum()
    if plan.kd_ids is None:
        kd_sum = z.new_zeros(())
    else:
        kd_rows_loss = _reference_kd(z, plan.kd_ids, plan.kd_logprobs, spec, plan.kd_pad_bias)
        kd_sum = torch.where(plan.kd_mask, kd_rows_loss, 0).sum()
    return _combine(kd_sum, ce_sum, plan, spec)


def _reference_kd(
    z: torch.Tensor,
    ids: torch.Tensor,
    lp: torch.Tensor,
    spec: _Spec,
    pad_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    tau = spec.temperature
    if spec.mode == "tail":
        log_q = torch.log_softmax(z, dim=1)
        p = lp.exp()
        kd = (p * (lp - log_q.gather(1, ids))).sum(1)
        if ids.shape[1] < z.shape[1]:
            p_tail = (1 - p.sum(1)).clamp(min=0)
            outside = z.scatter(1, ids, float("-inf"))
            log_q_tail = torch.logsumexp(outside, dim=1) - torch.logsumexp(z, dim=1)
            kd = kd + torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail
        return kd
    log_p = torch.log_softmax(lp / tau, dim=1)
    if spec.mode == "teacher_renorm":
        log_q = torch.log_softmax(z / tau, dim=1).gather(1, ids)
    else:
        z_k = z.gather(1, ids) if pad_bias is None else z.gather(1, ids) + pad_bias
        log_q = torch.log_softmax(z_k / tau, dim=1)
    if spec.mode == "reverse":
        return (log_q.exp() * (log_q - log_p)).sum(1)
    if spec.mode == "jsd":
        beta = spec.beta
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        return beta * (log_p.exp() * (log_p - log_m)).sum(1) + (1 - beta) * (
            log_q.exp() * (log_q - log_m)
        ).sum(1)
    return (log_p.exp() * (log_p - log_q)).sum(1)


# --------------------------------------------------------------------------------------------
# Fused: chunks of rows from hidden states, gradients formed in the forward pass


def kd_sft_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    kd_ids: torch.Tensor,
    kd_logprobs: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    kd_rows: torch.Tensor | None = None,
    mode: str = "renorm",
    kd_weight: float = 1.0,
    sft_weight: float = 1.0,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
    reduction: str = "mean",
    chunk_size: int | None = None,
    backend: str = "torch",
    beta: float = 0.5,
    vocab_size: int | None = None,
) -> KDSFTLoss:
    """KD + SFT loss from hidden states [M, D] and the lm_head ``weight`` [V, D] (+ ``bias`` [V]).

    ``targets`` [M] are the tokens to predict (IGNORE_INDEX: no cross-entropy for that row);
    ``kd_ids`` [M_kd, K] and ``kd_logprobs`` [M_kd, K] the teacher rows, describing rows
    ``kd_rows`` [M_kd] (default: row j for teacher row j, which needs M_kd == M). ``chunk_size``
    rows are processed at a time (default: as many as fit ``DEFAULT_CHUNK_BYTES`` of logits).
    ``beta`` weighs the teacher in mode ``jsd``; ``vocab_size`` limits the softmax to the first
    ``vocab_size`` rows of ``weight`` (the rest, a padded vocabulary's, get zero gradient).

    Gradients reach ``hidden``, ``weight`` and ``bias`` through ``total``; the ``kd`` and ``ce``
    parts are returned detached, for logging. The gradients are computed during the forward pass
    when any input requires them, so one backward per call is supported (no retain_graph reuse).
    """
    where = "kd_sft_loss"
    if backend not in BACKENDS:
        raise ValueError(
            f"{where}: backend {backend!r} is not available; implemented: {', '.join(BACKENDS)}"
        )
    spec = _make_spec(mode, kd_weight, sft_weight, temperature, scale_by_t2, reduction, where)
    spec = _with_beta(spec, beta, where)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{where}: hidden must be [M, D] and weight [V, D] with the same D, got "
            f"{tuple(hidden.shape)} and {tuple(weight.shape)}; flatten [B, L, D] hidden states "
            "with gather_target_rows"
        )
    if hidden.dtype != weight.dtype or not hidden.dtype.is_floating_point:
        raise ValueError(
            f"{where}: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one "
            "floating-point dtype"
        )
    vocab = weight.shape[0]
    if bias is not None and (tuple(bias.shape) != (vocab,) or bias.dtype != weight.dtype):
        raise ValueError(
            f"{where}: bias must be [{vocab}] of dtype {weight.dtype}, got "
            f"{tuple(bias.shape)} {bias.dtype}"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{where}: chunk_size must be >= 1, got {chunk_size}")
    vocab_size = _check_vocab_size(vocab_size, vocab, where)
    if vocab_size < vocab:
        # Slices are views: autograd gives the padding rows a zero gradient.
        weight, vocab = weight[:vocab_size], vocab_size
        bias = None if bias is None else bias[:vocab_size]
    dtype = _compute_dtype(hidden.dtype)
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_BYTES // (vocab * dtype.itemsize))
    plan = _plan_rows(
        hidden.shape[0],
        vocab,
        targets,
        kd_ids,
        kd_logprobs,
        kd_rows,
        spec,
        dtype,
        hidden.device,
        where,
    )
    params = (hidden, weight) if bias is None else (hidden, weight, bias)
    if not (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
        # Evaluation: autograd.Function would still report needs_input_grad under no_grad.
        loss, _ = _fused_forward(hidden, weight, bias, plan, spec, chunk_size, False, False, False)
        return loss
    total, kd, ce = _FusedKDSFT.apply(hidden, weight, bias, plan, spec, chunk_size)
    return KDSFTLoss(total=total, kd=kd, ce=ce)


class _FusedKDSFT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, plan, spec, chunk_size):
        need = ctx.needs_input_grad
        loss, grads = _fused_forward(
            hidden, weight, bias, plan, spec, chunk_size, need[0], need[1], need[2]
        )
        ctx.grads = grads
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(loss.kd, loss.ce)
        return loss.total, loss.kd, loss.ce

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, _grad_kd, _grad_ce):
        if ctx.grads is None:
            raise RuntimeError(
                "kd_sft_loss: backward ran twice through the same loss; the fused loss keeps "
                "its gradients for a single backward, call kd_sft_loss again instead"
            )
        grads, ctx.grads = ctx.grads, None  # drop our reference so autograd can take the tensor
        unit = bool(grad_total == 1)
        out = []
        for grad, dtype in zip(grads, ctx.dtypes, strict=True):
            if grad is not None:
                grad = grad if unit else grad * grad_total.to(grad.dtype)
                grad = grad.to(dtype)
            out.append(grad)
        return out[0], out[1], out[2], None, None, None


def _fused_forward(hidden, weight, bias, plan, spec, chunk_size, need_h, need_w, need_b):
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    dtype = _compute_dtype(hidden.dtype)
    device = hidden.device
    need_grad = need_h or need_w or need_b
    # Low-precision weights accumulate their gradient over chunks in fp32.
    w_acc = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros((vocab, dim), dtype=w_acc, device=device) if need_w else None
    grad_b = torch.zeros(vocab, dtype=dtype, device=device) if need_b else None
    kd_sum = torch.zeros((), dtype=dtype, device=device)
    ce_sum = torch.zeros((), dtype=dtype, device=device)
    weight_t = weight.t()
    for start in range(0, n_rows, chunk_size):
        rows = slice(start, min(start + chunk_size, n_rows))
        h = hidden[rows]
        z = torch.mm(h, weight_t) if bias is None else torch.addmm(bias, h, weight_t)
        z = z.to(dtype)
        kd_part, ce_part = _chunk_loss_and_grad(z, plan, rows, spec, need_grad)
        kd_sum += kd_part
        ce_sum += ce_part
        if not need_grad:
            continue
        grad_z = z.to(hidden.dtype)
        if need_h:
            torch.mm(grad_z, weight, out=grad_h[rows])
        if need_w:
            if w_acc == hidden.dtype:
                grad_w.addmm_(grad_z.t(), h)
            else:
                grad_w.add_(torch.mm(grad_z.t(), h))
        if need_b:
            grad_b.add_(z.sum(0))
        del z, grad_z
    return _combine(kd_sum, ce_sum, plan, spec), (grad_h, grad_w, grad_b)


def _exp_shifted_(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x <- exp(x - rowmax) in place; returns (logsumexp, sum of the new x), both [C, 1]."""
    m = x.amax(dim=1, keepdim=True)
    x.sub_(m).exp_()
    s = x.sum(dim=1, keepdim=True)
    return m + s.log(), s


def _chunk_loss_and_grad(
    z: torch.Tensor, plan: _Plan, rows: slice, spec: _Spec, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of KD and CE row losses of one chunk; z [C, V] becomes d total / d z when need_grad."""
    tau = spec.temperature
    y = plan.targets[rows, None]
    a = plan.ce_coef[rows, None]
    z_y = z.gather(1, y)
    have_kd = plan.kd_ids is not None
    if have_kd:
        ids, lp = plan.kd_ids[rows], plan.kd_logprobs[rows]
        b = plan.kd_coef[rows, None]
        z_k = z.gather(1, ids)
        if plan.kd_pad_bias is not None:
            z_k = z_k + plan.kd_pad_bias[rows]
    tail_bucket = have_kd and spec.mode == "tail" and ids.shape[1] < z.shape[1]

    soft_t = None  # softmax(z / tau) over the vocabulary, only teacher_renorm at tau != 1 needs it
    if have_kd and spec.mode == "teacher_renorm" and tau != 1.0:
        soft_t = z / tau
        lse_t, s_t = _exp_shifted_(soft_t)
        soft_t.div_(s_t)
    if tail_bucket:
        # Mask the K columns first so the outside mass is a logsumexp of its own, exact when tiny.
        z.scatter_(1, ids, float("-inf"))
        lse_out, s = _exp_shifted_(z)  # z <- exp(z - m_out), 0 on the K columns
        lse = torch.logaddexp(lse_out, torch.logsumexp(z_k, dim=1, keepdim=True))
    else:
        lse, s = _exp_shifted_(z)  # z <- exp(z - m)
    ce_rows = (lse - z_y).squeeze(1)
    ce_part = torch.where(plan.ce_mask[rows], ce_rows, 0).sum()

    # Per row: z's multiplier for softmax(z) on the full vocabulary, and the extra gradient
    # on the K teacher columns.
    full = a
    grad_k = None
    if have_kd:
        if spec.mode == "tail":
            p = lp.exp()
            p_sum = p.sum(1, keepdim=True)
            log_q = z_k - lse
            kd_rows = (p * (lp - log_q)).sum(1, keepdim=True)
            mass = p_sum
            if tail_bucket:
                p_tail = (1 - p_sum).clamp(min=0)
                log_q_tail = lse_out - lse
                kd_rows = kd_rows + torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail
                mass = p_sum + p_tail
                # Outside the K columns softmax(z) = exp(z - m_out) / s * q_tail, and z holds
                # exp(z - m_out): scaling by q_tail / s there avoids dividing by a tiny q_tail.
                q_tail = log_q_tail.exp()
                full = a * q_tail + b * (mass * q_tail - p_tail)
                grad_k = (a + b * mass) * log_q.exp() - b * p
            else:
                full = a + b * mass
                grad_k = -b * p
        else:
            log_p = torch.log_softmax(lp / tau, dim=1)
            p = log_p.exp()
            if spec.mode == "teacher_renorm":
                log_q = z_k / tau - (lse if soft_t is None else lse_t)
                kd_rows = (p * (log_p - log_q)).sum(1, keepdim=True)
                grad_k = -(b / tau) * p
                if soft_t is None:
                    full = a + b
            else:
                log_q = torch.log_softmax(z_k / tau, dim=1)
                q = log_q.exp()
                if spec.mode == "reverse":
                    kd_rows = (q * (log_q - log_p)).sum(1, keepdim=True)
                    grad_k = (b / tau) * q * (log_q - log_p - kd_rows)
                elif spec.mode == "jsd":
                    beta = spec.beta
                    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
                    kd_rows = beta * (p * (log_p - log_m)).sum(1, keepdim=True) + (1 - beta) * (
                        q * (log_q - log_m)
                    ).sum(1, keepdim=True)
                    # d JSD / d q_k = (1 - beta) log(q_k / m_k), through the softmax over K.
                    g = (1 - beta) * (log_q - log_m)
                    grad_k = (b / tau) * q * (g - (q * g).sum(1, keepdim=True))
                else:
                    kd_rows = (p * (log_p - log_q)).sum(1, keepdim=True)
                    grad_k = (b / tau) * (q - p)
        kd_part = torch.where(plan.kd_mask[rows], kd_rows.squeeze(1), 0).sum()
    else:
        kd_part = z_y.new_zeros(())

    if need_grad:
        z.mul_(full / s)
        if soft_t is not None:
            z.add_(soft_t.mul_(b / tau))
        if grad_k is not None:
            z.scatter_add_(1, ids, grad_k)
        z.scatter_add_(1, y, -a)
    return kd_part, ce_part
