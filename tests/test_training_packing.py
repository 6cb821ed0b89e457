"""Sequence packing (``pack: true``): several sequences per row of the model body, same loss as unpacked.

Packed rows run with per-sequence ``position_ids`` and a block-diagonal causal mask; the hidden states are gathered
back into the ``[2B, T, D]`` layout of ``fused_haf_loss``. Checked here on tiny local models (Llama, Qwen2, GPT-2 with
learned absolute positions; sdpa and eager attention): loss, rewards, log-probs and gradients equal the unpacked ones
in fp32; perturbing one sequence leaves every other packed sequence unchanged (and a mask without the block
structure fails that check); unsupported settings are refused naming the key.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from conftest import rel_err, tiny_train_config

import training.model as model_mod
from training.config import ConfigError, TrainConfig
from training.data import PairExample, collate_packed, collate_pairs, pack_rows, padding_fraction
from training.hooks import TrainHooks
from training.model import HafRewardModel, build_causal_lm, packing_problem
from training.synthetic import write_task
from training.trainer import loss_on_batch, train

VOCAB = 61
EOS = 2
ARCHS = {
    "llama": dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64
    ),
    "qwen2": dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    ),
    # learned absolute positions (wpe): wrong position_ids would change every packed sequence after the first
    "gpt2": dict(n_embd=16, n_layer=2, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=EOS),
}


def tiny_model(arch: str, attn: str = "sdpa", seed: int = 0) -> HafRewardModel:
    lm = build_causal_lm(
        model_type=arch, config_overrides=dict(ARCHS[arch], vocab_size=VOCAB, attn_implementation=attn), seed=seed
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        return HafRewardModel(lm).float()


def random_pairs(n: int, seed: int = 0, max_len: int = 20) -> list[PairExample]:
    """Pairs of random lengths (odd and uneven; prompts 1..6 tokens), some with an EOS policy target."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 6))]
        c = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, max_len - len(p)))]
        r = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, max_len - len(p)))]
        ends = (EOS if rng.random() < 0.5 else None, EOS if rng.random() < 0.5 else None)
        out.append(PairExample(p, c, r, i, end_labels=ends))
    return out


# ---------------------------------------------------------------------------------------------- layout
def test_pack_rows_first_fit_decreasing():
    lengths = [5, 9, 3, 7, 1, 4, 10]
    rows = pack_rows(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == math.ceil(sum(lengths) / 10)  # 39 tokens: FFD finds the 4 rows here
    with pytest.raises(ValueError, match=r"lengths\[1\] must be in \[1, capacity=8\], got 9"):
        pack_rows(lengths, 8)


def test_collate_packed_layout_matches_collate_pairs():
    examples = random_pairs(5, seed=3)
    plain = collate_pairs(examples, pad_token_id=0)
    batch = collate_packed(examples, pad_token_id=0, pack_length=24, pad_to_multiple_of=8)
    lay = batch.packing
    for name in ("input_ids", "attention_mask", "labels", "index"):  # the loss's tensors are the unpacked ones
        assert torch.equal(getattr(batch, name), getattr(plain, name))
    r, w = lay.input_ids.shape
    assert w % 8 == 0 and w <= 24 and r < plain.input_ids.shape[0]
    flat_ids = lay.input_ids.reshape(-1)
    real = plain.attention_mask.bool()
    assert torch.equal(flat_ids[lay.gather_index][real], plain.input_ids[real])  # every token found where it was
    assert torch.equal(flat_ids[lay.last_index], plain.input_ids[torch.arange(10), real.sum(1) - 1])
    for s in range(10):  # positions restart at 0 for every sequence; segments name the sequence
        n = int(lay.length[s])
        row, st = int(lay.row[s]), int(lay.start[s])
        assert lay.position_ids[row, st : st + n].tolist() == list(range(n))
        assert (lay.segment_ids[row, st : st + n] == s).all()
    assert int((lay.segment_ids >= 0).sum()) == int(real.sum())
    assert lay.padding_fraction() == pytest.approx(1 - int(real.sum()) / (r * w))


def test_padding_fraction_counts_positions():
    ex = [PairExample([1, 2], [3], [4, 5, 6], 0), PairExample([1], [3, 4, 5, 6, 7], [8], 1)]  # lengths 3,6 / 5,2
    assert padding_fraction([ex]) == pytest.approx(1 - 16 / (4 * 6))
    # rows of 8: FFD puts 6+2 and 5+3 -> 2 rows of 8, no padding; rows of 6: 6 | 5 | 3+2 -> 3 rows of 6
    assert padding_fraction([ex], pack_length=8) == pytest.approx(0.0)
    assert padding_fraction([ex], pack_length=6) == pytest.approx(1 - 16 / 18)


# ---------------------------------------------------------------------------------------------- same loss
def _loss_and_grads(model: HafRewardModel, batch, packed: bool, ref: torch.Tensor):
    cfg = TrainConfig(alpha=0.5, reward_weight=1.0, beta=0.3, backend="torch", label_smoothing=0.05)
    compute = loss_on_batch(cfg, batch, ref, (None, None), TrainHooks(), 0, None, False)
    model.zero_grad(set_to_none=True)
    loss, res, _ = model(
        batch.input_ids, batch.attention_mask, compute=compute, packing=batch.packing if packed else None
    )
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), res, grads


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_packed_loss_rewards_logps_and_grads_equal_unpacked(arch, attn):
    model = tiny_model(arch, attn).eval()  # GPT-2 has dropout: its masks are drawn per layout, so compare without
    examples = random_pairs(6, seed=7)
    plain = collate_pairs(examples, pad_token_id=0)
    packed = collate_packed(examples, pad_token_id=0, pack_length=32)
    assert packed.packing.input_ids.shape[0] < 12  # several sequences share rows
    ref = -20 * torch.rand(12)
    l0, r0, g0 = _loss_and_grads(model, plain, False, ref)
    l1, r1, g1 = _loss_and_grads(model, packed, True, ref)
    assert abs(float(l1 - l0)) <= 1e-5 * max(1.0, abs(float(l0)))
    for name in ("chosen_logps", "rejected_logps", "reward_margin", "reward_loss", "policy_loss"):
        assert rel_err(getattr(r1, name), getattr(r0, name)) <= 1e-5, name
    assert g0.keys() == g1.keys() and len(g0) > 5
    flat0 = torch.cat([g.reshape(-1) for g in g0.values()])
    flat1 = torch.cat([g1[n].reshape(-1) for n in g0])
    assert rel_err(flat1, flat0) <= 1e-5
    for n in g0:  # every parameter, with a floor for tiny gradients
        assert (g1[n] - g0[n]).norm() <= 1e-5 * max(float(g0[n].norm()), float(flat0.norm()) * 1e-3), n


