"""``haf_kernels.integrations.trl``: the HaF loss inside TRL's training loop agrees with ``training`` and saves a
model that ``transformers`` reloads.

Tiny 1-layer Llama models from a config and the offline tokenizers of ``reward_contract_helpers`` (no downloads).
Each check can fail: the TRL trainer's batches and loss are compared with ``training.data`` / ``training.trainer``
on the same rows and weights, training must lower the loss on its batch, and the reloaded models must reproduce
the trainer's rewards and log-probs.
"""

from __future__ import annotations

import copy
import importlib
import sys

import pytest
import torch

pytest.importorskip("trl", reason="trl is not installed (pip install haf_kernels[trl])")
pytest.importorskip("datasets", reason="datasets is not installed (pip install haf_kernels[trl])")

from datasets import Dataset  # noqa: E402
from reward_contract_helpers import hh_rows, hh_to_messages, llama_style_tokenizer, write_rows  # noqa: E402

from haf_kernels.integrations.trl import HafConfig, HafTrainer  # noqa: E402

MAX_LENGTH, MAX_PROMPT = 48, 24


@pytest.fixture(autouse=True)
def _one_thread():
    """Models this tiny gain nothing from threads, and on a loaded 2-core machine OpenMP waits cost 5x here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(tok, seed: int = 0):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return transformers.AutoModelForCausalLM.from_config(cfg)


def rows_of(fmt: str, n: int) -> list[dict]:
    rows = hh_rows(n, seed=3, long_every=3)  # every third prompt is long: truncation is exercised
    if fmt == "implicit":
        return rows
    if fmt == "conversational":
        return [hh_to_messages(r) for r in rows]
    out = []
    for r in rows:  # explicit prompt; responses without a leading space (the contract joins them with one)
        cut = r["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
        out.append(
            {"prompt": r["chosen"][:cut], "chosen": r["chosen"][cut:].strip(), "rejected": r["rejected"][cut:].strip()}
        )
    return out


def make_trainer(tmp_path, fmt="explicit", n=4, model=None, **kw):
    tok = llama_style_tokenizer(chat=fmt == "conversational")
    model = model if model is not None else tiny_llama(tok)
    cfg = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=n,
        max_steps=3,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        bf16=False,  # TRL's default is bf16 autocast; fp32 here so the comparisons are tight
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        max_length=MAX_LENGTH,
        max_prompt_length=MAX_PROMPT,
        seed=0,
    )
    peft_config = kw.pop("peft_config", None)
    cfg.update(kw)
    rows = rows_of(fmt, n)
    trainer = HafTrainer(
        model,
        args=HafConfig(**cfg),
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=peft_config,
    )
    return trainer, tok, rows


def batch_of(trainer) -> dict[str, torch.Tensor]:
    ds = trainer.train_dataset
    return trainer.data_collator([ds[i] for i in range(len(ds))])


# ---------------------------------------------------------------------------------------------- (1) same loss
CASES = [
    ("explicit", dict(policy_loss="sigmoid", reference_mode="copy")),
    ("implicit", dict(policy_loss="ipo", alpha=0.5, reference_mode="copy", precompute_ref_log_probs=True)),
    ("conversational", dict(policy_loss="simpo", simpo_gamma=0.5, center_rewards_coefficient=0.01)),
    # TRL's spelling of a weighted list of objectives (mapped onto policy_loss / policy_loss_weights)
    ("explicit", dict(loss_type=["sigmoid", "bco_pair"], loss_weights=[1.0, 0.5], reference_mode="copy")),
]


@pytest.mark.parametrize("fmt,haf", CASES, ids=[c[0] for c in CASES[:3]] + ["explicit-list"])
def test_same_batch_and_loss_as_training(tmp_path, fmt, haf):
    """TRL rows → the same ids/labels as ``training.data`` and the same loss and gradients as ``training``."""
    from training.config import TrainConfig
    from training.data import collate_pairs, load_preferences
    from training.hooks import TrainHooks
    from training.model import HafRewardModel, frozen_copy
    from training.reference import ReferenceLogps, for_loss
    from training.trainer import loss_on_batch

    trainer, tok, rows = make_trainer(tmp_path, fmt, n=5, **haf)
    batch = batch_of(trainer)
    ds = load_preferences(
        write_rows(tmp_path / "rows.jsonl", rows), tok, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT
    )
    ours = collate_pairs(list(ds), tok.pad_token_id if tok.pad_token_id is not None else 0)
    assert ds.report.truncated_prompts > 0  # the long prompts were cut, by both
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch[key], getattr(ours, key)), key

    lm = trainer.model
    model = HafRewardModel(lm, reward_head=lm.score)  # the same weights (shared)
    cfg = TrainConfig(**{k: getattr(trainer.args, k) for k in ("beta", "alpha", "reward_weight", "policy_loss")})
    cfg.simpo_gamma, cfg.average_log_prob = trainer.args.simpo_gamma, trainer.args.average_log_prob
    cfg.center_rewards_coefficient = trainer.args.center_rewards_coefficient or 0.0
    cfg.policy_loss_weights = list(trainer.args.policy_loss_weights or [])
    averaged = trainer.args.length_averaged
    reference = ReferenceLogps("none" if trainer.haf_reference == "none" else "copy")
    if reference.mode == "copy":
        reference.ref_model = frozen_copy(HafRewardModel(copy.deepcopy(lm), reward_head=copy.deepcopy(lm.score)))
    ref = for_loss(reference(ours, "train"), averaged)
    compute = loss_on_batch(cfg, ours, ref, (None, None), TrainHooks(), 0, None, False)

    params = [lm.score.weight, lm.lm_head.weight, lm.model.layers[0].mlp.up_proj.weight]
    loss_ours, res_ours, _ = model(ours.input_ids, ours.attention_mask, compute=compute)
    grads_ours = torch.autograd.grad(loss_ours, params)
    loss_trl = trainer.compute_loss(trainer.model, batch)
    grads_trl = torch.autograd.grad(loss_trl, params)
    assert torch.isfinite(loss_trl)
    assert abs(loss_trl.item() - loss_ours.item()) <= 1e-5 * max(1.0, abs(loss_ours.item()))
    for g_trl, g_ours in zip(grads_trl, grads_ours):
        assert (g_trl - g_ours).norm() <= 1e-5 * g_ours.norm() + 1e-8
    assert trainer._metrics["train"]["logps/chosen"][-1] == pytest.approx(res_ours.chosen_logps.mean().item(), 1e-5)


# ---------------------------------------------------------------------------------------------- (2)+(3) train, save
def test_trains_and_saves_for_transformers(tmp_path):
    """3 steps lower the loss on the batch; ``save_model`` loads with both Auto classes and reproduces the trainer."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    trainer, tok, _ = make_trainer(tmp_path, "explicit", n=4)
    batch = batch_of(trainer)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    with torch.no_grad():
        loss0 = trainer.compute_loss(trainer.model, batch).item()
    trainer.train()
    with torch.no_grad():
        res, rewards = trainer.haf_loss(trainer.model, batch)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    changed = [k for k, v in trainer.model.named_parameters() if not torch.equal(v, before[k])]
    assert "score.weight" in changed and any(k.startswith("model.layers.0") for k in changed)
    assert res.loss.item() < loss0, (loss0, res.loss.item())
    assert len(trainer.state.log_history) >= 3

    out = tmp_path / "saved"
    trainer.save_model(str(out))
    assert (out / "haf_reward.json").exists()
    rm = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    lm = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        for i in range(ids.shape[0]):  # one unpadded row at a time, as a user scores tokenizer(prompt + response)
            row = ids[i, : int(mask[i].sum())][None]
            assert abs(rm(input_ids=row).logits[0, 0].item() - rewards[i].item()) <= 1e-4
        logits = lm(input_ids=ids, attention_mask=mask).logits.float()
    logp = logits.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0] * (labels != -100)
    b = ids.shape[0] // 2
    assert torch.allclose(logp.sum(-1)[:b], res.chosen_logps.float(), atol=1e-4, rtol=1e-5)
    assert torch.allclose(logp.sum(-1)[b:], res.rejected_logps.float(), atol=1e-4, rtol=1e-5)
    assert torch.allclose(trainer.reward(ids, mask), rewards, atol=1e-5)


