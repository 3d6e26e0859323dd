"""kd_sft_loss and its reference refuse weights and temperatures that are not finite numbers,
instead of returning a NaN loss that poisons every gradient."""

from __future__ import annotations

import math

import pytest
import torch

from kd.losses import kd_sft_loss, reference_kd_sft_loss
from tests.test_losses import make_case


@pytest.mark.parametrize(
    "option, value",
    [
        ("kd_weight", math.nan),
        ("kd_weight", math.inf),
        ("sft_weight", -math.inf),
        ("sft_weight", math.nan),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", 0.0),
    ],
)
def test_non_finite_weights_and_temperatures_are_refused(option, value):
    case = make_case()
    with pytest.raises(ValueError, match=option):
        kd_sft_loss(
            case["hidden"],
            case["weight"],
            case["targets"],
            case["kd_ids"],
            case["kd_logprobs"],
            **{option: value},
        )
    logits = case["hidden"] @ case["weight"].T
    with pytest.raises(ValueError, match=option):
        reference_kd_sft_loss(
            logits, case["targets"], case["kd_ids"], case["kd_logprobs"], **{option: value}
        )


def test_finite_weights_still_work():
    case = make_case()
    loss = kd_sft_loss(
        case["hidden"],
        case["weight"],
        case["targets"],
        case["kd_ids"],
        case["kd_logprobs"],
        kd_weight=0.5,
        sft_weight=0.0,
    )
    assert torch.isfinite(loss.total)
