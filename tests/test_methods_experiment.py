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
    assert all(0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["shift_acc"] <= 1.0 for r in recs)
    assert 0.0 <= data["summary"]["auroc"]["0.2"]["mean"] <= 1.0
    assert (tmp_path / "out" / "secrets_rlhf.png").stat().st_size > 1000
    assert (tmp_path / "out" / "strength_hist.png").exists()
    # the flip run trained on a rewritten file with exactly 10% of the pairs flipped
    unit = tmp_path / "work" / "noise0.2_seed0"
    flipped = [json.loads(line) for line in open(unit / "haf_flip" / "method_data" / "train.jsonl")]
    assert sum(bool(r.get("noisy_flipped")) for r in flipped) == round(0.1 * len(flipped))