# ---------------------------------------------------------------------------------------------- isolation
def _per_sequence(model: HafRewardModel, batch):
    """``(rewards [S], log-prob sums [S])`` of a packed batch."""
    with torch.no_grad():
        out = model(batch.input_ids, batch.attention_mask, packing=batch.packing)
        logp = model.token_logprobs(out.hidden, batch.labels, backend="torch").sum(1)
    return out.rewards, logp


def _perturbed(examples: list[PairExample], k: int) -> list[PairExample]:
    """``examples`` with the prompt and chosen tokens of pair ``k`` replaced (same lengths: the same layout)."""
    ex = examples[k]
    bump = lambda ids: [3 + (t + 17) % (VOCAB - 3) for t in ids]  # noqa: E731
    out = list(examples)
    out[k] = PairExample(bump(ex.prompt_ids), bump(ex.chosen_ids), ex.rejected_ids, ex.index, end_labels=ex.end_labels)
    return out


def _isolation_report(model: HafRewardModel, examples: list[PairExample], k: int):
    """Max change of the *other* sequences' rewards and log-probs when pair ``k``'s chosen sequence changes, the
    change of that sequence's own reward, and how many other sequences shared its row."""
    a = collate_packed(examples, pad_token_id=0, pack_length=48)
    b = collate_packed(_perturbed(examples, k), pad_token_id=0, pack_length=48)
    assert torch.equal(a.packing.segment_ids, b.packing.segment_ids)
    ra, la = _per_sequence(model, a)
    rb, lb = _per_sequence(model, b)
    others = torch.ones(ra.shape[0], dtype=torch.bool)
    others[k] = False
    # the rejected sequence of pair k shares its prompt tokens (changed too): leave it out of "others"
    others[len(examples) + k] = False
    sharing = int((a.packing.row[others] == a.packing.row[k]).sum())
    delta = max(float((ra - rb)[others].abs().max()), float((la - lb)[others].abs().max()))
    return delta, float((ra[k] - rb[k]).abs()), sharing


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_sequence_never_sees_the_others_in_its_row(arch):
    model = tiny_model(arch).eval()
    examples = random_pairs(6, seed=11, max_len=14)
    delta, own, sharing = _isolation_report(model, examples, k=0)
    assert sharing >= 1  # the perturbed sequence really shares a row with others
    assert own > 1e-4  # the perturbation changes its own reward ...
    assert delta == 0.0  # ... and nothing of any other sequence (masked keys contribute exact zeros)


