"""Config → methods glue: data rewriting (flip/drop/margin), contrastive hook, MetaRM shifted pool."""

from __future__ import annotations

import dataclasses
import json

import torch
from torch import nn

from training.methods import integration as I


@dataclasses.dataclass
class FakeCfg:
    run_dir: str
    train_data: str
    eval_data: str = "eval.jsonl"
    seed: int = 0
    noisy_mode: str = ""
    noisy_fraction: float = 0.1
    noisy_threshold: float = float("nan")
    adaptive_margin: float = 0.0
    weight_column: str = ""
    margin_column: str = ""
    margin_scale: float = 1.0
    contrastive: str = ""
    contrastive_on: str = "pair"

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)


def _write(tmp_path, n=20):
    rows = [{"prompt": "p", "chosen": f"c{i}", "rejected": f"r{i}", "strength_mean": float(i - 5)} for i in range(n)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows, str(path)


def test_prepare_flip_and_margin(tmp_path):
    rows, path = _write(tmp_path)
    cfg = FakeCfg(str(tmp_path / "run"), path, noisy_mode="flip", noisy_fraction=0.1, adaptive_margin=2.0)
    new = I.prepare_method_data(cfg)
    assert new.weight_column == "weight" and new.margin_column == "strength_mean" and new.margin_scale == 2.0
    out = [json.loads(line) for line in open(new.train_data)]
    assert [r["chosen"] for r in out[:2]] == ["r0", "r1"] and out[2]["chosen"] == "c2"
    assert [r["strength_mean"] for r in out[:3]] == [5.0, 4.0, -3.0]
    assert I.prepare_method_data(new) is new  # already rewritten: not flipped twice
    drop = I.prepare_method_data(FakeCfg(str(tmp_path / "run2"), path, noisy_mode="drop", noisy_threshold=0.0))
    assert [r["weight"] for r in map(json.loads, open(drop.train_data))] == [0.0] * 5 + [1.0] * 15
    assert I.prepare_method_data(FakeCfg(str(tmp_path / "run3"), path)).train_data == path


def test_prepare_reads_compressed_strength_files(tmp_path):
    """A strength file as any data reader takes it (here .jsonl.gz) works for the noisy-pair modes."""
    import gzip

    rows, path = _write(tmp_path)
    gz = tmp_path / "train.jsonl.gz"
    gz.write_bytes(gzip.compress(open(path, "rb").read()))
    new = I.prepare_method_data(FakeCfg(str(tmp_path / "run"), str(gz), noisy_mode="flip", noisy_fraction=0.1))
    out = [json.loads(line) for line in open(new.train_data)]
    assert [r["chosen"] for r in out[:3]] == ["r0", "r1", "c2"] and len(out) == len(rows)


class _M(nn.Module):
    def __init__(self):
        super().__init__()
        self.lm_head = nn.Linear(6, 11, bias=False)

    @property
    def lm_head_weight(self):
        return self.lm_head.weight


def test_contrastive_hook(tmp_path):
    m = _M()
    I.add_contrastive(m, FakeCfg("", "", contrastive="swav"))
    assert m.rm_methods["contrastive"].swav.prototypes.shape == (50, 6)
    assert any(n.startswith("rm_methods.") for n, _ in m.named_parameters())
    out = type("O", (), {"features": torch.randn(8, 6, requires_grad=True)})()
    loss = I.contrastive_aux_loss(out, None, m, 0)
    loss.backward()
    assert out.features.grad.abs().sum() > 0
    assert I.contrastive_aux_loss(out, None, _M(), 0) is None


def test_shifted_pool(tmp_path):
    from training.synthetic import SyntheticTask, write_jsonl

    task = SyntheticTask(seed=0)
    write_jsonl(task.unlabelled(6, k=4, seed=1), tmp_path / "pool.jsonl")
    pool = I.ShiftedPool(tmp_path / "pool.jsonl", task.tokenizer(), k=3, max_length=32, max_prompt_length=8)
    ids, mask = pool.batch(2, seed=0, device=torch.device("cpu"))
    assert ids.shape[0] == 6 and mask.shape == ids.shape and (mask.sum(1) > 0).all()
    ids2, _ = pool.batch(2, seed=0, device=torch.device("cpu"))
    assert torch.equal(ids, ids2)
