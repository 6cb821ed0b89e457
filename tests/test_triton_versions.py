"""Which Triton versions the Triton backend accepts, and what it declares on each (no kernel runs here).

Measured on CPU with every Triton release from 3.0 to 3.9 (the interpreter suites; the sm80/sm90 compile of
``test_triton_backend.py`` on 3.2-3.9): 3.0/3.1 fail in their interpreter, 3.2-3.4 reject ``tl.dot`` on float64,
and the interpreters before 3.7 break on numpy >= 2.4. These tests pin the policy that follows from that: the backend is
unavailable below 3.2 with a reason, refuses float64 below 3.5 (``auto`` then takes ``torch``), and says what to
install when the interpreter cannot run.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy
import pytest
import torch

from haf_kernels import backends
from haf_kernels.backends import triton as T


@pytest.mark.parametrize(
    "text, want",
    [("3.6.0", (3, 6)), ("3.2.0+git4b3bb1f8", (3, 2)), ("3.10.1", (3, 10)), (" 4.0", (4, 0)), ("", (0, 0))],
)
def test_parse_version(text, want):
    assert T.parse_version(text) == want


def test_too_old_triton_is_unavailable_with_a_reason():
    why = T.version_problem((3, 1), interpreting=False, numpy_strict=False)
    assert "3.1" in why and "3.2" in why and "backend='torch'" in why
    assert T.version_problem((3, 2), interpreting=False, numpy_strict=True) == ""  # numpy matters only interpreted
    assert T.version_problem((3, 9), interpreting=True, numpy_strict=True) == ""


@pytest.mark.parametrize("version", [(3, 2), (3, 6)])
def test_old_interpreter_with_strict_numpy_says_what_to_install(version):
    why = T.version_problem(version, interpreting=True, numpy_strict=True)
    assert "numpy<2.4" in why and "triton>=3.7" in why
    assert T.version_problem(version, interpreting=True, numpy_strict=False) == ""


def test_numpy_probe_matches_numpy():
    """The probe is behavioural: it reports what ``int()`` of a 1-element array does with this numpy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            int(numpy.array([1]))
            strict = False
        except TypeError:
            strict = True
    assert T.numpy_rejects_sized_scalars() is strict


@pytest.mark.parametrize(
    "version, interpreting, want",
    [
        ((3, 4), False, {torch.float16, torch.bfloat16, torch.float32}),
        ((3, 5), False, {torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        ((3, 4), True, {torch.float16, torch.float32}),
        ((3, 9), True, {torch.float16, torch.float32, torch.float64}),
    ],
)
def test_declared_dtypes(version, interpreting, want):
    dtypes, note = T.declared_dtypes(version, interpreting)
    assert dtypes == want
    assert ("triton >= 3.5" in note) == (torch.float64 not in want)
    assert ("bf16" in note) == interpreting


def test_auto_falls_back_to_torch_for_float64_on_old_triton(monkeypatch):
    """On CUDA, ``auto`` takes ``triton`` for the dtypes it declares and ``torch`` for the rest; an explicit
    ``backend='triton'`` with float64 is a TypeError naming the Triton it needs."""
    monkeypatch.setattr(T, "is_available", lambda: True)  # as on a CUDA machine
    dtypes, note = T.declared_dtypes((3, 4), interpreting=False)
    old = dataclasses.replace(T.CAPABILITIES, devices=frozenset({"cuda"}), dtypes=dtypes, dtype_note=note)
    monkeypatch.setattr(T, "CAPABILITIES", old)
    cuda = torch.device("cuda", 0)
    assert backends.resolve("auto", cuda, torch.bfloat16) == "triton"
    assert backends.resolve("auto", cuda, torch.float64) == "torch"
    with pytest.raises(TypeError, match=r"does not compute float64 .*triton >= 3\.5"):
        backends.resolve("triton", cuda, torch.float64)


def test_launchers_refuse_float64_on_old_triton(monkeypatch):
    """The kernel launchers themselves refuse float64 below Triton 3.5 (not a compile error deep in Triton)."""
    pytest.importorskip("triton")
    if T.TRITON_VERSION < T.MIN_TRITON:
        pytest.skip(f"this Triton ({T.TRITON_VERSION}) is below the supported range: the kernels are not loaded")
    from haf_kernels.backends.triton import _common

    def as_on(version):
        dtypes, note = T.declared_dtypes(version, interpreting=False)
        monkeypatch.setattr(T, "CAPABILITIES", dataclasses.replace(T.CAPABILITIES, dtypes=dtypes, dtype_note=note))

    as_on((3, 4))
    with pytest.raises(TypeError, match=r"float64 hidden/weight.*triton >= 3\.5"):
        _common.require_dot_dtype(torch.float64)
    _common.require_dot_dtype(torch.float32)  # the other dtypes pass
    as_on((3, 5))
    _common.require_dot_dtype(torch.float64)


def test_why_unavailable_reports_the_version_problem(monkeypatch):
    if T._IMPORT_ERROR:
        pytest.skip("triton does not import here")
    monkeypatch.setattr(T, "TRITON_VERSION", (3, 1))
    assert not T.is_available()
    assert "older than 3.2" in T.why_unavailable()
    monkeypatch.setattr(backends, "_loaded", {**backends._loaded, "triton": T})
    assert "older than 3.2" in backends.unavailable_reasons()["triton"]
