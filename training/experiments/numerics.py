"""Portable CPU numerics for the experiments: the same SIMD code paths, so the same bits, on any x86-64 AVX2 CPU.

Where a run's floating-point results come from on a CPU: MKL's GEMMs (which pick kernels per CPU: AVX-512, AVX2,
AMD Zen), ATen's vectorised elementwise and reduction kernels (dispatched by CPU capability), oneDNN, and the C++
row kernels of ``haf_kernels`` (``HAF_CPP_ISA``). Each rounds differently per path, so a training run on an AVX-512
machine drifts away from the same run on an AVX2-only one. ``pin_portable_numerics()`` pins all four to their
AVX2 paths through the environment variables each library reads when it first computes:

    MKL_CBWR=AVX2  ATEN_CPU_CAPABILITY=avx2  DNNL_MAX_CPU_ISA=AVX2  HAF_CPP_ISA=x86-64-v3

so a run is bitwise the same on every x86-64 CPU with AVX2 and FMA (at a fixed thread count), at the price of not
using AVX-512 where it exists. It must run before the process's first tensor operation (``rm_quality.main`` calls
it first thing with ``--portable``; its spawned workers inherit the environment).
"""

from __future__ import annotations

import os
import platform

PORTABLE_ENV = {
    "MKL_CBWR": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "DNNL_MAX_CPU_ISA": "AVX2",
    "HAF_CPP_ISA": "x86-64-v3",
}


def cpu_flags() -> set[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where there is none, e.g. not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def pin_portable_numerics() -> dict[str, str]:
    """Pin MKL, ATen, oneDNN and the ``haf_kernels`` row kernels to their AVX2 code paths; returns the settings.

    Raises ``SystemExit`` (one line) where that cannot hold: not an x86-64 Linux CPU with AVX2 and FMA, or torch has
    already chosen another kernel path in this process (call it before any tensor operation).
    """
    machine = platform.machine().lower()
    flags = cpu_flags()
    if machine not in ("x86_64", "amd64") or not {"avx2", "fma"} <= flags:
        raise SystemExit(
            f"--portable needs an x86-64 Linux CPU with AVX2 and FMA (this is {machine or 'unknown'}"
            f"{', without AVX2/FMA' if machine in ('x86_64', 'amd64') else ''}); run without --portable"
        )
    os.environ.update(PORTABLE_ENV)
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2":
        raise SystemExit(
            f"--portable: torch already runs its {capability} kernels in this process; pin the numerics before the "
            "first tensor operation (start a fresh process)"
        )
    return dict(PORTABLE_ENV)
