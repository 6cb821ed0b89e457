"""Every objective that shares a name with TRL is checked against TRL's own loss code (TRL 1.16).

TRL's ``DPOTrainer._compute_loss`` is called on a stub trainer and a stub model that returns fixed per-token
log-probs (precomputed reference log-probs, no model, no accelerator): the same function TRL trains with, on the
same per-sequence log-probs as ours, in float64. ``simpo`` is checked against ``CPOTrainer.cpo_loss``.
"""

from __future__ import annotations

import collections
import re
import types

import pytest
import torch
from conftest import rel_err

import haf_kernels as hk
from haf_kernels import objectives
from haf_kernels.logprobs import pair_chunks
from haf_kernels.objectives import ObjectiveParams, PairQuantities
from haf_kernels.tuning import current

dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer", reason="trl is not installed: no TRL to compare with")
dpo_config = pytest.importorskip("trl.trainer.dpo_config")

# TRL 1.16's DPOTrainer loss types (its DPOConfig help lists them; test_every_trl_loss_type_is_registered reads it).
TRL_LOSS_TYPES = [
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]
# Ours applies ε (conservative DPO) where TRL 1.16 ignores label_smoothing: compared with TRL at ε = 0 and, for
# ε > 0, with TRL's own sigmoid on the pair and on the swapped pair (test_sigmoid_smoothing_in_trl_terms).
EPS_ONLY_OURS = {"sigmoid", "sigmoid_norm"}
LOSS_TOL = 1e-6  # relative; fp64 both sides (TRL's exo_pair takes log ε in fp32: ~1e-9)


class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x


def trl_dpo_loss(loss_types, weights, tok_logps, mask, ref_logps, *, beta, eps, tau=0.05):
    """TRL's DPO loss (``DPOTrainer._compute_loss``) of per-token log-probs ``tok_logps [2B, T]`` (chosen rows
    then rejected) over response tokens ``mask [2B, T]``, with reference sequence sums ``ref_logps [2B]``."""
    two_b, t = tok_logps.shape
    b = two_b // 2
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=list(loss_types),
        loss_weights=list(weights) if weights is not None else [1.0] * len(loss_types),
        beta=beta,
        label_smoothing=eps,
        use_weighting=False,
        args=types.SimpleNamespace(discopop_tau=tau),
        _metrics={"train": collections.defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    lp = tok_logps * mask  # the fused LM head returns 0 at label -100
    outputs = types.SimpleNamespace(
        log_probs=lp, entropy=torch.zeros_like(lp), mean_logits=torch.zeros_like(lp), is_top1=mask.bool() & False
    )
    # the prompt token in front (TRL's completion_mask is over input_ids; the log-probs over the shifted labels)
    completion_mask = torch.cat([torch.zeros(two_b, 1, dtype=torch.long), mask.long()], dim=1)
    inputs = dict(
        input_ids=torch.zeros(two_b, t + 1, dtype=torch.long),
        attention_mask=torch.ones(two_b, t + 1, dtype=torch.long),
        completion_mask=completion_mask,
        ref_chosen_logps=ref_logps[:b],
        ref_rejected_logps=ref_logps[b:],
    )
    return dpo_trainer.DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)


def random_pairs(b, t, *, scale=8.0, seed=0):
    """Per-token log-probs, response masks (one empty row) and reference sums, wide enough for |βd| ≫ 1 of both
    signs."""
    gen = torch.Generator().manual_seed(seed)
    tok = -torch.rand(2 * b, t, generator=gen, dtype=torch.float64) * scale
    mask = torch.rand(2 * b, t, generator=gen) < 0.7
    mask[:, 0] = True
    mask[b + 1] = False  # a rejected response with no tokens (means clamp the count at 1, as TRL)
    ref = torch.randn(2 * b, generator=gen, dtype=torch.float64) * 3 * scale
    return tok, mask, ref


