"""Build (once, on first use) and load the C++ kernels: the small-M linear and the exact block attention.

The sources are package files beside this module (`linear.cpp`, `attention.cpp`, `simd.h`). The
build goes to `$MTPSPEC_CACHE/kernels/<name>` (default `~/.cache/mtpspec`), where `<name>` hashes
the sources' contents, the flags and the torch version, so a changed kernel or torch rebuilds and
an unchanged one loads without compiling. Attention takes AVX-512 where the CPU has it and
`$MTPSPEC_RUNTIME_ISA` does not pin `avx2` or `portable`. Where it cannot be built (no compiler or ninja, no AVX2/FMA),
`extension()` returns None after saying why in one line on stderr, and callers keep PyTorch's
linear; under `MTPSPEC_KERNELS=0` it returns None silently.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
from functools import lru_cache
from pathlib import Path

import torch

from ..paths import kernels_dir

HERE = Path(__file__).parent
SOURCES = (HERE / "linear.cpp", HERE / "attention.cpp")  # one translation unit each
HEADERS = (HERE / "simd.h",)
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
ISA_ENV = "MTPSPEC_RUNTIME_ISA"  # the native code's instruction set: see avx512_allowed and runtime/build.py


def enabled() -> bool:
    """Whether the user allows the kernels (`MTPSPEC_KERNELS=0` turns them off)."""
    return os.environ.get("MTPSPEC_KERNELS", "1").strip().lower() not in (
        "0",
        "false",
        "no",
        "off",
    )


def unsupported_reason() -> str | None:
    """Why this machine cannot build or run the kernel, or None where it can."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it needs an x86-64 CPU, this is {platform.machine()}"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "it needs a CPU with AVX2 and FMA"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "PyTorch's extension builder needs ninja (pip install ninja)"
    return None


def build_name() -> str:
    texts = [path.read_text() for path in (*SOURCES, *HEADERS)]
    digest = hashlib.sha256("\n".join([*texts, *FLAGS, torch.__version__]).encode()).hexdigest()[:12]
    return f"mtpspec_kernels_{digest}"


def extension():
    """The op namespace (`.linear(x, w, bias)`), or None where the kernel is unavailable.

    `MTPSPEC_KERNELS` is read on every call, so turning it off takes effect at once.
    """
    return _built() if enabled() else None


@lru_cache(maxsize=1)
def _built():
    reason = unsupported_reason()
    if reason is None:
        try:
            return _load()
        # A failed build can surface as any of these; the fallback is always correct, only slower.
        except (RuntimeError, OSError, ImportError, ValueError) as e:
            last = str(e).strip().splitlines()[-1:] or [type(e).__name__]
            reason = f"the build failed ({last[0][:200]})"
    print(
        f"mtpspec: fast small-M linear kernel unavailable: {reason}; using PyTorch's linear",
        file=sys.stderr,
    )
    return None


def _load():
    from torch.utils.cpp_extension import load

    name = build_name()
    build_dir = kernels_dir() / name
    if not (build_dir / f"{name}.so").is_file():
        print("mtpspec: compiling the C++ kernels (once per kernel and torch version)", file=sys.stderr)
    build_dir.mkdir(parents=True, exist_ok=True)
    # The sources include light ATen headers and register TORCH_LIBRARY ops instead of using
    # torch/extension.h and pybind11: the build is much shorter, and calls go through the dispatcher.
    load(
        name=name,
        sources=[str(path) for path in SOURCES],
        extra_cflags=FLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        is_python_module=False,
    )
    ops = torch.ops.mtpspec_kernels
    ops.use_avx512(avx512_allowed())
    return ops


def avx512_allowed() -> bool:
    """Whether attention may take its AVX-512 code where the CPU has it: unless `$MTPSPEC_RUNTIME_ISA` pins
    `avx2` or `portable` (the same bits either way; see attention.cpp). The GGUF runtime's build checks the value."""
    return os.environ.get(ISA_ENV, "").strip().lower() not in ("avx2", "portable")
