"""Build (once, on first use) and load the runtime's C++ kernels (`quant.cpp`, `rowops.cpp`, shipped beside this file).

The build goes to `$MTPSPEC_CACHE/kernels/<name>`, where `<name>` hashes the source, the flags, the
torch version and the CPU's instruction-set flags (`-march=native` compiles for this CPU), so a
changed kernel, torch or machine rebuilds and an unchanged one loads at once.
"""

from __future__ import annotations

import hashlib
import platform
import sys
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import MtpspecError
from ..paths import kernels_dir

# The products on the block formats, and the per-row ops between them (norms, RoPE).
SOURCES = [Path(__file__).with_name(name) for name in ("quant.cpp", "rowops.cpp")]
# No -ffast-math, and no contraction of a product into a sum unless the source asks (std::fma or an
# FMA intrinsic): each value is rounded exactly where the source says, so dequantised weights equal
# the reference's bits, and every output element's arithmetic is fixed (see quant.cpp).
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def build_name() -> str:
    text = "\n".join([*(s.read_text() for s in SOURCES), *FLAGS, torch.__version__, platform.machine(), _cpu_flags()])
    return f"mtpspec_runtime_{hashlib.sha256(text.encode()).hexdigest()[:12]}"


@lru_cache(maxsize=1)
def ops():
    """The op namespace: `qlinear`, `qargmax`, `dequantize`, `rms_norm`, `rope`, `vector_path`. Raises MtpspecError where
    the kernels cannot be built (no C++ compiler, or ninja missing)."""
    from torch.utils.cpp_extension import is_ninja_available, load_inline

    if not is_ninja_available():
        raise MtpspecError(
            "the GGUF runtime builds its kernels with ninja: pip install ninja (or use --weights dequant)"
        )
    name = build_name()
    build_dir = kernels_dir() / name
    if not (build_dir / f"{name}.so").is_file():
        print("mtpspec: compiling the GGUF runtime's kernels (once per machine and version)", file=sys.stderr)
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        load_inline(
            name=name,
            cpp_sources=[s.read_text() for s in SOURCES],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,
            no_implicit_headers=True,
        )
    except (RuntimeError, OSError, ImportError) as e:
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
        raise MtpspecError(f"cannot build the GGUF runtime's kernels ({last}); use --weights dequant") from e
    return torch.ops.mtpspec_runtime