def ours(names, weights, tok, mask, ref, *, beta, eps, tau=0.05, average_log_prob=False):
    """Our policy loss on the same per-sequence quantities, through ``objectives.combination`` (no kernels)."""
    b = tok.shape[0] // 2
    sums, n = (tok * mask).sum(1), mask.sum(1).double()
    total = 0.0
    for obj, w in objectives.combination(names, weights):
        means = average_log_prob or obj.length_averaged
        s, r = (sums / n.clamp_min(1), ref / n.clamp_min(1)) if means else (sums, ref)
        q = PairQuantities.build(s[:b], s[b:], r[:b], r[b:], chosen_tokens=n[:b], rejected_tokens=n[b:], averaged=means)
        total = total + w * obj.loss(q, ObjectiveParams(beta=beta, label_smoothing=eps, discopop_tau=tau)).mean()
    return total


def test_every_trl_loss_type_is_registered():
    """TRL's own list (DPOConfig's help) against ours: a loss type TRL adds shows up here."""
    help_text = dpo_config.DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    listed = re.findall(r"`'(\w+)'`", help_text)
    assert sorted(listed) == sorted(TRL_LOSS_TYPES)
    assert set(TRL_LOSS_TYPES) <= set(objectives.names())
    assert objectives.get("rdpo") is objectives.get("robust")


# ε = 0 and ε > 0 for each (EXO needs ε > 0: 1e-3 then; sigmoid/sigmoid_norm at ε = 0 only, see EPS_ONLY_OURS)
TRL_CASES = [
    (name, beta, eps if name != "exo_pair" or eps > 0 else 1e-3)
    for name in TRL_LOSS_TYPES
    for beta in (0.1, 1.0)
    for eps in (0.0, 0.125)
    if not (name in EPS_ONLY_OURS and eps > 0)
]


@pytest.mark.parametrize("name,beta,eps", TRL_CASES)
def test_objective_matches_trl(name, beta, eps):
    tok, mask, ref = random_pairs(6, 7, seed=TRL_LOSS_TYPES.index(name) * 4 + int(beta > 0.5) * 2 + int(eps > 0))
    d = ((tok * mask).sum(1) - ref)[:6] - ((tok * mask).sum(1) - ref)[6:]
    assert (d > 0).any() and (d < 0).any() and d.abs().max() > 20  # both signs, |βd| ≫ 1 at β = 1
    want = trl_dpo_loss([name], None, tok, mask, ref, beta=beta, eps=eps)
    got = ours(name, None, tok, mask, ref, beta=beta, eps=eps)
    assert torch.isfinite(want) and rel_err(got, want) <= LOSS_TOL, (name, float(got), float(want))


def test_reference_free_is_a_zero_reference():
    tok, mask, _ = random_pairs(5, 6, seed=3)
    zero = torch.zeros(10, dtype=torch.float64)
    for name in ("sigmoid", "ipo", "nca_pair", "sppo_hard", "aot", "apo_down"):
        b = 5
        sums, n = (tok * mask).sum(1), mask.sum(1).double()
        obj = objectives.get(name)
        s = sums / n.clamp_min(1) if obj.length_averaged else sums
        q = PairQuantities.build(s[:b], s[b:], chosen_tokens=n[:b], rejected_tokens=n[b:], averaged=obj.length_averaged)
        got = obj.loss(q, ObjectiveParams(beta=0.5)).mean()
        want = trl_dpo_loss([name], None, tok, mask, zero, beta=0.5, eps=0.0)
        assert rel_err(got, want) <= LOSS_TOL, name


@pytest.mark.parametrize("name", ["sigmoid", "sigmoid_norm"])
def test_sigmoid_smoothing_in_trl_terms(name):
    """Our ε > 0: conservative DPO, (1−ε)·TRL(pair) + ε·TRL(swapped pair), where TRL 1.16 ignores ε."""
    tok, mask, ref = random_pairs(6, 5, seed=11)
    b, eps = 6, 0.2
    swap = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    trl_plain = trl_dpo_loss([name], None, tok, mask, ref, beta=0.3, eps=eps)
    trl_swapped = trl_dpo_loss([name], None, tok[swap], mask[swap], ref[swap], beta=0.3, eps=eps)
    got = ours(name, None, tok, mask, ref, beta=0.3, eps=eps)
    assert rel_err(got, (1 - eps) * trl_plain + eps * trl_swapped) <= LOSS_TOL
    assert rel_err(got, trl_plain) > 1e-3  # the documented difference is real


