"""Every performance knob in one frozen dataclass, read in one place: arguments → environment → defaults.

``current()`` builds a ``Tuning`` from the ``HAF_*`` environment variables (re-read only when they change, and
an unknown ``HAF_*`` name gets one warning with the closest known one); ``LogprobOptions`` carries it to the
backends, which read their knobs from it and nowhere else. Explicit arguments (``chunk_tokens=``,
``grad_in_forward=``, ``backend=``) win over the environment. ``KNOBS`` is the table the README shows.

None of these change results beyond floating-point rounding, except ``grad_filter`` (skips gradient tiles
below a threshold) and ``triton_fp32_dot`` (TF32 products).
"""

from __future__ import annotations

import difflib
import functools
import os
import warnings
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Knob:
    """One tuning knob: its ``Tuning`` field, environment variable, parser name and meaning."""

    field: str
    env: str
    kind: str  # "int" (> 0), "bool" (0 or 1), "float" (>= 0), "str", "tiles" (6 ints)
    doc: str


KNOBS: tuple[Knob, ...] = (
    Knob("backend", "HAF_KERNELS_BACKEND", "str", "what `backend='auto'` means: auto, triton, cpp, torch, reference"),
    Knob("chunk_tokens", "HAF_CHUNK_TOKENS", "int", "token rows of one logits tile (torch, cpp); unset: from tile_mb"),
    Knob("chunk_vocab", "HAF_CHUNK_VOCAB", "int", "vocab columns of one logits tile (torch, cpp, Triton backward)"),
    Knob("tile_mb", "HAF_CHUNK_MB", "int", "MiB of one fp32 logits tile of the torch backend (default 64)"),
    Knob(
        "keep_chunk_mb",
        "HAF_KEEP_CHUNK_MB",
        "int",
        "MiB of logits kept per chunk of whole pairs by the 3-GEMM whole-loss path (unset: 1/8 of free CUDA "
        "memory, 512 MiB to 4 GiB, at most half of it; 64 off CUDA)",
    ),
    Knob(
        "keep_max_mb",
        "HAF_KEEP_MAX_MB",
        "int",
        "most MiB kept for one pair; above it the loss recomputes in backward (unset: 512, or the chunk "
        "budget where that is larger)",
    ),
    Knob(
        "grad_in_forward",
        "HAF_GRAD_IN_FORWARD",
        "bool",
        "default of `fused_haf_loss(grad_in_forward=None)` where the backend keeps logits (default 1)",
    ),
    Knob("cpp_isa", "HAF_CPP_ISA", "str", "cpp row kernels' instruction set: auto, x86-64-v4, x86-64-v3, default"),
    Knob(
        "cpp_partial_kb",
        "HAF_CPP_PARTIAL_KB",
        "int",
        "KiB bound on the cpp backward's per-slot dH partials, both strategies (default 65536)",
    ),
    Knob("triton_tiles", "HAF_TRITON_TILES", "tiles", "Triton tiles `BN,BV,BD,BDO,WARPS,STAGES` instead of the table"),
    Knob("triton_group", "HAF_TRITON_GROUP", "int", "rows per program group of the Triton grid (L2 reuse)"),
    Knob("triton_fp32_dot", "HAF_TRITON_FP32_DOT", "str", "`tl.dot` precision for fp32 inputs: ieee, tf32x3, tf32"),
    Knob(
        "triton_dz_mb",
        "HAF_TRITON_DZ_MB",
        "int",
        "MiB of one vocab chunk of dlogits in the Triton recompute backward (unset: 1/8 of free CUDA memory, "
        "512 MiB to 4 GiB, at most half of it; 64 off CUDA; at least 2048 columns either way)",
    ),
    Knob(
        "grad_filter",
        "HAF_GRAD_FILTER",
        "float",
        "Triton and cpp backward skip the GEMM work of tiles whose softmax gradient, onehot − p before the "
        "upstream gradient, is below this in magnitude (cpp keeps the targets' entries; 0: off, the default)",
    ),
    Knob("autotune", "HAF_AUTOTUNE", "bool", "autotune the Triton forward tiles (never in the interpreter)"),
)
# Read elsewhere (not tuning): the C++ build (setup.py) and the test suite.
OTHER_VARIABLES = frozenset({"HAF_REQUIRE_CPP", "HAF_NO_CPP", "HAF_TEST_SEED"})


@dataclass(frozen=True)
class Tuning:
    """The knobs of ``KNOBS`` (see each ``Knob.doc``); build with ``current()`` or ``Tuning(...)``."""

    backend: str = "auto"
    chunk_tokens: int | None = None
    chunk_vocab: int | None = None
    tile_mb: int = 64
    keep_chunk_mb: int | None = None
    keep_max_mb: int | None = None
    grad_in_forward: bool = True
    cpp_isa: str = "auto"
    cpp_partial_kb: int = 65536
    triton_tiles: tuple[int, ...] | None = None
    triton_group: int | None = None
    triton_fp32_dot: str = "ieee"
    triton_dz_mb: int | None = None
    grad_filter: float = 0.0
    autotune: bool = False


assert {k.field for k in KNOBS} == {f.name for f in fields(Tuning)}, "KNOBS and Tuning disagree"


def _parse(knob: Knob, raw: str):
    where = f"environment variable {knob.env}"
    try:
        if knob.kind == "int":
            value = int(raw)
            if value <= 0:
                raise ValueError(f"{where} must be a positive integer, got {raw!r}")
            return value
        if knob.kind == "bool":
            if raw not in ("0", "1"):
                raise ValueError(f"{where} must be 0 or 1, got {raw!r}")
            return raw == "1"
        if knob.kind == "float":
            value = float(raw)
            if not value >= 0:
                raise ValueError(f"{where} must be a number >= 0, got {raw!r}")
            return value
        if knob.kind == "tiles":
            vals = tuple(int(x) for x in raw.split(","))
            if len(vals) != 6 or min(vals) <= 0:
                raise ValueError
            return vals
    except ValueError as exc:
        if str(exc).startswith(where):
            raise
        what = {
            "int": "a positive integer",
            "float": "a number >= 0",
            "tiles": "6 positive integers BN,BV,BD,BDO,WARPS,STAGES",
        }
        raise ValueError(f"{where} must be {what[knob.kind]}, got {raw!r}") from None
    return raw


@functools.lru_cache(maxsize=32)
def _from_environment(snapshot: tuple[tuple[str, str], ...]) -> Tuning:
    env = dict(snapshot)
    values = {}
    for knob in KNOBS:
        raw = env.get(knob.env, "")
        if raw != "":
            values[knob.field] = _parse(knob, raw)
    known = {k.env for k in KNOBS} | OTHER_VARIABLES
    for name in sorted(set(env) - known):
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        warnings.warn(
            f"unknown tuning variable {name} is ignored{hint} (the known ones: haf_kernels.tuning.KNOBS)", stacklevel=3
        )
    return Tuning(**values)


def current() -> Tuning:
    """The ``Tuning`` of the current ``HAF_*`` environment (parsed again only when those variables change)."""
    return _from_environment(tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("HAF_"))))


def markdown_table() -> str:
    """The README's table of knobs: variable, ``Tuning`` field, meaning."""
    rows = ["| variable | `Tuning` field | what it sets |", "| --- | --- | --- |"]
    rows += [f"| `{k.env}` | `{k.field}` | {k.doc} |" for k in KNOBS]
    return "\n".join(rows)
