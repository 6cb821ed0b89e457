"""The objective registry: one pure function per DPO-family loss, declared needs, and every caller through it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import haf_kernels as hk
from haf_kernels import objectives
from haf_kernels.objectives import ObjectiveParams
from training.config import TrainConfig


def test_registry_names_and_declarations():
    assert objectives.names() == ("sigmoid", "hinge", "ipo", "simpo", "rdpo")
    for name in objectives.names():
        obj = objectives.get(name)
        assert obj.name == name and obj.summary and obj.uses <= set(ObjectiveParams.__dataclass_fields__)
    simpo = objectives.get("simpo")
    assert simpo.reference_free and simpo.length_averaged and "gamma" in simpo.uses
    assert not any(objectives.get(n).reference_free for n in ("sigmoid", "hinge", "ipo", "rdpo"))
    with pytest.raises(ValueError, match=r"policy_loss must be one of \('sigmoid', .*'rdpo'\), got 'orpo'"):
        objectives.get("orpo")


def test_register_refuses_duplicates_and_unknown_parameters():
    with pytest.raises(ValueError, match="already registered"):
        objectives.register("ipo")(lambda d, p: d)
    with pytest.raises(ValueError, match=r"unknown parameters \['tau'\]"):
        objectives.register("tau_loss", uses=("beta", "tau"))(lambda d, p: d)
    assert "tau_loss" not in objectives.names()


def test_rdpo_is_unbiased_under_label_flips():
    """rDPO's defining property: its expectation over labels flipped with probability ε is the clean DPO loss."""
    d = torch.linspace(-6, 6, 41, dtype=torch.float64)
    for eps in (0.0, 0.1, 0.3):
        p = ObjectiveParams(beta=0.7, label_smoothing=eps)
        rdpo = objectives.get("rdpo").loss
        expected = (1 - eps) * rdpo(d, p) + eps * rdpo(-d, p)
        torch.testing.assert_close(expected, -F.logsigmoid(0.7 * d))
    torch.testing.assert_close(
        objectives.get("rdpo").loss(d, ObjectiveParams(0.7)), objectives.get("sigmoid").loss(d, ObjectiveParams(0.7))
    )


def test_a_new_objective_is_one_function():
    """Registering a function is all it takes: fused_haf_loss and the training config accept it at once."""

    @objectives.register("test_square_hinge")
    def square_hinge(d, p):
        """Squared hinge ``relu(1 − βd)²`` (test only)."""
        return torch.relu(1.0 - p.beta * d) ** 2

    try:
        h = torch.randn(4, 5, 8, dtype=torch.float64, requires_grad=True)
        w = torch.randn(30, 8, dtype=torch.float64)
        y = torch.randint(0, 30, (4, 5))
        out = hk.fused_haf_loss(h, w, y, None, alpha=1.0, beta=0.5, policy_loss="test_square_hinge", backend="torch")
        seq = (h @ w.T).log_softmax(-1).gather(-1, y[..., None])[..., 0].sum(-1)
        want = torch.relu(1 - 0.5 * (seq[:2] - seq[2:])).pow(2).mean()
        torch.testing.assert_close(out.loss, want)
        out.loss.backward()
        assert torch.isfinite(h.grad).all()
        assert TrainConfig(policy_loss="test_square_hinge", train_data="x.jsonl").problems(need_data=False) == []
    finally:
        objectives._REGISTRY.pop("test_square_hinge")