def test_the_isolation_check_fails_with_a_plain_causal_mask(monkeypatch):
    """The negative control: a mask without the block-diagonal structure lets sequences attend across the boundary,
    and both the isolation check above and the trainer's probe (``check_packing``) see it."""
    model = tiny_model("llama").eval()
    block_mask = model_mod.packed_attention_mask
    plain_causal = lambda seg, impl, dtype: block_mask(torch.zeros_like(seg), impl, dtype)  # noqa: E731
    monkeypatch.setattr(model_mod, "packed_attention_mask", plain_causal)
    delta, _, sharing = _isolation_report(model, random_pairs(6, seed=11, max_len=14), k=0)
    assert sharing >= 1 and delta > 1e-4
    with pytest.raises(ValueError, match="attends across packed sequences"):
        model.check_packing()


def test_gpt2_absolute_positions_follow_position_ids():
    """GPT-2 reads learned absolute positions: packing without per-sequence position_ids would be caught."""
    model = tiny_model("gpt2").eval()
    assert model.check_packing() <= 1e-4
    batch = collate_packed(random_pairs(4, seed=5), pad_token_id=0, pack_length=48)
    good, _ = _per_sequence(model, batch)
    lay = batch.packing
    lay.position_ids = torch.arange(lay.input_ids.shape[1]).expand_as(lay.input_ids).contiguous()  # row positions
    wrong, _ = _per_sequence(model, batch)
    starts_late = lay.start > 0
    assert starts_late.any() and (good - wrong)[starts_late].abs().min() > 1e-4


# ---------------------------------------------------------------------------------------------- refusals
def test_unsupported_settings_are_named():
    cfg = build_causal_lm(model_type="qwen2", config_overrides=dict(ARCHS["qwen2"], vocab_size=VOCAB)).config
    assert packing_problem(cfg, 32) is None
    cfg._attn_implementation = "flex_attention"
    assert "'flex_attention' is not supported" in packing_problem(cfg, 32)
    windowed = build_causal_lm(
        model_type="mistral", config_overrides=dict(ARCHS["llama"], vocab_size=VOCAB, sliding_window=16)
    ).config
    assert "sliding_window=16" in packing_problem(windowed, 32)
    assert packing_problem(windowed, 16) is None  # a window as long as any sequence never cuts inside one
    with pytest.raises(ConfigError, match=r"pack_length: must be 0 or >= max_length \(32\)"):
        TrainConfig(pack=True, pack_length=16, max_length=32, max_prompt_length=8).validate()


# ---------------------------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("packing")
    write_task(d, n_train=32, n_test=8, n_shift=2, noise_rate=0.2)
    return d


def _train_losses(run_dir) -> list[float]:
    rec = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rec if r["split"] == "train"]


@pytest.mark.parametrize(
    "kw",
    [
        dict(reference="precomputed", pack_length=48),
        dict(lora_r=4, lora_target_modules=["gate_proj", "up_proj"]),  # reference: the adapter disabled
    ],
    ids=["precomputed", "lora"],
)
def test_haf_train_pack_matches_unpacked_steps(data, tmp_path, capsys, kw):
    """Two optimiser steps of two accumulated micro-batches each, with and without packing: the same losses and
    final evaluation. (The reference model's forward and the evaluation run unpacked in every mode; the frozen copy
    runs the same model code as the LoRA reference with its adapter off.)"""
    packed = train(tiny_train_config(data, tmp_path / "packed", pack=True, **kw))
    out = capsys.readouterr().out
    assert "[haf-train] padding: " in out and "(pack: on;" in out
    plain = train(tiny_train_config(data, tmp_path / "plain", **kw))
    lp, lu = _train_losses(tmp_path / "packed"), _train_losses(tmp_path / "plain")
    assert len(lp) == 2 and all(math.isfinite(x) for x in lp)
    assert lp == pytest.approx(lu, rel=1e-5, abs=1e-6)
    assert packed["reward_margin"] == pytest.approx(plain["reward_margin"], rel=1e-4, abs=1e-6)


def test_haf_train_refuses_an_attention_it_cannot_check(data, tmp_path):
    cfg = tiny_train_config(
        data, tmp_path / "run", pack=True, model_config={**ARCHS["llama"], "attn_implementation": "flex_attention"}
    )
    with pytest.raises(ConfigError, match=r"^pack: attention implementation 'flex_attention' is not supported"):
        train(cfg)
