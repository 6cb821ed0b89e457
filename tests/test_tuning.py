"""One tuning object: every HAF_* knob parsed in one place, arguments over environment over defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from haf_kernels import backends, tuning
from haf_kernels.options import LogprobOptions
from haf_kernels.tuning import Tuning

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_field_has_one_knob_and_the_readme_table_is_current():
    assert [k.field for k in tuning.KNOBS] == list(Tuning.__dataclass_fields__)
    assert len({k.env for k in tuning.KNOBS}) == len(tuning.KNOBS)
    assert tuning.markdown_table() in README.read_text(encoding="utf-8"), "regenerate the README's tuning table"


def test_environment_parsed_once_into_typed_fields(monkeypatch):
    monkeypatch.setenv("HAF_CHUNK_MB", "8")
    monkeypatch.setenv("HAF_GRAD_IN_FORWARD", "0")
    monkeypatch.setenv("HAF_TRITON_TILES", "16,32,16,16,1,1")
    monkeypatch.setenv("HAF_GRAD_FILTER", "1e-7")
    t = tuning.current()
    assert (t.tile_mb, t.grad_in_forward, t.triton_tiles, t.grad_filter) == (8, False, (16, 32, 16, 16, 1, 1), 1e-7)
    assert tuning.current() is t  # unchanged environment: not parsed again
    monkeypatch.delenv("HAF_CHUNK_MB")
    assert tuning.current().tile_mb == 64


@pytest.mark.parametrize(
    "var, raw, message",
    [
        ("HAF_CHUNK_MB", "abc", "HAF_CHUNK_MB must be a positive integer, got 'abc'"),
        ("HAF_KEEP_MAX_MB", "0", "HAF_KEEP_MAX_MB must be a positive integer, got '0'"),
        ("HAF_GRAD_IN_FORWARD", "yes", "HAF_GRAD_IN_FORWARD must be 0 or 1, got 'yes'"),
        ("HAF_GRAD_FILTER", "-1", "HAF_GRAD_FILTER must be a number >= 0, got '-1'"),
        ("HAF_TRITON_TILES", "1,2,3", "HAF_TRITON_TILES must be 6 positive integers BN,BV,BD,BDO,WARPS,STAGES"),
    ],
)
def test_bad_values_name_the_variable(monkeypatch, var, raw, message):
    monkeypatch.setenv(var, raw)
    with pytest.raises(ValueError, match="environment variable " + message.replace("(", r"\(").replace(")", r"\)")):
        tuning.current()


def test_unknown_variable_warns_with_the_closest_name(monkeypatch):
    monkeypatch.setenv("HAF_CHUNK_MBS", "8")
    with pytest.warns(
        UserWarning, match=r"unknown tuning variable HAF_CHUNK_MBS is ignored \(did you mean HAF_CHUNK_MB\?\)"
    ):
        assert tuning.current().tile_mb == 64


def test_arguments_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("HAF_CHUNK_VOCAB", "9")
    monkeypatch.setenv("HAF_CHUNK_TOKENS", "5")
    assert LogprobOptions().tile(100, 50) == (5, 9)
    assert LogprobOptions(chunk_tokens=3, chunk_vocab=7).tile(100, 50) == (3, 7)
    monkeypatch.setenv("HAF_KERNELS_BACKEND", "torch")
    assert backends.resolve("auto", torch.device("cpu")) == "torch"
    assert backends.resolve("reference", torch.device("cpu")) == "reference"


@pytest.mark.skipif(not backends.is_available("cpp"), reason="cpp backend not built")
def test_cpp_partial_bound_reaches_both_backward_strategies(monkeypatch):
    """HAF_CPP_PARTIAL_KB bounds the dH partials of the recompute *and* the saved-logits backward."""
    from haf_kernels.backends import cpp

    seen = []
    for name in ("backward", "backward_saved"):
        real = getattr(cpp._C, name)

        def spy(*args, _real=real, _name=name, **kw):
            seen.append((_name, kw.get("partial_bytes", args[-1] if _name == "backward" else None)))
            return _real(*args, **kw)

        monkeypatch.setattr(cpp._C, name, spy)
    monkeypatch.setenv("HAF_CPP_PARTIAL_KB", "4")
    h, w, y = torch.randn(9, 8), torch.randn(50, 8), torch.randint(0, 50, (9,))
    opts = LogprobOptions()
    logp, lse = cpp.forward(h, w, y, None, opts)
    cpp.backward(torch.ones(9), h, w, y, None, lse, opts, (True, True, False))
    _, lse2, saved = cpp.forward_keep(h, w, y, None, opts)
    cpp.backward_saved(saved, torch.ones(9), h, w, y, None, lse2, opts, (True, True, False))
    assert seen == [("backward", 4 << 10), ("backward_saved", 4 << 10)]


def test_backends_declare_capabilities_and_auto_reads_them():
    cpu = torch.device("cpu")
    for name in backends.BACKENDS:
        if backends.is_available(name):
            caps = backends.capabilities(name)
            assert caps.devices and caps.dtypes and caps.determinism
    assert backends.capabilities("torch").keeps_logits and not backends.capabilities("reference").auto_devices
    ranked = sorted(
        (backends.capabilities(n).priority, n)
        for n in backends.BACKENDS
        if backends.is_available(n) and backends.capabilities(n).auto_on("cpu")
    )
    assert backends.resolve("auto", cpu) == ranked[-1][1]
    if backends.is_available("cpp"):
        with pytest.raises(ValueError, match=r"backend 'cpp' does not run on cuda tensors \(it declares \['cpu'\]\)"):
            backends.resolve("cpp", torch.device("cuda"))


def test_auto_skips_a_backend_whose_declared_dtypes_exclude_the_input(monkeypatch):
    """A backend declaring fewer dtypes is passed over by auto and refused by name when asked for."""
    import dataclasses

    from haf_kernels.backends import torch_chunked

    narrow = dataclasses.replace(torch_chunked.CAPABILITIES, dtypes=frozenset({torch.float32}), dtype_note="test only")
    monkeypatch.setattr(torch_chunked, "CAPABILITIES", narrow)
    monkeypatch.setattr(backends, "is_available", lambda n: n in ("torch", "reference"))
    cpu = torch.device("cpu")
    assert backends.resolve("auto", cpu, torch.float32) == "torch"
    with pytest.raises(ValueError, match="no available backend declares cpu tensors"):
        backends.resolve("auto", cpu, torch.float64)
    with pytest.raises(
        TypeError,
        match=r"backend 'torch' does not compute float64 inputs here \(it declares \['float32'\]\): test only",
    ):
        backends.resolve("torch", cpu, torch.float64)
