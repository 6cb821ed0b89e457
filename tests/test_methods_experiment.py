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


# ------------------------------------------------------------------ RM-quality experiment v2 (rm_quality.py)
def test_t_quantile_matches_tables():
    from training.experiments.stats import t_cdf, t_quantile

    # two-sided 95% critical values of Student's t (printed tables, 6+ digits)
    for df, q in [(1, 12.706205), (2, 4.302653), (4, 2.776445), (9, 2.262157), (29, 2.045230), (1000, 1.962339)]:
        assert t_quantile(0.975, df) == pytest.approx(q, abs=2e-6), df
    assert t_quantile(0.025, 4) == pytest.approx(-2.776445, abs=2e-6)
    assert t_cdf(0.0, 3) == pytest.approx(0.5, abs=1e-12)
    assert t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-12)  # Cauchy: 1/2 + atan(1)/π
    with pytest.raises(ValueError, match="p must be"):
        t_quantile(1.0, 3)


def test_mean_ci_and_paired_difference_on_a_known_case():
    from training.experiments.stats import mean_ci, paired_diff

    c = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, sd sqrt(2.5), half = t(0.975, 4) · sd / sqrt(5)
    assert (c["mean"], c["n"]) == (3.0, 5) and c["std"] == pytest.approx(2.5**0.5)
    assert c["half"] == pytest.approx(2.776445 * 2.5**0.5 / 5**0.5, rel=1e-6)
    assert (c["lo"], c["hi"]) == pytest.approx((3.0 - c["half"], 3.0 + c["half"]))
    one = mean_ci([0.7, float("nan")])
    assert one["n"] == 1 and one["mean"] == 0.7 and one["half"] != one["half"]
    # the same seed-to-seed spread on both sides cancels in the paired difference
    a = [0.80, 0.90, 0.70, 0.85, 0.75]
    b = [x - 0.02 + e for x, e in zip(a, [0.001, -0.001, 0.0, 0.002, -0.002])]
    d = paired_diff(a, b)
    assert d["mean"] == pytest.approx(0.02) and d["significant"] and d["lo"] > 0
    assert not mean_ci(b)["lo"] > mean_ci(a)["hi"]  # unpaired intervals overlap: only the paired test sees it
    noisy = paired_diff([0.1, 0.3, 0.2], [0.2, 0.1, 0.25])
    assert noisy["mean"] == pytest.approx(0.05 / 3) and not noisy["significant"]
    with pytest.raises(ValueError, match="one value per seed"):
        paired_diff([1.0], [1.0, 2.0])


def test_best_of_n_on_a_known_case():
    from training.experiments.stats import best_of_n

    scores = [[0.1, 0.9, 0.3], [2.0, 1.0, 0.0], [0.5, 0.5, 0.1], [1.0, 3.0, 2.0]]
    true = [[0.0, 5.0, 1.0], [1.0, 4.0, 0.0], [2.0, 1.0, 0.0], [7.0, 7.0, 1.0]]
    # picks: 1 (true best), 0 (regret 3), 0 (first of the tied scores: true best), 1 (tied true best: counts)
    r = best_of_n(scores, true)
    assert r == dict(recall=0.75, regret=0.75, n_prompts=4)
    # a perfect scorer, and the reversed one
    assert best_of_n(true, true)["recall"] == 1.0
    worst = best_of_n([[-x for x in t] for t in true[:2]], true[:2])
    assert worst == dict(recall=0.0, regret=(5.0 + 4.0) / 2, n_prompts=2)
    with pytest.raises(ValueError, match="N >= 2"):
        best_of_n([[1.0]], [[1.0]])


def test_variants_and_their_baselines():
    from training.experiments import rm_quality as Q

    var, base = Q.variants("", ["bt", "dpo", "haf"], ["base"])
    assert list(var) == ["bt", "dpo", "haf"] and set(base.values()) == {"bt"}
    assert var["dpo"]["scored_by"] == "implicit" and var["haf"]["changes"] == {}
    var, base = Q.variants("alpha", ["bt"], ["base"])
    assert [v["changes"]["alpha"] for v in var.values()] == list(Q.ALPHAS) and set(base.values()) == {"haf_a0.0"}
    var, base = Q.variants("beta", ["bt"], ["base"])
    assert [v["changes"].get("beta") for v in var.values()] == [None, *Q.BETAS] and set(base.values()) == {"bt"}
    var, base = Q.variants("size", ["bt", "haf"], ["small", "base"])
    assert list(var) == ["bt@small", "haf@small", "bt@base", "haf@base"]
    assert base["haf@small"] == "bt@small" and var["haf@base"]["size"] == "base"


