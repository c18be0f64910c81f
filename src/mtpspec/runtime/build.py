"""Build (once, on first use) and load the runtime's C++ kernels (`quant.cpp`, `rowops.cpp`, shipped beside this file).

The build goes to `$MTPSPEC_CACHE/kernels/<name>`, where `<name>` hashes the source, the flags, the
torch version and, for a native build, the CPU's instruction-set flags (`-march=native` compiles for
this CPU), so a changed kernel, torch or machine rebuilds and an unchanged one loads at once.

`$MTPSPEC_RUNTIME_ISA` picks the instruction set, once per process (the ops live in one namespace,
so a process loads one build): `native` (the default: AVX-512 where the CPU has it), `avx2` (AVX2,
FMA and F16C: x86-64-v3) or `portable` (plain C++, no vector extensions). All three give the same
bits (see quant.cpp); the others are there to test that on one machine, and to pin a path.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import MtpspecError
from ..kernels.extension import ISA_ENV
from ..paths import kernels_dir

# The products on the block formats, the per-row ops between them (norms, RoPE), a layer's work around its
# attention (layer.cpp) and an MTP drafter's centroid head (head.cpp), which call the others: load_inline compiles
# the sources, in this order, as one file.
SOURCES = [Path(__file__).with_name(name) for name in ("quant.cpp", "q8.cpp", "rowops.cpp", "layer.cpp", "head.cpp")]
# No -ffast-math, and no contraction of a product into a sum unless the source asks (std::fma or an
# FMA intrinsic): each value is rounded exactly where the source says, so dequantised weights equal
# the reference's bits, and every output element's arithmetic is fixed (see quant.cpp).
FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]

ISAS = ("native", "avx2", "portable")
# What x86-64-v3 code may use, as /proc/cpuinfo names it: an avx2 build refuses a CPU without these.
AVX2_CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe")


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def requested_isa() -> str:
    """`$MTPSPEC_RUNTIME_ISA`, checked: one of ISAS (`native` where unset)."""
    isa = os.environ.get(ISA_ENV, "").strip().lower() or "native"
    if isa not in ISAS:
        raise MtpspecError(f"{ISA_ENV}={os.environ[ISA_ENV]!r}: expected one of {', '.join(ISAS)}")
    return isa


def isa_flags(isa: str) -> list[str]:
    """The compiler flags for `isa`; MtpspecError where this CPU cannot run what they build."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if isa == "native":
        return ["-march=native"]
    if isa == "portable":
        return ["-march=x86-64"] if x86 else []  # elsewhere the compiler's default target has no AVX either
    if not x86:
        raise MtpspecError(f"{ISA_ENV}=avx2 needs an x86-64 CPU, not {platform.machine()}; use native or portable")
    missing = [flag for flag in AVX2_CPU_FLAGS if flag not in cpu_flags().split()]
    if missing:
        raise MtpspecError(f"{ISA_ENV}=avx2 needs {', '.join(missing)}, which this CPU lacks; use native or portable")
    return ["-march=x86-64-v3"]


def compile_flags() -> list[str]:
    return [*FLAGS, *isa_flags(requested_isa())]


def build_name() -> str:
    cpu = cpu_flags() if requested_isa() == "native" else ""  # only a native build depends on the CPU it is built on
    text = "\n".join([*(s.read_text() for s in SOURCES), *compile_flags(), torch.__version__, platform.machine(), cpu])
    return f"mtpspec_runtime_{hashlib.sha256(text.encode()).hexdigest()[:12]}"


@lru_cache(maxsize=1)
def ops():
    """The op namespace: `qlinear`, `qargmax`, `dequantize`, `rms_norm`, `rope`, `vector_path` (which of `avx512`,
    `avx2` and `portable` was compiled). Raises MtpspecError where the kernels cannot be built (no C++ compiler, or
    ninja missing) or `$MTPSPEC_RUNTIME_ISA` is not one this CPU runs."""
    from torch.utils.cpp_extension import is_ninja_available, load_inline

    if not is_ninja_available():
        raise MtpspecError(
            "the GGUF runtime builds its kernels with ninja: pip install ninja (or use --weights dequant)"
        )
    name = build_name()
    build_dir = kernels_dir() / name
    if not (build_dir / f"{name}.so").is_file():
        isa = requested_isa()
        print(f"mtpspec: compiling the GGUF runtime's kernels ({isa}; once per machine and version)", file=sys.stderr)
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        load_inline(
            name=name,
            cpp_sources=[s.read_text() for s in SOURCES],
            extra_cflags=compile_flags(),
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,
            no_implicit_headers=True,
        )
    except (RuntimeError, OSError, ImportError) as e:
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
        raise MtpspecError(f"cannot build the GGUF runtime's kernels ({last}); use --weights dequant") from e
    return torch.ops.mtpspec_runtime
