"""Preference strength: mean/std equal numpy, columns and histogram are written, AUROC is right."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.data import read_records
from training.methods import strength as S


def test_strength_matches_numpy():
    rng = np.random.default_rng(0)
    rc, rr = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    d = S.reward_differences(rc, rr)
    np.testing.assert_allclose(d.numpy(), rc - rr)
    for ddof in (0, 1):
        mean, std = S.preference_strength(d, ddof=ddof)
        np.testing.assert_allclose(mean.numpy(), (rc - rr).mean(0), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(std.numpy(), (rc - rr).std(0, ddof=ddof), rtol=1e-12, atol=1e-14)


def test_strength_known_values():
    # 3 members, 2 pairs: votes (1, 2, 3) and (-1, -1, 2)
    diffs = [[1.0, -1.0], [2.0, -1.0], [3.0, 2.0]]
    mean, std = S.preference_strength(diffs)
    assert mean.tolist() == pytest.approx([2.0, 0.0])
    assert std.tolist() == pytest.approx([np.sqrt(2 / 3), np.sqrt(2.0)])


def test_standardize_equalises_member_scales():
    d = torch.tensor([[1.0, -1.0, 2.0], [10.0, -10.0, 20.0]], dtype=torch.float64)
    mean, _ = S.preference_strength(d, standardize=True)
    np.testing.assert_allclose(mean.numpy(), (d[0] / d[0].std(correction=0)).numpy(), rtol=1e-12)


def test_ensemble_strength_and_files(tmp_path):
    scorers = [lambda m=m: (torch.tensor([1.0, 2.0]) * (m + 1), torch.tensor([0.0, 3.0])) for m in range(4)]
    mean, std, diffs = S.ensemble_strength(scorers)
    assert diffs.shape == (4, 2)
    np.testing.assert_allclose(mean.numpy(), [2.5, 2.0 * 2.5 - 3.0])
    rows = S.add_strength_columns([{"id": 0}, {"id": 1}], mean, std)
    S.write_jsonl(rows, tmp_path / "d.jsonl")
    back = read_records(tmp_path / "d.jsonl")
    assert back[1]["strength_mean"] == pytest.approx(2.0) and back[0]["strength_std"] == pytest.approx(std[0].item())
    S.plot_strength_histogram(mean, tmp_path / "h.png", flipped=[True, False])
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_auroc():
    assert S.auroc([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1]) == pytest.approx(1.0)
    assert S.auroc([0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1]) == pytest.approx(0.0)
    assert S.auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == pytest.approx(0.5)
    rng = np.random.default_rng(1)
    s, y = rng.normal(size=200), rng.random(200) < 0.3
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
    assert S.auroc(s, y) == pytest.approx(float(np.mean(pairs)))


def test_masked_out_of_bag_strength():
    rng = np.random.default_rng(2)
    d = rng.normal(size=(6, 9))
    idx = S.member_indices(9, 6, mode="subsample", seed=3, fraction=0.5)
    bag = S.in_bag_mask(idx, 9)
    assert bag.sum(1).tolist() == [4] * 6 or bag.sum(1).tolist() == [5] * 6
    oob = ~bag
    mean, std = S.preference_strength(d, mask=oob)
    for i in range(9):
        v = d[oob[:, i].numpy(), i]
        if len(v):
            assert mean[i].item() == pytest.approx(v.mean()) and std[i].item() == pytest.approx(v.std())
        else:
            assert np.isnan(mean[i].item())
    full = S.preference_strength(d, mask=np.ones((6, 9), bool))
    np.testing.assert_allclose(full[0].numpy(), d.mean(0), rtol=1e-12)
    assert S.member_indices(9, 2, mode="seed") == [list(range(9))] * 2
    assert len(S.member_indices(9, 2, mode="bootstrap", seed=1)[0]) == 9
