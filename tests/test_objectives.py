"""The objective registry: one pure function per DPO-family loss, declared needs, and every caller through it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import haf_kernels as hk
from haf_kernels import objectives
from haf_kernels.objectives import ObjectiveParams, PairQuantities
from training.config import TrainConfig


def test_registry_names_and_declarations():
    assert objectives.names()[:3] == ("sigmoid", "hinge", "ipo") and "simpo" in objectives.names()
    assert "rdpo" not in objectives.names() and objectives.aliases() == {"rdpo": "robust"}
    for name in objectives.names():
        obj = objectives.get(name)
        assert obj.name == name and obj.summary and obj.uses <= set(ObjectiveParams.__dataclass_fields__)
    simpo = objectives.get("simpo")
    assert simpo.reference_free and simpo.length_averaged and "gamma" in simpo.uses
    assert [n for n in objectives.names() if objectives.get(n).reference_free] == ["simpo"]
    assert {n for n in objectives.names() if objectives.get(n).length_averaged} == {"ipo", "sigmoid_norm", "simpo"}
    assert {n for n in objectives.names() if objectives.get(n).batch_coupled} == {"aot", "aot_unpaired"}
    assert objectives.get("rdpo") is objectives.get("robust")
    with pytest.raises(ValueError, match=r"policy_loss must be one of \('sigmoid', .*'simpo'\), got 'orpo'"):
        objectives.get("orpo")


def test_register_refuses_duplicates_and_unknown_parameters():
    with pytest.raises(ValueError, match="already registered"):
        objectives.register("ipo")(lambda q, p: q.d)
    with pytest.raises(ValueError, match="'rdpo' is already registered"):
        objectives.register("x_loss", aliases=("rdpo",))(lambda q, p: q.d)
    with pytest.raises(ValueError, match=r"unknown parameters \['tau'\]"):
        objectives.register("tau_loss", uses=("beta", "tau"))(lambda q, p: q.d)
    with pytest.raises(ValueError, match=r"unknown quantities \['hidden'\]"):
        objectives.register("h_loss", needs=("hidden",))(lambda q, p: q.d)
    assert not {"tau_loss", "x_loss", "h_loss"} & set(objectives.names())


def test_combination_parsing_and_errors():
    """policy_loss: one name, a list or a comma-separated string; policy_loss_weights: one per name, >= 0."""
    plan = objectives.combination("sigmoid, bco_pair,sft", [0.8, 0.2, 1])
    assert [(o.name, w) for o, w in plan] == [("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)]
    assert [w for _, w in objectives.combination(["ipo", "rdpo"])] == [1.0, 1.0]
    assert objectives.combination(["rdpo"])[0][0].name == "robust"
    with pytest.raises(ValueError, match=r"policy_loss must be one of .*got 'kto'"):
        objectives.combination("kto")
    with pytest.raises(ValueError, match=r"got unknown \['kto'\] in \['sigmoid', 'kto'\]"):
        objectives.combination(["sigmoid", "kto"])
    with pytest.raises(ValueError, match=r"got 2 weights for 3 objectives"):
        objectives.combination("sigmoid,hinge,ipo", [1.0, 2.0])
    with pytest.raises(ValueError, match=r"finite numbers >= 0, got \[1.0, -0.5\]"):
        objectives.combination(["sigmoid", "hinge"], [1.0, -0.5])
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        objectives.combination(["sigmoid"], [float("nan")])
    with pytest.raises(ValueError, match="all 0"):
        objectives.combination(["sigmoid", "hinge"], [0, 0.0])
    with pytest.raises(ValueError, match="no empty names"):
        objectives.combination("sigmoid,,hinge")
    with pytest.raises(TypeError, match="policy_loss must be a name"):
        objectives.combination(3)
    with pytest.raises(TypeError, match="policy_loss_weights must be a list"):
        objectives.combination(["sigmoid"], 1.0)
    assert objectives.uses_means("sigmoid,ipo") and not objectives.uses_means("sigmoid")
    assert objectives.uses_means("hinge", average_log_prob=True)


def test_robust_is_unbiased_under_label_flips():
    """rDPO's defining property: its expectation over labels flipped with probability ε is the clean DPO loss."""
    d = torch.linspace(-6, 6, 41, dtype=torch.float64)
    q, flipped = PairQuantities.build(d, torch.zeros_like(d)), PairQuantities.build(torch.zeros_like(d), d)
    robust = objectives.get("robust").loss
    for eps in (0.0, 0.1, 0.3):
        p = ObjectiveParams(beta=0.7, label_smoothing=eps)
        expected = (1 - eps) * robust(q, p) + eps * robust(flipped, p)
        torch.testing.assert_close(expected, -F.logsigmoid(0.7 * d))
    torch.testing.assert_close(robust(q, ObjectiveParams(0.7)), objectives.get("sigmoid").loss(q, ObjectiveParams(0.7)))


def test_discopop_is_finite_where_exp_overflows():
    """exp(−z)·σ(z/τ) as one exponent: z = −800 gives the logistic part alone, not inf·0 = NaN."""
    d = torch.tensor([-800.0, -30.0, 0.0, 30.0, 800.0], dtype=torch.float64)
    q = PairQuantities.build(d, torch.zeros_like(d))
    p = ObjectiveParams(beta=1.0, discopop_tau=0.05)
    got = objectives.get("discopop").loss(q, p)
    z = d[1:4]
    naive = -F.logsigmoid(z) * (1 - torch.sigmoid(z / 0.05)) + torch.exp(-z) * torch.sigmoid(z / 0.05)
    torch.testing.assert_close(got[1:4], naive)
    assert got[0] == 800.0 and got[4] == 0.0


def test_a_new_objective_is_one_function():
    """Registering a function is all it takes: fused_haf_loss and the training config accept it at once."""

    @objectives.register("test_square_hinge")
    def square_hinge(q, p):
        """Squared hinge ``relu(1 − βd)²`` (test only)."""
        return torch.relu(1.0 - p.beta * q.d) ** 2

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
