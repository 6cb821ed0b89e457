"""End to end: the Secrets-of-RLHF-II experiment in ``--quick`` mode runs every method and writes the table."""

from __future__ import annotations

import json

import pytest

from training.experiments import secrets_rlhf as X


@pytest.mark.slow
def test_quick_experiment_end_to_end(tmp_path):
    X.main(["--quick", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    md = (tmp_path / "out" / "secrets_rlhf.md").read_text()
    for name in X.METHODS:
        assert X.METHODS[name][0] in md
    data = json.loads((tmp_path / "out" / "secrets_rlhf.json").read_text())
    recs = [r for u in data["units"] for r in u["records"]]
    assert {r["method"] for r in recs} == set(X.METHODS)
    n_test, n_shift = X.QUICK["n_test"], X.QUICK["n_shift"]
    for r in recs:  # each method is scored by its own reward, as a fraction of the whole held-out split
        kind = "implicit" if X.METHODS[r["method"]][2] == "implicit" else "reward"
        assert (r["test_acc"], r["shift_acc"]) == (r[f"test_{kind}_acc"], r[f"shift_{kind}_acc"]), r
        assert r["test_acc"] * n_test == pytest.approx(round(r["test_acc"] * n_test), abs=1e-6), r
        assert r["shift_acc"] * n_shift == pytest.approx(round(r["shift_acc"] * n_shift), abs=1e-6), r
    auroc = data["summary"]["auroc"]["0.2"]
    assert auroc["n"] == 1 and auroc["mean"] == pytest.approx(data["units"][0]["strength"]["auroc_flipped"]), auroc
    assert (tmp_path / "out" / "secrets_rlhf.png").stat().st_size > 1000
    assert (tmp_path / "out" / "strength_hist.png").exists()
    # the flip run trained on a rewritten file with exactly 10% of the pairs flipped
    unit = tmp_path / "work" / "noise0.2_seed0"
    flipped = [json.loads(line) for line in open(unit / "haf_flip" / "method_data" / "train.jsonl")]
    assert sum(bool(r.get("noisy_flipped")) for r in flipped) == round(0.1 * len(flipped))