def test_lora_reference_is_the_adapter_disabled_and_export_merges(tmp_path):
    """LoRA: the reference is the base model (adapter off), the head trains, and the merged export reloads."""
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification

    from haf_kernels import sequence_logprobs

    tok = llama_style_tokenizer()
    base = tiny_llama(tok)
    frozen = copy.deepcopy(base)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    trainer, _, _ = make_trainer(tmp_path, "explicit", n=4, model=base, peft_config=lora, max_steps=2)
    assert trainer.haf_reference == "lora"
    head0 = trainer.model.get_base_model().score.weight.detach().clone()
    trainer.train()
    batch = batch_of(trainer)
    ref_c, ref_r = trainer.compute_ref_log_probs(trainer.model, batch)
    with torch.no_grad():
        hidden = frozen.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        sums, _ = sequence_logprobs(hidden, frozen.lm_head.weight, batch["labels"])
    assert torch.allclose(torch.cat([ref_c, ref_r]), sums, atol=1e-4)
    head = trainer.model.get_base_model().score.weight
    assert not torch.equal(head, head0)

    saved = tmp_path / "adapter"
    trainer.save_model(str(saved))  # TRL's adapter files, plus the reward head they do not hold
    assert (saved / "adapter_model.safetensors").exists()
    head_copy = head.detach().clone()
    with torch.no_grad():
        head.zero_()
    trainer._load_from_checkpoint(str(saved))  # what resume_from_checkpoint runs
    assert torch.equal(head, head_copy)

    out = trainer.export_reward_model(str(tmp_path / "export"))
    rm = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    rewards = trainer.reward(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        row = batch["input_ids"][0, : int(batch["attention_mask"][0].sum())][None]
        assert abs(rm(input_ids=row).logits[0, 0].item() - rewards[0].item()) <= 1e-4


# ---------------------------------------------------------------------------------------------- errors
def test_missing_trl_is_one_line_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` now raises ImportError
    monkeypatch.delitem(sys.modules, "haf_kernels.integrations.trl")
    with pytest.raises(ImportError, match=r"pip install haf_kernels\[trl\]") as err:
        importlib.import_module("haf_kernels.integrations.trl")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(alpha=0.0, reward_weight=0.0), "no term"),
        (dict(policy_loss="nope"), "policy_loss"),
        (dict(loss_type=["hinge"], policy_loss="ipo"), "policy_loss"),
        (dict(policy_loss=["sigmoid", "hinge"], policy_loss_weights=[1.0]), "policy_loss_weights"),
        (dict(policy_loss=["sigmoid", "nope"]), "policy_loss"),
        (dict(policy_loss="exo_pair"), "label_smoothing"),
        (dict(ld_alpha=0.5), "ld_alpha"),
        (dict(reference_mode="frozen"), "reference_mode"),
        (dict(policy_loss="simpo", reference_mode="copy"), "reference-free"),
        (dict(reference_mode="none", precompute_ref_log_probs=True), "precompute_ref_log_probs"),
        (dict(max_length=16, max_prompt_length=16), "max_prompt_length"),
        (dict(label_smoothing=0.5), "label_smoothing"),
        (dict(truncation_mode="keep_end"), "truncation_mode"),
    ],
)
def test_config_errors(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        HafConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)


def test_trainer_errors(tmp_path):
    with pytest.raises(ValueError, match="reference_mode='lora' needs a PEFT model"):
        make_trainer(tmp_path, reference_mode="lora")
    with pytest.raises(ValueError, match="precompute_ref_log_probs=True, but the loss is reference-free"):
        make_trainer(tmp_path, policy_loss="simpo", precompute_ref_log_probs=True)
    tok = llama_style_tokenizer()
    bad = Dataset.from_list([{"prompt": "Hi", "chosen": "same", "rejected": "same"}])
    args = HafConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="row 0: chosen == rejected"):
        HafTrainer(tiny_llama(tok), args=args, train_dataset=bad, processing_class=tok)


def test_plain_dpo_config_and_trl_collator(tmp_path):
    """A ``DPOConfig`` is taken with the HaF defaults; TRL's own collator (no labels) is refused by name."""
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tok = llama_style_tokenizer()
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, beta=0.3, max_length=MAX_LENGTH)
    trainer = HafTrainer(
        tiny_llama(tok), args=args, train_dataset=Dataset.from_list(rows_of("explicit", 2)), processing_class=tok
    )
    assert isinstance(trainer.args, HafConfig) and trainer.args.beta == 0.3 and trainer.args.alpha == 0.2
    trl_batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)([trainer.train_dataset[0]])
    with pytest.raises(ValueError, match="HafPreferenceCollator"):
        trainer.compute_loss(trainer.model, trl_batch)


# ---------------------------------------------------------------------------------------------- objectives, saving
def test_list_of_two_objectives_trains_one_step(tmp_path):
    """``policy_loss`` as a weighted list: one step is taken, and the policy loss is the weighted sum of the two
    objectives' losses computed alone on the same batch and weights."""
    trainer, _, _ = make_trainer(
        tmp_path, "explicit", n=4, policy_loss=["sigmoid", "hinge"], policy_loss_weights=[0.7, 0.3], max_steps=1
    )
    assert trainer.args.length_averaged is False and trainer.haf_reference == "copy"
    batch = batch_of(trainer)
    with torch.no_grad():
        both, _ = trainer.haf_loss(trainer.model, batch)
        alone = []
        for name in ("sigmoid", "hinge"):
            trainer.args.policy_loss, trainer.args.policy_loss_weights = name, None
            alone.append(trainer.haf_loss(trainer.model, batch)[0].policy_loss.item())
        trainer.args.policy_loss, trainer.args.policy_loss_weights = ["sigmoid", "hinge"], [0.7, 0.3]
    assert both.policy_loss.item() == pytest.approx(0.7 * alone[0] + 0.3 * alone[1], rel=1e-6, abs=1e-7)
    before = trainer.model.score.weight.detach().clone()
    trainer.train()
    assert trainer.state.global_step == 1 and torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))
    assert not torch.equal(trainer.model.score.weight, before)


def _pickles(folder) -> list[str]:
    """Files under ``folder`` that hold a pickle, by their bytes: a raw pickle (protocol 2+ starts with 0x80) or a
    ``torch.save`` zip archive (it stores its object as ``*/data.pkl``)."""
    import zipfile

    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        head = path.read_bytes()[:4]
        if head[:1] == b"\x80":
            found.append(path.relative_to(folder).as_posix())
        elif head == b"PK\x03\x04" and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                if any(n.endswith(".pkl") for n in z.namelist()):
                    found.append(path.relative_to(folder).as_posix())
    return found


def test_saves_hold_no_pickles_and_resume_works(tmp_path):
    """Checkpoints and ``save_model`` hold no pickle (arguments as ``training_args.json``, resume state as JSON +
    safetensors), and resuming from a checkpoint ends where an uninterrupted run ends."""
    import json

    kw = dict(max_steps=3, save_strategy="steps", save_steps=2, learning_rate=1e-3)
    straight, _, _ = make_trainer(tmp_path / "a", "explicit", n=2, **kw)
    straight.train()
    run, _, _ = make_trainer(tmp_path / "b", "explicit", n=2, **kw)
    run.train()
    out = tmp_path / "b" / "out"
    ckpt = out / "checkpoint-2"
    saved = tmp_path / "saved"
    run.save_model(str(saved))
    for folder in (ckpt, out / "checkpoint-3", saved):
        assert _pickles(folder) == [], folder
        args = json.loads((folder / "training_args.json").read_text())
        assert args["policy_loss"] == "sigmoid" and args["alpha"] == 0.2
    names = {p.name for p in ckpt.iterdir()}
    assert {"optimizer.json", "optimizer.safetensors", "scheduler.json", "rng_state.json"} <= names, names

    resumed, _, _ = make_trainer(tmp_path / "c", "explicit", n=2, **kw)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 3
    assert resumed.optimizer.state_dict()["state"][0]["step"].item() == 3  # the optimizer state came back
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), name


def test_state_files_round_trip_and_refuse_objects(tmp_path):
    """``state_files``: nested state with int keys, tuples, numpy arrays, non-finite floats and tensors comes back
    equal; an arbitrary object is refused by name."""
    import math
    import random

    import numpy as np

    from haf_kernels.integrations import state_files

    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(3, 5, dtype=torch.bfloat16)}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1], "foreach": None, "x": float("inf")}],
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "nan": float("nan"),
    }
    paths = state_files.save_state(state, tmp_path, "opt")
    assert [p.name for p in paths] == ["opt.json", "opt.safetensors"] and _pickles(tmp_path) == []
    back = state_files.load_state(tmp_path, "opt")
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"]) and 0 in back["state"]
    assert back["param_groups"][0]["betas"] == (0.9, 0.999) and back["param_groups"][0]["x"] == math.inf
    assert back["python"] == state["python"] and math.isnan(back["nan"])
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], state["numpy"][1])
    assert back["numpy"][1].dtype == state["numpy"][1].dtype and back["numpy"][2:] == state["numpy"][2:]
    with pytest.raises(TypeError, match=r"opt\['f'\] is a function"):
        state_files.save_state({"f": lambda: 0}, tmp_path, "opt")
