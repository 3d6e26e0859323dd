"""Tests of the KD + SFT losses: the fused chunked path against autograd through the reference,
the reference against the definitions, edge cases, averaging and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kd.losses import (
    IGNORE_INDEX,
    KD_MODES,
    gather_target_rows,
    kd_sft_loss,
    reference_kd_sft_loss,
)

F64 = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def make_case(
    m: int = 13,
    d: int = 8,
    v: int = 50,
    k: int = 7,
    *,
    seed: int = 0,
    kd_rows: list[int] | None = None,
    ignored: tuple[int, ...] = (),
    teacher_scale: float = 2.0,
    dtype: torch.dtype = F64,
) -> dict:
    """Student hidden states, lm_head and bias, targets, and teacher top-K rows."""
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, v, (m,), generator=gen)
    for row in ignored:
        targets[row] = IGNORE_INDEX
    n_kd = m if kd_rows is None else len(kd_rows)
    teacher = torch.randn(n_kd, v, generator=gen, dtype=F64) * teacher_scale
    logprobs, ids = torch.log_softmax(teacher, dim=1).topk(k, dim=1)
    return {
        "hidden": torch.randn(m, d, generator=gen, dtype=F64).to(dtype),
        "weight": torch.randn(v, d, generator=gen, dtype=F64).to(dtype),
        "bias": torch.randn(v, generator=gen, dtype=F64).to(dtype),
        "targets": targets,
        "kd_ids": ids.to(torch.int32),
        "kd_logprobs": logprobs,
        "kd_rows": None if kd_rows is None else torch.tensor(kd_rows, dtype=torch.long),
    }


def fused_and_reference(case: dict, use_bias: bool = True, chunk_size: int | None = 4, **kw):
    """Both losses and the gradients of their totals w.r.t. hidden, weight (and bias)."""
    params = [case["hidden"], case["weight"]] + ([case["bias"]] if use_bias else [])
    results = []
    for fused in (True, False):
        leaves = [p.detach().clone().requires_grad_(True) for p in params]
        bias = leaves[2] if use_bias else None
        args = (case["targets"], case["kd_ids"], case["kd_logprobs"])
        if fused:
            loss = kd_sft_loss(
                leaves[0],
                leaves[1],
                *args,
                bias=bias,
                kd_rows=case["kd_rows"],
                chunk_size=chunk_size,
                **kw,
            )
        else:
            logits = leaves[0] @ leaves[1].t()
            if bias is not None:
                logits = logits + bias
            loss = reference_kd_sft_loss(logits, *args, kd_rows=case["kd_rows"], **kw)
        loss.total.backward()
        results.append((loss, [leaf.grad for leaf in leaves]))
    return results


def assert_same(case: dict, tol: dict = TIGHT, **kw) -> None:
    (fused, fused_grads), (ref, ref_grads) = fused_and_reference(case, **kw)
    for name in ("total", "kd", "ce"):
        got, want = getattr(fused, name), getattr(ref, name)
        assert torch.isfinite(got), name
        torch.testing.assert_close(got, want.detach(), **tol, msg=name)
    for got, want in zip(fused_grads, ref_grads, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, **tol)


MODE_TEMPERATURES = [
    (mode, tau) for mode in KD_MODES for tau in ((1.0,) if mode == "tail" else (1.0, 0.5, 2.0))
]


@pytest.mark.parametrize(("mode", "temperature"), MODE_TEMPERATURES)
@pytest.mark.parametrize("scale_by_t2", [False, True])
@pytest.mark.parametrize("use_bias", [False, True])
def test_fused_gradients_equal_reference_autograd(mode, temperature, scale_by_t2, use_bias):
    # Rows 1, 4, 6 have no teacher row; rows 3 and 6 are not CE targets; chunks of 4 leave a
    # ragged last chunk of 1.
    case = make_case(kd_rows=[0, 2, 3, 5, 7, 8, 9, 10, 11, 12], ignored=(3, 6))
    assert_same(
        case,
        use_bias=use_bias,
        mode=mode,
        temperature=temperature,
        scale_by_t2=scale_by_t2,
        kd_weight=0.7,
        sft_weight=0.4,
    )


@pytest.mark.parametrize("mode", KD_MODES)
@pytest.mark.parametrize("chunk_size", [1, 5, 13, 1000, None])
def test_chunk_size_does_not_change_the_result(mode, chunk_size):
    case = make_case(seed=1)
    assert_same(case, mode=mode, chunk_size=chunk_size)


# ------------------------------------------------------------------------------ edge cases


def _with_logprobs(case: dict, logprobs: torch.Tensor, ids: torch.Tensor | None = None) -> dict:
    case = dict(case)
    case["kd_logprobs"] = logprobs
    if ids is not None:
        case["kd_ids"] = ids
    return case


def case_k1() -> dict:
    return make_case(k=1, seed=2)


def case_k_equals_v() -> dict:
    # fp16 rounding leaves the teacher's K = V mass a little off 1, as in a real cache.
    case = make_case(v=12, k=12, seed=3)
    return _with_logprobs(case, case["kd_logprobs"].to(torch.float16))


def case_duplicated_logprobs() -> dict:
    case = make_case(seed=4)
    lp = case["kd_logprobs"].clone()
    lp[:, :] = math.log(1 / 20)  # ties across the whole row
    lp[0, :3] = -0.9  # and ties at the top of another row
    lp[0, 3:] = -5.0
    return _with_logprobs(case, lp)


def case_tail_mass_near_zero() -> dict:
    # The K ids hold all but ~1e-12 of the teacher mass; fp16 rounding even lifts the row sum
    # above 1 (the tail mass clamps to 0).
    case = make_case(seed=5, teacher_scale=40.0, k=10)
    lp = case["kd_logprobs"].to(torch.float16)
    assert (case["kd_logprobs"].exp().sum(1) > 1 - 1e-6).all()
    return _with_logprobs(case, lp)


def case_tail_mass_near_one() -> dict:
    # The teacher puts almost all mass outside the K ids.
    case = make_case(seed=6)
    lp = torch.full_like(case["kd_logprobs"], -30.0)
    lp[:, 0] = -25.0
    return _with_logprobs(case, lp)


def case_logprobs_at_fp16_min() -> dict:
    case = make_case(seed=7)
    lp = case["kd_logprobs"].to(torch.float16)
    lp[:, -3:] = -65504.0
    lp[2, 1:] = -65504.0  # one row with a single live id
    return _with_logprobs(case, lp)


def case_targets_outside_top_k() -> dict:
    case = make_case(seed=8)
    v = case["weight"].shape[0]
    for row, ids in enumerate(case["kd_ids"]):
        case["targets"][row] = next(t for t in range(v) if t not in set(ids.tolist()))
    assert not (case["kd_ids"] == case["targets"][:, None]).any()
    return case


def case_student_tail_tiny() -> dict:
    # The student puts ~e^-60 of its mass outside the teacher's K ids.
    case = make_case(seed=9, m=6, v=30, k=5)
    case["kd_ids"] = case["kd_ids"][:1].expand(6, 5).clone()
    case["bias"] = torch.full((30,), -60.0, dtype=F64)
    case["bias"][case["kd_ids"][0].long()] = 0.0
    return case


EDGE_CASES = {
    "K=1": case_k1,
    "K=V": case_k_equals_v,
    "duplicated logprobs": case_duplicated_logprobs,
    "teacher tail mass near 0": case_tail_mass_near_zero,
    "teacher tail mass near 1": case_tail_mass_near_one,
    "logprobs at -65504": case_logprobs_at_fp16_min,
    "targets outside top-K": case_targets_outside_top_k,
    "student tail mass near 0": case_student_tail_tiny,
}


@pytest.mark.parametrize("mode", KD_MODES)
@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_cases_match_reference(name, mode):
    case = EDGE_CASES[name]()
    for temperature in (1.0,) if mode == "tail" else (1.0, 2.0):
        assert_same(case, mode=mode, temperature=temperature, scale_by_t2=True)


def test_fp32_keeps_a_tiny_student_tail_exact():
    # log q_tail comes from its own logsumexp, not from log(1 - sum q), so fp32 keeps it.
    case = case_student_tail_tiny()
    lp = torch.full_like(case["kd_logprobs"], -3.0)  # teacher tail mass 1 - 5 e^-3, large
    ref = reference_kd_sft_loss(
        torch.addmm(case["bias"], case["hidden"], case["weight"].t()),
        case["targets"],
        case["kd_ids"],
        lp,
        mode="tail",
    )
    got = kd_sft_loss(
        case["hidden"].float(),
        case["weight"].float(),
        case["targets"],
        case["kd_ids"],
        lp.half(),
        bias=case["bias"].float(),
        mode="tail",
    )
    assert ref.kd > 40  # ~ p_tail * 60 nats: a log(1 - sum q) in fp32 would give inf or 0
    torch.testing.assert_close(got.kd.double(), ref.kd, rtol=1e-5, atol=0)


@pytest.mark.parametrize("mode", KD_MODES)
def test_empty_batch_gives_zero_loss_and_zero_gradients(mode):
    d, v, k = 8, 20, 5
    hidden = torch.zeros(0, d, dtype=F64, requires_grad=True)
    weight = torch.randn(v, d, dtype=F64, requires_grad=True)
    bias = torch.randn(v, dtype=F64, requires_grad=True)
    ids = torch.zeros(0, k, dtype=torch.int32)
    lp = torch.zeros(0, k, dtype=torch.float16)
    targets = torch.zeros(0, dtype=torch.long)
    for fused in (True, False):
        if fused:
            loss = kd_sft_loss(hidden, weight, targets, ids, lp, bias=bias, mode=mode)
        else:
            logits = torch.addmm(bias, hidden, weight.t())
            loss = reference_kd_sft_loss(logits, targets, ids, lp, mode=mode)
        loss.total.backward()
        assert loss.total.item() == 0 and loss.kd.item() == 0 and loss.ce.item() == 0
        assert hidden.grad.shape == (0, d)
        assert torch.equal(weight.grad, torch.zeros_like(weight))
        assert torch.equal(bias.grad, torch.zeros_like(bias))
        hidden.grad = weight.grad = bias.grad = None


@pytest.mark.parametrize("mode", KD_MODES)
def test_rows_without_teacher_data_or_targets(mode):
    # No teacher rows at all: pure SFT. All targets ignored: pure KD.
    case = make_case(seed=10, kd_rows=[])
    (fused, _), (ref, _) = fused_and_reference(case, mode=mode)
    assert fused.kd.item() == 0 and ref.kd.item() == 0 and fused.ce > 0
    assert_same(case, mode=mode)
    case = make_case(seed=11, ignored=tuple(range(13)))
    (fused, _), _ = fused_and_reference(case, mode=mode)
    assert fused.ce.item() == 0 and fused.kd > 0
    assert_same(case, mode=mode)


# ------------------------------------------------------------------- averaging and reduction


def _per_row(case: dict, mode: str) -> tuple[list[float], list[float]]:
    """KD and CE of each row on its own (one-row reference calls)."""
    logits = torch.addmm(case["bias"], case["hidden"], case["weight"].t())
    kd_rows = case["kd_rows"].tolist()
    kd, ce = [], []
    for j, row in enumerate(kd_rows):
        one = reference_kd_sft_loss(
            logits[row : row + 1],
            torch.tensor([IGNORE_INDEX]),
            case["kd_ids"][j : j + 1],
            case["kd_logprobs"][j : j + 1],
            mode=mode,
        )
        kd.append(one.kd.item())
    for row, target in enumerate(case["targets"].tolist()):
        if target != IGNORE_INDEX:
            ce.append(torch.nn.functional.cross_entropy(logits[row], torch.tensor(target)).item())
    return kd, ce


@pytest.mark.parametrize("mode", KD_MODES)
def test_kd_is_averaged_over_teacher_rows_and_ce_over_targets(mode):
    case = make_case(seed=12, kd_rows=[0, 1, 2, 5, 6, 9], ignored=(1, 2, 3))
    kd_rows, ce_rows = _per_row(case, mode)
    assert (len(kd_rows), len(ce_rows)) == (6, 10)
    for reduction, kd_want, ce_want in [
        ("mean", sum(kd_rows) / 6, sum(ce_rows) / 10),
        ("sum", sum(kd_rows), sum(ce_rows)),
    ]:
        (fused, _), (ref, _) = fused_and_reference(
            case, mode=mode, kd_weight=0.3, sft_weight=2.0, reduction=reduction
        )
        for loss in (fused, ref):
            assert loss.kd.item() == pytest.approx(kd_want, rel=1e-12)
            assert loss.ce.item() == pytest.approx(ce_want, rel=1e-12)
            assert loss.total.item() == pytest.approx(0.3 * kd_want + 2.0 * ce_want, rel=1e-12)
        assert_same(case, mode=mode, kd_weight=0.3, sft_weight=2.0, reduction=reduction)


def test_temperature_squared_scales_only_the_kd_part():
    case = make_case(seed=13)
    (plain, _), _ = fused_and_reference(case, temperature=2.0)
    (scaled, _), _ = fused_and_reference(case, temperature=2.0, scale_by_t2=True)
    torch.testing.assert_close(scaled.kd, 4 * plain.kd, **TIGHT)
    torch.testing.assert_close(scaled.ce, plain.ce, **TIGHT)


# ------------------------------------------------------------- reference against definitions


def _full_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return (log_p.exp() * (log_p - log_q)).sum(1).mean()


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_with_k_equal_v_renorm_modes_are_the_full_vocabulary_kl(temperature):
    gen = torch.Generator().manual_seed(14)
    m, v = 5, 9
    z = torch.randn(m, v, generator=gen, dtype=F64)
    teacher = torch.log_softmax(torch.randn(m, v, generator=gen, dtype=F64), dim=1)
    lp, ids = teacher.topk(v, dim=1)
    log_p = torch.log_softmax(teacher / temperature, dim=1)
    log_q = torch.log_softmax(z / temperature, dim=1)
    targets = torch.full((m,), IGNORE_INDEX)
    for mode, want in [
        ("renorm", _full_kl(log_p, log_q)),
        ("teacher_renorm", _full_kl(log_p, log_q)),
        ("reverse", _full_kl(log_q, log_p)),
    ]:
        got = reference_kd_sft_loss(z, targets, ids, lp, mode=mode, temperature=temperature)
        torch.testing.assert_close(got.kd, want, **TIGHT)
    if temperature == 1.0:
        got = reference_kd_sft_loss(z, targets, ids, lp, mode="tail")
        torch.testing.assert_close(got.kd, _full_kl(teacher, log_q), **TIGHT)


def test_tail_is_the_kl_of_the_top_k_plus_one_bucket_distributions():
    gen = torch.Generator().manual_seed(15)
    m, v, k = 4, 40, 6
    z = torch.randn(m, v, generator=gen, dtype=F64)
    teacher = torch.softmax(torch.randn(m, v, generator=gen, dtype=F64), dim=1)
    p_k, ids = teacher.topk(k, dim=1)
    student = torch.softmax(z, dim=1)
    q_k = student.gather(1, ids)
    outside = torch.ones(m, v, dtype=torch.bool).scatter(1, ids, False)
    p = torch.cat([p_k, (teacher * outside).sum(1, keepdim=True)], dim=1)
    q = torch.cat([q_k, (student * outside).sum(1, keepdim=True)], dim=1)
    want = (p * (p.log() - q.log())).sum(1).mean()
    targets = torch.full((m,), IGNORE_INDEX)
    got = reference_kd_sft_loss(z, targets, ids, p_k.log(), mode="tail")
    torch.testing.assert_close(got.kd, want, **TIGHT)
    fused = kd_sft_loss(z, torch.eye(v, dtype=F64), targets, ids, p_k.log(), mode="tail")
    torch.testing.assert_close(fused.kd, want, **TIGHT)


def test_renorm_ce_part_is_plain_cross_entropy():
    case = make_case(seed=16, ignored=(0, 4))
    logits = torch.addmm(case["bias"], case["hidden"], case["weight"].t())
    want = torch.nn.functional.cross_entropy(logits, case["targets"], ignore_index=IGNORE_INDEX)
    (fused, _), (ref, _) = fused_and_reference(case)
    torch.testing.assert_close(fused.ce, want, **TIGHT)
    torch.testing.assert_close(ref.ce.detach(), want, **TIGHT)


# ----------------------------------------------------------------- autograd behaviour


def test_gradient_scales_with_the_upstream_gradient_and_frozen_inputs_get_none():
    case = make_case(seed=17)
    hidden = case["hidden"].clone().requires_grad_(True)
    weight = case["weight"].clone()  # frozen lm_head
    args = (case["targets"], case["kd_ids"], case["kd_logprobs"])
    kd_sft_loss(hidden, weight, *args, chunk_size=3).total.backward()
    unit = hidden.grad.clone()
    hidden.grad = None
    (2.5 * kd_sft_loss(hidden, weight, *args, chunk_size=3).total).backward()
    torch.testing.assert_close(hidden.grad, 2.5 * unit, **TIGHT)
    assert weight.grad is None


def test_no_grad_gives_the_same_values_without_forming_gradients():
    case = make_case(seed=18)
    hidden = case["hidden"].requires_grad_(True)
    args = (hidden, case["weight"], case["targets"], case["kd_ids"], case["kd_logprobs"])
    with torch.no_grad(), torch.profiler.profile() as prof:
        quiet = kd_sft_loss(*args, mode="tail")
    assert not quiet.total.requires_grad
    # Gradient formation multiplies d total / d logits into the weight: absent in evaluation.
    assert "aten::mm" in {e.key for e in prof.key_averages()}
    assert not {"aten::addmm_", "aten::scatter_add_"} & {e.key for e in prof.key_averages()}
    loud = kd_sft_loss(*args, mode="tail")
    torch.testing.assert_close(quiet.total, loud.total.detach(), **TIGHT)


def test_second_backward_through_the_same_loss_is_a_clear_error():
    case = make_case(seed=19)
    hidden = case["hidden"].requires_grad_(True)
    loss = kd_sft_loss(hidden, case["weight"], case["targets"], case["kd_ids"], case["kd_logprobs"])
    loss.total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.total.backward()


@pytest.mark.parametrize("mode", KD_MODES)
def test_bf16_student_is_computed_in_fp32(mode):
    case = make_case(seed=20, m=24, d=16, v=64, k=8, dtype=torch.bfloat16)
    case["bias"] = None
    fused_h = case["hidden"].clone().requires_grad_(True)
    fused_w = case["weight"].clone().requires_grad_(True)
    fused = kd_sft_loss(
        fused_h,
        fused_w,
        case["targets"],
        case["kd_ids"],
        case["kd_logprobs"].half(),
        mode=mode,
        chunk_size=5,
    )
    fused.total.backward()
    assert fused.total.dtype == torch.float32 and fused_w.grad.dtype == torch.bfloat16
    ref_h = case["hidden"].double().requires_grad_(True)
    ref_w = case["weight"].double().requires_grad_(True)
    ref = reference_kd_sft_loss(
        ref_h @ ref_w.t(), case["targets"], case["kd_ids"], case["kd_logprobs"].half(), mode=mode
    )
    ref.total.backward()
    # bf16 logits carry ~3 significant digits.
    torch.testing.assert_close(fused.total.double(), ref.total.detach(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused_w.grad.double(), ref_w.grad, rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(fused_h.grad.double(), ref_h.grad, rtol=5e-2, atol=5e-3)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(0, 9),
    v=st.integers(2, 24),
    k_frac=st.floats(0.0, 1.0),
    chunk=st.integers(1, 10),
    mode=st.sampled_from(KD_MODES),
    temperature=st.sampled_from([1.0, 0.7, 1.9]),
    kd_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_fused_equals_reference_on_random_shapes(
    m, v, k_frac, chunk, mode, temperature, kd_frac, seed
):
    k = 1 + int(k_frac * (v - 1))
    kd_rows = list(range(0, m, 1 if kd_frac > 0.5 else 2))
    ignored = tuple(range(1, m, 3))
    case = make_case(m=m, d=5, v=v, k=k, seed=seed, kd_rows=kd_rows, ignored=ignored)
    temperature = 1.0 if mode == "tail" else temperature
    assert_same(case, mode=mode, temperature=temperature, chunk_size=chunk, kd_weight=0.6)


# --------------------------------------------------------------------- gather_target_rows


def test_gather_target_rows_shifts_and_keeps_rows_without_teacher_data():
    b, length, d, v, k = 2, 6, 4, 30, 3
    gen = torch.Generator().manual_seed(21)
    hidden = torch.randn(b, length, d, generator=gen, dtype=F64, requires_grad=True)
    labels = torch.full((b, length), IGNORE_INDEX)
    labels[0, 2:5] = torch.tensor([7, 8, 9])  # three targets in sequence 0
    labels[1, 1] = 11  # one target in sequence 1
    # Teacher rows for (0, 3), (1, 1) and (1, 4) -- the last is not a target ("all" caches);
    # (0, 2) and (0, 4) are targets without teacher rows. Rows come in any order.
    kd_index = torch.tensor([1 * length + 4, 0 * length + 3, 1 * length + 1])
    rows = gather_target_rows(hidden, labels, kd_index)
    positions = [(0, 2), (0, 3), (0, 4), (1, 1), (1, 4)]
    assert rows.targets.tolist() == [7, 8, 9, 11, IGNORE_INDEX]
    assert rows.kd_rows.tolist() == [4, 1, 3]
    for row, (seq, pos) in enumerate(positions):
        assert torch.equal(rows.hidden[row], hidden[seq, pos - 1])

    # Through the fused loss, the gradient reaches the [B, L, D] hidden states; compare with the
    # reference written on full shifted logits.
    weight = torch.randn(v, d, generator=gen, dtype=F64)
    teacher = torch.log_softmax(torch.randn(3, v, generator=gen, dtype=F64), dim=1)
    lp, ids = teacher.topk(k, dim=1)
    loss = kd_sft_loss(rows.hidden, weight, rows.targets, ids, lp, kd_rows=rows.kd_rows)
    loss.total.backward()
    fused_grad = hidden.grad.clone()
    hidden.grad = None
    logits = (hidden[:, :-1] @ weight.t()).reshape(-1, v)  # row (s, p - 1) predicts (s, p)
    flat = torch.tensor([s * (length - 1) + p - 1 for s, p in positions])
    ref = reference_kd_sft_loss(logits[flat], rows.targets, ids, lp, kd_rows=rows.kd_rows)
    ref.total.backward()
    torch.testing.assert_close(loss.total, ref.total.detach(), **TIGHT)
    torch.testing.assert_close(fused_grad, hidden.grad, **TIGHT)
    assert fused_grad[:, -1].abs().sum() == 0  # the last position predicts nothing here


@pytest.mark.parametrize(
    ("labels_at_0", "kd_index", "message"),
    [
        (5, [3], "labels\\[0, 0\\] is a target"),
        (IGNORE_INDEX, [6], "first token of sequence 1"),
        (IGNORE_INDEX, [3, 3], "two teacher rows describe the token at flat position 3"),
        (IGNORE_INDEX, [12], "outside the batch of 2 x 6"),
    ],
)
def test_gather_target_rows_rejects_bad_batches(labels_at_0, kd_index, message):
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 0] = labels_at_0
    labels[0, 3] = 4
    with pytest.raises(ValueError, match=message):
        gather_target_rows(torch.zeros(2, 6, 3), labels, torch.tensor(kd_index))


# ---------------------------------------------------------------------------- bad input


def _bad(**changes) -> dict:
    case = make_case(m=4, v=10, k=3, seed=22)
    case.update(changes)
    return case


BAD_INPUTS = {
    "id outside vocab": (
        lambda: _bad(kd_ids=torch.tensor([[1, 2, 3]] * 3 + [[1, 2, 10]])),
        {},
        "teacher row 3 has token id 10 outside the student vocabulary",
    ),
    "repeated id": (
        lambda: _bad(kd_ids=torch.tensor([[1, 2, 3]] * 3 + [[4, 4, 5]])),
        {},
        "teacher row 3 lists token id 4 twice",
    ),
    "positive logprob": (
        lambda: _bad(kd_logprobs=torch.tensor([[-1.0, -2.0, -3.0]] * 3 + [[2.5, -1.0, -2.0]])),
        {},
        "teacher row 3 has logprob 2.5",
    ),
    "nan logprob": (
        lambda: _bad(kd_logprobs=torch.tensor([[-1.0, float("nan"), -3.0]] * 4)),
        {},
        "teacher row 0 has logprob nan",
    ),
    "target outside vocab": (
        lambda: _bad(targets=torch.tensor([1, 2, 99, 3])),
        {},
        "targets\\[2\\] = 99 is outside the student vocabulary",
    ),
    "teacher rows without kd_rows": (
        lambda: _bad(kd_ids=torch.tensor([[1, 2, 3]]), kd_logprobs=torch.tensor([[-1.0] * 3])),
        {},
        "1 teacher rows for 4 rows; pass kd_rows",
    ),
    "kd_rows repeated": (
        lambda: _bad(kd_rows=torch.tensor([0, 1, 1, 2])),
        {},
        "two teacher rows are mapped to row 1",
    ),
    "tail with temperature": (_bad, {"mode": "tail", "temperature": 2.0}, "temperature 1 only"),
    "unknown mode": (_bad, {"mode": "forward"}, "unknown mode 'forward'"),
    "zero temperature": (_bad, {"temperature": 0.0}, "temperature must be a positive number"),
    "K above V": (
        lambda: _bad(kd_ids=torch.arange(11).expand(4, 11), kd_logprobs=torch.full((4, 11), -3.0)),
        {},
        "K = 11 teacher ids per row exceed the student vocabulary of 10",
    ),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
@pytest.mark.parametrize("fused", [True, False])
def test_bad_input_is_a_clear_error(name, fused):
    build, kw, message = BAD_INPUTS[name]
    case = build()
    args = (case["targets"], case["kd_ids"], case["kd_logprobs"])
    with pytest.raises(ValueError, match=message):
        if fused:
            kd_sft_loss(case["hidden"], case["weight"], *args, kd_rows=case["kd_rows"], **kw)
        else:
            logits = case["hidden"] @ case["weight"].t()
            reference_kd_sft_loss(logits, *args, kd_rows=case["kd_rows"], **kw)


def test_fused_rejects_mismatched_shapes_and_unknown_backends():
    case = make_case(m=4, v=10, k=3, seed=23)
    args = (case["targets"], case["kd_ids"], case["kd_logprobs"])
    with pytest.raises(ValueError, match="same D"):
        kd_sft_loss(case["hidden"][:, :3], case["weight"], *args)
    with pytest.raises(ValueError, match="share one floating-point dtype"):
        kd_sft_loss(case["hidden"].float(), case["weight"], *args)
    with pytest.raises(ValueError, match="backend 'liger' is not available"):
        kd_sft_loss(case["hidden"], case["weight"], *args, backend="liger")


# ------------------------------------------------------------------------------ jsd and beta


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_fused_gradients_equal_reference_autograd(beta, temperature):
    case = make_case(kd_rows=[0, 2, 3, 5, 7, 8, 9, 10, 11, 12], ignored=(3, 6), seed=21)
    assert_same(
        case,
        mode="jsd",
        beta=beta,
        temperature=temperature,
        scale_by_t2=True,
        kd_weight=0.7,
        sft_weight=0.4,
    )


@pytest.mark.parametrize("beta", [0.2, 0.5, 0.8])
def test_jsd_is_the_generalised_jensen_shannon_divergence(beta):
    gen = torch.Generator().manual_seed(22)
    m, v = 5, 9
    z = torch.randn(m, v, generator=gen, dtype=F64)
    teacher = torch.log_softmax(torch.randn(m, v, generator=gen, dtype=F64), dim=1)
    lp, ids = teacher.topk(v, dim=1)  # K == V: the renormalised top-K is the whole distribution
    p, q = teacher.exp(), torch.softmax(z, dim=1)
    mix = beta * p + (1 - beta) * q
    want = beta * _full_kl(teacher, mix.log()) + (1 - beta) * _full_kl(q.log(), mix.log())
    targets = torch.full((m,), IGNORE_INDEX)
    got = reference_kd_sft_loss(z, targets, ids, lp, mode="jsd", beta=beta)
    torch.testing.assert_close(got.kd, want, **TIGHT)
    fused = kd_sft_loss(z, torch.eye(v, dtype=F64), targets, ids, lp, mode="jsd", beta=beta)
    torch.testing.assert_close(fused.kd, want, **TIGHT)


def test_jsd_end_points_are_forward_and_reverse_kl_and_the_middle_is_symmetric():
    case = make_case(seed=23)
    logits = case["hidden"] @ case["weight"].t()
    args = (logits, case["targets"], case["kd_ids"], case["kd_logprobs"])
    forward = reference_kd_sft_loss(*args, mode="renorm")
    reverse = reference_kd_sft_loss(*args, mode="reverse")
    torch.testing.assert_close(reference_kd_sft_loss(*args, mode="jsd", beta=0.0).kd, forward.kd)
    torch.testing.assert_close(reference_kd_sft_loss(*args, mode="jsd", beta=1.0).kd, reverse.kd)
    # Close to the end points JSD(beta) behaves like beta * forward and (1 - beta) * reverse.
    small = 1e-8
    near_0 = reference_kd_sft_loss(*args, mode="jsd", beta=small).kd / small
    near_1 = reference_kd_sft_loss(*args, mode="jsd", beta=1 - small).kd / small
    torch.testing.assert_close(near_0, forward.kd, rtol=1e-5, atol=0)
    torch.testing.assert_close(near_1, reverse.kd, rtol=1e-5, atol=0)
    # JSD(1/2) is symmetric: swapping teacher and student keeps the value (K == V here).
    gen = torch.Generator().manual_seed(24)
    a = torch.log_softmax(torch.randn(4, 6, generator=gen, dtype=F64), dim=1)
    b = torch.log_softmax(torch.randn(4, 6, generator=gen, dtype=F64), dim=1)
    ids = torch.arange(6).expand(4, 6)
    none = torch.full((4,), IGNORE_INDEX)
    ab = reference_kd_sft_loss(b, none, ids, a, mode="jsd", beta=0.5).kd
    ba = reference_kd_sft_loss(a, none, ids, b, mode="jsd", beta=0.5).kd
    torch.testing.assert_close(ab, ba, **TIGHT)
    assert 0 < float(ab) <= math.log(2)


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan")])
def test_beta_outside_0_1_is_a_clear_error(beta):
    case = make_case()
    with pytest.raises(ValueError, match="beta must be in"):
        kd_sft_loss(
            case["hidden"],
            case["weight"],
            case["targets"],
            case["kd_ids"],
            case["kd_logprobs"],
            mode="jsd",
            beta=beta,
        )


# ------------------------------------------------------------------------------ vocab_size


@pytest.mark.parametrize("mode", KD_MODES)
@pytest.mark.parametrize("use_bias", [False, True])
def test_vocab_size_fused_gradients_equal_reference_autograd(mode, use_bias):
    # 50 real tokens in a 64-column lm_head: ids and targets stay below 50.
    case = make_case(v=50, kd_rows=[0, 1, 2, 4, 5, 8, 9, 11], ignored=(3,), seed=25)
    gen = torch.Generator().manual_seed(26)
    pad = 14
    case["weight"] = torch.cat([case["weight"], torch.randn(pad, 8, generator=gen, dtype=F64)])
    case["bias"] = torch.cat([case["bias"], torch.randn(pad, generator=gen, dtype=F64) + 5])
    (fused, fused_grads), (ref, ref_grads) = fused_and_reference(
        case, use_bias=use_bias, mode=mode, vocab_size=50, kd_weight=0.6, sft_weight=0.3
    )
    for a, b in [(fused.total, ref.total), (fused.kd, ref.kd), (fused.ce, ref.ce)]:
        torch.testing.assert_close(a, b, **TIGHT)
    for a, b in zip(fused_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
    # The padding columns take no part: zero gradient, and the same loss as a 50-row lm_head.
    for grad in fused_grads[1:]:
        assert torch.count_nonzero(grad[50:]) == 0
    trimmed = dict(case, weight=case["weight"][:50], bias=case["bias"][:50])
    (plain, _), _ = fused_and_reference(
        trimmed, use_bias=use_bias, mode=mode, kd_weight=0.6, sft_weight=0.3
    )
    torch.testing.assert_close(fused.total, plain.total, **TIGHT)


def test_vocab_size_rejects_ids_of_the_padding_columns_and_bad_sizes():
    case = make_case(v=50)
    weight = torch.cat([case["weight"], torch.zeros(6, 8, dtype=F64)])
    targets = case["targets"].clone()
    targets[2] = 52
    with pytest.raises(ValueError, match=r"targets\[2\] = 52 is outside"):
        kd_sft_loss(
            case["hidden"], weight, targets, case["kd_ids"], case["kd_logprobs"], vocab_size=50
        )
    ids = case["kd_ids"].clone()
    ids[4, 1] = 51
    with pytest.raises(ValueError, match="teacher row 4 has token id 51"):
        kd_sft_loss(
            case["hidden"], weight, case["targets"], ids, case["kd_logprobs"], vocab_size=50
        )
    for bad in (0, 57, 2.5):
        with pytest.raises(ValueError, match="vocab_size"):
            kd_sft_loss(
                case["hidden"],
                weight,
                case["targets"],
                case["kd_ids"],
                case["kd_logprobs"],
                vocab_size=bad,
            )
        with pytest.raises(ValueError, match="vocab_size"):
            reference_kd_sft_loss(
                case["hidden"] @ weight.t(),
                case["targets"],
                case["kd_ids"],
                case["kd_logprobs"],
                vocab_size=bad,
            )