def test_weighted_combination_matches_trl():
    """TRL's ``loss_type`` list with ``loss_weights`` (MPO's example: sigmoid, bco_pair, sft with 0.8, 0.2, 1.0)."""
    tok, mask, ref = random_pairs(7, 6, seed=5)
    for names, weights, eps in (
        (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.0),
        (["ipo", "aot", "discopop", "exo_pair", "robust"], [0.5, 2.0, 0.0, 1.5, 0.3], 0.01),
        (["hinge", "sppo_hard"], None, 0.0),
    ):
        want = trl_dpo_loss(names, weights, tok, mask, ref, beta=0.2, eps=eps)
        got = ours(names, weights, tok, mask, ref, beta=0.2, eps=eps)
        assert rel_err(got, want) <= LOSS_TOL, names
        assert rel_err(ours(",".join(names), weights, tok, mask, ref, beta=0.2, eps=eps), want) <= LOSS_TOL


def test_simpo_matches_trl_cpo():
    """``simpo`` is TRL's CPOTrainer SimPO (``cpo_loss`` on per-token means, γ margin, ε smoothing, no NLL term)."""
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer", reason="TRL's CPO trainer is not importable")
    tok, mask, _ = random_pairs(6, 7, seed=7)
    b = 6
    means = (tok * mask).sum(1) / mask.sum(1).clamp_min(1)
    for eps, gamma in ((0.0, 0.5), (0.1, 1.2)):
        trainer = types.SimpleNamespace(
            alpha=0.0, accelerator=_Accelerator(), loss_type="simpo", beta=2.0, simpo_gamma=gamma, label_smoothing=eps
        )
        want, _, _ = cpo.CPOTrainer.cpo_loss(trainer, means[:b], means[b:])
        q = PairQuantities.build(means[:b], means[b:], averaged=True)
        got = objectives.get("simpo").loss(q, ObjectiveParams(beta=2.0, label_smoothing=eps, gamma=gamma))
        assert rel_err(got, want) <= LOSS_TOL


# ---------------------------------------------------------------------------------------------- through fused_haf_loss
def make_batch(n_pairs, t, d, v, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * n_pairs, t, d, generator=gen, dtype=torch.float64) * 2
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, v, (2 * n_pairs, t), generator=gen)
    labels[torch.rand(2 * n_pairs, t, generator=gen) < 0.3] = -100
    labels[:, 0] = torch.randint(0, v, (2 * n_pairs,), generator=gen)
    ref = torch.randn(2 * n_pairs, generator=gen, dtype=torch.float64) * 10  # sums
    return hidden, weight, labels, ref


@pytest.mark.parametrize("names,weights", [(["ipo"], None), (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])])
def test_fused_haf_loss_reference_matches_trl(names, weights):
    """The whole loss (reference backend, float64) against TRL on the log-probs the same logits give."""
    hidden, weight, labels, ref = make_batch(4, 6, 8, 29, seed=1)
    mask = labels != -100
    tok = (hidden @ weight.T).log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    want = trl_dpo_loss(names, weights, tok, mask, ref, beta=0.3, eps=0.0)
    ref_in = objectives.sequence_logps(ref, mask.sum(1), objectives.uses_means(names))
    out = hk.fused_haf_loss(
        hidden, weight, labels, None, ref_in, alpha=1.0, beta=0.3, policy_loss=names,
        policy_loss_weights=weights, backend="reference",
    )  # fmt: skip
    assert rel_err(out.loss, want) <= LOSS_TOL and rel_err(out.policy_loss, want) <= LOSS_TOL


