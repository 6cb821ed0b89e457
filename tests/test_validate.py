"""Bad input raises ValueError/TypeError naming the argument, before any kernel runs."""

from __future__ import annotations

import pytest
import torch

import haf_kernels as hk


def good():
    b, t, d, v = 2, 4, 8, 11
    return dict(
        hidden=torch.randn(2 * b, t, d),
        lm_head_weight=torch.randn(v, d),
        labels=torch.randint(0, v, (2 * b, t)),
        rewards=torch.randn(2 * b),
        ref_logps=torch.randn(2 * b),
    )


def call(**over):
    args = good()
    kwargs = {k: over.pop(k) for k in list(over) if k not in args}
    args.update(over)
    return hk.fused_haf_loss(
        args["hidden"], args["lm_head_weight"], args["labels"], args["rewards"], args["ref_logps"], **kwargs
    )


BAD = [
    (dict(hidden=torch.randn(4, 8)), ValueError, "hidden must be \\[2B, T, D\\]"),
    (dict(hidden=torch.randn(3, 4, 8), labels=torch.zeros(3, 4, dtype=torch.long)), ValueError, "even"),
    (dict(labels=torch.zeros(4, 5, dtype=torch.long)), ValueError, "labels must be \\[2B, T\\]"),
    (dict(labels=torch.zeros(4, 4)), TypeError, "labels must be an integer tensor"),
    (dict(labels=torch.full((4, 4), 11)), ValueError, "labels must be in \\[0, 11\\)"),
    (dict(labels=torch.full((4, 4), -5)), ValueError, "found -5"),
    (dict(lm_head_weight=torch.randn(11, 9)), ValueError, "must share D"),
    (dict(lm_head_weight=torch.randn(11, 8, dtype=torch.float64)), TypeError, "one dtype"),
    (dict(hidden=torch.randint(0, 3, (4, 4, 8))), TypeError, "hidden must be a floating tensor"),
    (dict(rewards=torch.randn(3)), ValueError, "rewards must be \\[2B\\] = \\[4\\]"),
    (dict(ref_logps=torch.randn(4, 1)), ValueError, "ref_logps must be \\[2B\\]"),
    (dict(policy_loss="kto"), ValueError, "policy_loss must be one of"),
    (dict(policy_loss="simpo"), ValueError, "reference-free"),
    (dict(policy_loss=["sigmoid", "simpo"]), ValueError, "policy_loss='simpo' is reference-free"),
    (dict(policy_loss=["sigmoid", "kto"]), ValueError, "got unknown \\['kto'\\]"),
    (dict(policy_loss="sigmoid,ipo", policy_loss_weights=[1.0]), ValueError, "got 1 weights for 2 objectives"),
    (dict(policy_loss="sigmoid,ipo", policy_loss_weights=[1.0, -1.0]), ValueError, "finite numbers >= 0"),
    (dict(policy_loss="exo_pair"), ValueError, "needs label_smoothing > 0"),
    (dict(policy_loss="aot", pair_weights=torch.ones(2)), ValueError, "pass pair_weights=None"),
    (dict(policy_loss="discopop", discopop_tau=0.0), ValueError, "discopop_tau must be a positive"),
    (dict(beta=0.0), ValueError, "beta must be a positive"),
    (dict(beta=-1.0), ValueError, "beta must be a positive"),
    (dict(label_smoothing=0.5), ValueError, "label_smoothing must be in \\[0, 0.5\\)"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(alpha=-1.0), ValueError, "alpha must be"),
    (dict(reward_margin=torch.randn(3)), ValueError, "reward_margin must be a scalar or \\[B\\]"),
    (dict(reward_margin="big"), TypeError, "reward_margin"),
    (dict(pair_weights=torch.randn(3)), ValueError, "pair_weights must be \\[B\\]"),
    (dict(pair_weights=torch.tensor([1.0, -1.0])), ValueError, "pair_weights must be finite and >= 0"),
    (dict(lm_head_bias=torch.randn(10)), ValueError, "bias must be \\[V\\]"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(logit_scale=float("nan")), ValueError, "logit_scale"),
    (dict(backend="cuda-magic"), ValueError, "backend must be one of"),
    (dict(rewards=None, alpha=0.0), ValueError, "alpha must be > 0 when rewards is None"),
    (dict(hidden="not a tensor"), TypeError, "hidden must be a torch.Tensor"),
]


@pytest.mark.parametrize("over,exc,msg", BAD, ids=[m for _, _, m in BAD])
def test_bad_haf_input(over, exc, msg):
    with pytest.raises(exc, match=msg):
        call(**over)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch_cuda():
    with pytest.raises(ValueError, match="device|on cuda"):
        call(rewards=torch.randn(4, device="cuda"))


def test_device_mismatch_meta():
    with pytest.raises(ValueError, match="weight is on meta"):
        hk.linear_logprobs(torch.randn(3, 4), torch.randn(5, 4, device="meta"), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize(
    "args,exc,msg",
    [
        ((torch.randn(3, 4, 2), torch.randn(5, 4), torch.zeros(3, dtype=torch.long)), ValueError, "hidden must be"),
        (
            (torch.randn(3, 4), torch.randn(5), torch.zeros(3, dtype=torch.long)),
            ValueError,
            "weight must be \\[V, D\\]",
        ),
        ((torch.randn(3, 4), torch.randn(0, 4), torch.zeros(3, dtype=torch.long)), ValueError, "at least one row"),
        (
            (torch.randn(3, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long)),
            ValueError,
            "labels must be \\[N\\]",
        ),
        ((torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 5, 1])), ValueError, "labels must be in \\[0, 5\\)"),
        ((torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0.0, 1.0, 1.0])), TypeError, "integer"),
    ],
)
def test_bad_logprob_input(args, exc, msg):
    with pytest.raises(exc, match=msg):
        hk.linear_logprobs(*args)


def test_sequence_logprobs_bad_shapes():
    with pytest.raises(ValueError, match="hidden must be \\[S, T, D\\]"):
        hk.sequence_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be \\[S, T\\]"):
        hk.sequence_logprobs(torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 4, dtype=torch.long))


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend must be one of"):
        hk.linear_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), backend="x")


def test_center_rewards_coefficient_checked():
    import haf_kernels as hk

    h, w, y = torch.randn(4, 3, 8), torch.randn(20, 8), torch.randint(0, 20, (4, 3))
    with pytest.raises(ValueError, match=r"center_rewards_coefficient must be a finite number >= 0, got -0.1"):
        hk.fused_haf_loss(h, w, y, torch.randn(4), center_rewards_coefficient=-0.1)
    with pytest.raises(ValueError, match="center_rewards_coefficient > 0 centres the reward-head scores: pass rewards"):
        hk.fused_haf_loss(h, w, y, None, center_rewards_coefficient=0.01)