def _quick_unit(tmp_path, name: str):
    from training.experiments import rm_quality as Q
    from training.experiments.prior import build_prior

    sizes = dict(Q.v1.SIZES, **Q.SIZES)
    sizes.update(Q.QUICK, max_steps=3)
    folder, _ = build_prior(Q.prior_config("base", quick=True), tmp_path / "priors", log=None)
    var, _ = Q.variants("", ["bt", "dpo"], ["base"])
    return Q.run_unit((str(tmp_path / name), 0.2, 1, sizes, var, {"base": str(folder)}))


def test_a_unit_repeated_in_one_process_gives_bitwise_identical_records(tmp_path):
    a, b = _quick_unit(tmp_path, "a"), _quick_unit(tmp_path, "b")
    timing = ("train_s", "eval_s")
    strip = lambda u: [{k: v for k, v in r.items() if k not in timing} for r in u["records"]]  # noqa: E731
    assert len(a["records"]) == 2 and strip(a) == strip(b)
    assert all(isinstance(r["bon_recall"], float) for r in a["records"])


def test_rm_quality_quick_end_to_end(tmp_path):
    from training.experiments import rm_quality as Q

    res = Q.main(["--quick", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    md = (tmp_path / "out" / "rm_quality.md").read_text()
    assert "BoN top-1 recall" in md and "paired difference vs BT baseline" in md and " ± " in md
    data = json.loads((tmp_path / "out" / "rm_quality.json").read_text())
    assert data["summary"] == json.loads(json.dumps(res["summary"]))
    recs = [r for u in data["units"] for r in u["records"]]
    assert {(r["method"], r["seed"]) for r in recs} == {(m, s) for m in Q.QUICK_METHODS for s in (0, 1)}
    n_test, n_bon = Q.QUICK["n_test"], Q.QUICK["bon_prompts"]
    for r in recs:  # fractions of the whole split / prompt set
        assert r["test_acc"] * n_test == pytest.approx(round(r["test_acc"] * n_test), abs=1e-6), r
        assert r["bon_recall"] * n_bon == pytest.approx(round(r["bon_recall"] * n_bon), abs=1e-6), r
        assert r["bon_regret"] >= 0 and r["bon_shift_regret"] >= 0
    cell = data["summary"]["cells"]["haf"]["test_acc@0.2"]
    assert cell["n"] == 2 and cell["mean"] == pytest.approx(
        sum(r["test_acc"] for r in recs if r["method"] == "haf") / 2
    )
    assert data["summary"]["diffs"]["dpo"]["bon_recall@0.2"]["baseline"] == "bt"
    assert "bt" not in data["summary"]["diffs"]
    assert data["meta"]["prior"]["base"]["config"]["pretrain_steps"] == Q.QUICK_PRIOR["pretrain_steps"]
    zero = data["meta"]["prior_zero_shot"]["base"]  # the SFT prior alone, scored by its log-likelihood
    assert set(zero) == {m for m, _, _ in Q.METRICS} and 0.0 <= zero["bon_recall"] <= 1.0
    assert "SFT prior alone" in md
    assert (tmp_path / "out" / "rm_quality.png").stat().st_size > 1000


@pytest.mark.parametrize("extra", [["--sweep", "alpha"], ["--sweep", "beta"], ["--sweep", "size"], ["--no-prior"]])
def test_rm_quality_sweeps_and_no_prior_run_at_tiny_size(tmp_path, extra):
    from training.experiments import rm_quality as Q

    args = ["--quick", "--seeds", "0", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    res = Q.main(args + extra)
    names = {r["method"] for u in res["units"] for r in u["records"]}
    if extra == ["--sweep", "alpha"]:
        assert names == {f"haf_a{a}" for a in Q.ALPHAS}
    elif extra == ["--sweep", "size"]:
        assert names == {f"{m}@{s}" for m in Q.QUICK_METHODS for s in Q.MODEL_SIZES}
        keys = {rec["key"] for rec in res["meta"]["prior"].values()}
        assert len(keys) == len(Q.MODEL_SIZES)  # one prior per model size
        md = (tmp_path / "out" / "rm_quality_size.md").read_text()
        assert "| HaF (alpha=0.2)@small − BT baseline (alpha=0)@small |" in md  # each size against its own BT
    elif extra == ["--no-prior"]:
        assert res["meta"]["prior"] is None and res["meta"]["base_config"].get("model", "") == ""
        assert res["meta"]["base_config"]["model_config"] == Q.QUICK_MODEL
    tag = "rm_quality_" + ("noprior" if extra == ["--no-prior"] else extra[1])
    assert (tmp_path / "out" / f"{tag}.md").exists() and (tmp_path / "out" / f"{tag}.json").exists()


@pytest.mark.slow
def test_rm_quality_secrets_sweep_quick(tmp_path):
    """``--sweep secrets``: BT, HaF and every Secrets-II method from the prior, the strength ensemble's AUROC per
    unit, paired differences vs HaF; the ensemble's members start from the prior and train away from it."""
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    from training import checkpoint as ckpt
    from training.config import TrainConfig
    from training.data import load_tokenizer, read_records
    from training.ensemble import load_member
    from training.experiments import rm_quality as Q
    from training.experiments.stats import paired_diff
    from training.methods.strength import auroc
    from training.trainer import build_model

    work = tmp_path / "work"
    res = Q.main(["--quick", "--sweep", "secrets", "--out", str(tmp_path / "out"), "--work", str(work)])
    recs = [r for u in res["units"] for r in u["records"]]
    assert {(r["method"], r["seed"]) for r in recs} == {(m, s) for m in Q.SECRETS_METHODS for s in (0, 1)}
    # per unit: the strength ensemble (M members) and its AUROC, as recomputed from the file it wrote
    for u in res["units"]:
        st = u["strength"]["base"]
        assert st["members"] == Q.QUICK_STRENGTH["members"]
        rows = read_records(st["out_path"])
        expect = auroc([-r["strength_mean"] for r in rows], [bool(r["flipped"]) for r in rows])
        assert 0.0 <= st["auroc_flipped"] <= 1.0 and st["auroc_flipped"] == pytest.approx(expect)
    summ = json.loads((tmp_path / "out" / "rm_quality_secrets.json").read_text())["summary"]
    au = summ["strength"]["base"]["by_noise"]["0.2"]["auroc_flipped"]
    assert au["n"] == 2 and au["mean"] == pytest.approx(
        sum(u["strength"]["base"]["auroc_flipped"] for u in res["units"]) / 2
    )
    # paired differences vs HaF for every "HaF + X", matching the records
    vs_haf = summ["diffs_vs_haf"]
    assert set(vs_haf) == set(Q.SECRETS_METHODS) - {"bt", "haf"}
    by = {(r["method"], r["seed"]): r["test_acc"] for r in recs}
    d = paired_diff([by["haf_margin", s] for s in (0, 1)], [by["haf", s] for s in (0, 1)])
    assert vs_haf["haf_margin"]["test_acc@0.2"]["baseline"] == "haf"
    assert vs_haf["haf_margin"]["test_acc@0.2"]["mean"] == pytest.approx(d["mean"])
    assert summ["diffs"]["haf_margin"]["test_acc@0.2"]["baseline"] == "bt"
    md = (tmp_path / "out" / "rm_quality_secrets.md").read_text()
    assert "paired difference vs HaF (alpha=0.2)" in md and "**Preference strength** (base prior, M=2" in md
    # the flip run trained on its unit's strength file with the lowest 10% by strength_mean flipped
    unit = work / "rm_quality_secrets_quick" / "noise0.2_seed0"
    strength_rows = read_records(res["units"][0]["strength"]["base"]["out_path"])
    flip_rows = read_records(unit / "haf_flip" / "method_data" / "train.jsonl")
    k = round(0.1 * len(strength_rows))
    lowest = sorted(r["strength_mean"] for r in strength_rows)[:k]
    flipped = sorted(-r["strength_mean"] for r in flip_rows if r.get("noisy_flipped"))  # flipping negates strength
    assert len(flip_rows) == len(strength_rows) and flipped == pytest.approx(lowest)
    # a member's initial weights are the prior's (its config points at the prior folder), and it trained
    prior = work / f"prior-{res['meta']['prior']['base']['key']}"
    member = unit / "strength_base" / "member_01"
    cfg = TrainConfig.from_dict(ckpt.load(member / ckpt.CHECKPOINT)["config"])
    assert Path(cfg.model) == prior and cfg.alpha == 0.0
    with torch.random.fork_rng():
        init = build_model(cfg, load_tokenizer(cfg)).base_lm.state_dict()
    ref = AutoModelForCausalLM.from_pretrained(str(prior)).state_dict()
    assert init.keys() == ref.keys() and all(torch.equal(init[k], ref[k]) for k in ref)
    trained = load_member(member)[0].base_lm.state_dict()
    assert any(not torch.equal(trained[k], ref[k]) for k in ref)


# ------------------------------------------------------------------ --portable: the same bits on other SIMD paths
_PORTABLE_SCRIPT = """
import hashlib, json, pathlib, sys
portable, work = sys.argv[1] == "1", pathlib.Path(sys.argv[2])
if portable:
    from training.experiments.numerics import pin_portable_numerics
    pin_portable_numerics()
from training.experiments import rm_quality as Q
from training.experiments.prior import build_prior
sizes = dict(Q.v1.SIZES, **Q.SIZES)
sizes.update(Q.QUICK, max_steps=3)
folder, _ = build_prior(Q.prior_config("base", quick=True), work / "priors", log=None)
var, _ = Q.variants("", ["bt"], ["base"])
Q.run_unit((str(work / "unit"), 0.2, 1, sizes, var, {"base": str(folder)}))
from safetensors.torch import load_file
def digest(path):  # the tensors only (the header's metadata may name the run)
    h = hashlib.sha256()
    for name, t in sorted(load_file(str(path)).items()):
        h.update(name.encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
import torch
files = sorted(work.rglob("*.safetensors"))
print(json.dumps({str(p.relative_to(work)): digest(p) for p in files}))
"""

# What another CPU would run: baseline-x86 ATen kernels, MKL's SSE2-compatible GEMMs, oneDNN and haf's row kernels
# without AVX (this machine can run all of them, so the test emulates a CPU with other SIMD paths).
_OTHER_CPU = {
    "MKL_CBWR": "COMPATIBLE",
    "ATEN_CPU_CAPABILITY": "default",
    "DNNL_MAX_CPU_ISA": "SSE41",
    "HAF_CPP_ISA": "default",
}


def _weights_digest(tmp_path, name: str, portable: bool, other_cpu: bool) -> dict[str, str]:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in _OTHER_CPU}
    if other_cpu:
        env.update(_OTHER_CPU)
    env["OMP_NUM_THREADS"] = "1"
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    work = tmp_path / name
    proc = subprocess.run(
        [sys.executable, "-c", _PORTABLE_SCRIPT, "1" if portable else "0", str(work)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_portable_numerics_give_the_same_weights_on_other_simd_paths(tmp_path):
    """--portable pins every library's SIMD path: the prior and a fine-tuned reward model come out bitwise equal
    when the process would otherwise run other kernels (an emulated CPU), while without it they differ."""
    from training.experiments.numerics import cpu_flags

    if not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("--portable needs an x86-64 CPU with AVX2 and FMA")
    pinned = _weights_digest(tmp_path, "a", portable=True, other_cpu=False)
    pinned_other = _weights_digest(tmp_path, "b", portable=True, other_cpu=True)
    native = _weights_digest(tmp_path, "c", portable=False, other_cpu=False)
    native_other = _weights_digest(tmp_path, "d", portable=False, other_cpu=True)
    assert len(pinned) >= 2, pinned  # the prior and the reward model at least
    assert pinned == pinned_other
    assert set(native) == set(native_other) and native != native_other  # the emulated CPU does change the bits


def test_portable_refuses_after_torch_chose_its_kernels():
    """In a process whose torch already dispatched its kernels on another path, --portable refuses in one line
    instead of silently running unpinned."""
    import os
    import subprocess
    import sys

    from training.experiments.numerics import cpu_flags

    if not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("--portable needs an x86-64 CPU with AVX2 and FMA")
    code = (
        "import torch; torch.ones(3).exp().sum()\n"
        "from training.experiments.numerics import pin_portable_numerics\n"
        "pin_portable_numerics()\n"
    )
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "--portable: torch already runs its DEFAULT kernels in this process" in proc.stderr