def test_haf_loss_module_takes_a_weighted_list():
    hidden, weight, labels, ref = make_batch(3, 5, 8, 23, seed=4)
    kw = dict(alpha=1.0, label_smoothing=0.1, backend="reference")
    module = hk.HafLoss(policy_loss=["robust", "sft"], policy_loss_weights=[1.0, 0.5], **kw)
    got = module(hidden, weight, labels, None, ref)
    robust = hk.fused_haf_loss(hidden, weight, labels, None, ref, policy_loss="robust", **kw)
    sft = hk.fused_haf_loss(hidden, weight, labels, None, None, policy_loss="sft", **kw)
    assert "policy_loss_weights=[1.0, 0.5]" in repr(module)
    torch.testing.assert_close(got.loss, robust.loss + 0.5 * sft.loss, rtol=1e-12, atol=0)


COMBOS = [[name] for name in TRL_LOSS_TYPES] + [
    ["sigmoid", "bco_pair", "sft"],
    ["ipo", "nca_pair", "apo_zero"],  # means and sums in one loss: ref_logps arrive as means
    ["aot_unpaired", "hinge"],
]


@pytest.mark.parametrize("names", COMBOS, ids=lambda n: "+".join(n))
def test_chunked_fused_path_equals_reference(names, monkeypatch):
    """Reference backend (float64, materialised logits, autograd) against the torch backend finishing its gradients
    inside the forward over several chunks of pairs: loss, log-probs and gradients (hidden, weight, ref_logps)."""
    monkeypatch.setenv("HAF_KEEP_CHUNK_MB", "1")
    n_pairs, t, v = 6, 8, 4096  # 1 MiB of kept fp32 logits holds 64 tokens: about 4 pairs a chunk
    hidden, weight, labels, ref = make_batch(n_pairs, t, 8, v, seed=len(names))
    chunks = pair_chunks(labels, v, -100, current())
    assert chunks is not None and len(chunks) > 1
    eps = 0.05
    weights = [0.7, 1.3, 0.4][: len(names)] if len(names) > 1 else None
    ref_in = objectives.sequence_logps(ref, (labels != -100).sum(1), objectives.uses_means(names))
    kw = dict(alpha=0.7, beta=0.4, policy_loss=names, policy_loss_weights=weights, label_smoothing=eps)
    up = torch.tensor(1.7, dtype=torch.float64)

    def run(backend, grad_in_forward):
        leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_(), ref_in.clone().requires_grad_()]
        out = hk.fused_haf_loss(
            leaves[0], leaves[1], labels, None, leaves[2], backend=backend, grad_in_forward=grad_in_forward, **kw
        )
        return out, torch.autograd.grad(out.loss * up, leaves, allow_unused=True, materialize_grads=True)

    want, want_grads = run("reference", None)
    coupled = any(objectives.get(n).batch_coupled for n in names)
    if coupled:  # no per-chunk gradient: refused when forced, recomputed in backward by default
        with pytest.raises(ValueError, match=r"couples pairs across the batch.*HAF_KEEP_CHUNK_MB=1"):
            run("torch", True)
        got, got_grads = run("torch", None)
    else:
        got, got_grads = run("torch", True)
        assert not got.chosen_logps.requires_grad  # the fused path ran (its log-probs are detached)
    for key in ("loss", "policy_loss", "chosen_logps", "rejected_logps", "implicit_margin"):
        assert rel_err(getattr(got, key), getattr(want, key)) < 1e-10, key
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert torch.isfinite(g).all() and (i == 2 or w.abs().max() > 0)  # sft alone reads no reference
        assert rel_err(g, w) < 1e-10, i


def test_batch_coupled_in_one_chunk_uses_the_fused_path():
    """When the whole batch fits one chunk, aot's gradients are finished in the forward too, and agree."""
    hidden, weight, labels, ref = make_batch(5, 6, 8, 31, seed=9)
    results = []
    for backend, gif in (("reference", None), ("torch", True)):
        h = hidden.clone().requires_grad_()
        out = hk.fused_haf_loss(
            h, weight, labels, None, ref, alpha=1.0, policy_loss="aot", backend=backend, grad_in_forward=gif
        )
        results.append((out, torch.autograd.grad(out.loss, [h])[0]))
    (want, gw), (got, gg) = results
    assert not got.chosen_logps.requires_grad
    assert rel_err(got.loss, want.loss) < 1e-10 and rel_err(gg, gw) < 1e-10
