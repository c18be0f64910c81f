"""Time PyTorch's linear against the small-M kernel: `python -m mtpspec.kernels.bench`.

`--baseline avx2` times the kernel's portable AVX2 path instead of PyTorch, to see what the
AMX or AVX512-BF16 path (`bf16_path()`) gains on a CPU that has one.

Prints one row per (shape, M): for each of the two, the median wall and median CPU milliseconds
per call (CPU time summed over threads), and the ratio of the medians. Calls alternate between
the two so that load from other processes hits both alike. On a busy machine a call longer
than a scheduler slice waits for its share of the cores, so wall time then measures the load
more than the code; CPU time (best with `--threads 1`) is the steadier measure of the work.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from .extension import extension
from .linear import bf16_path

# Gemma 3 270M: the tied output head, then the attention and MLP projections (out, in).
GEMMA3_270M_SHAPES = [
    (262144, 640),
    (2048, 640),
    (640, 2048),
    (1024, 640),
    (256, 640),
    (640, 1024),
]
ROWS = [1, 2, 4, 5, 8, 16]
L3_OVERFLOW_BYTES = 96 << 20


def _time(fn) -> tuple[float, float]:
    """Wall and CPU milliseconds of one call."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - t) * 1e3, (time.process_time() - c) * 1e3


def compare(n: int, k: int, m: int, dtype: torch.dtype, reps: int, baseline: str = "torch") -> tuple[list, list]:
    """(wall, cpu) milliseconds per call of the baseline (torch's linear or the kernel's AVX2 path)
    and of the kernel for x [m, k] @ w [n, k].T."""
    ops = extension()
    base = ops.linear_avx2 if baseline == "avx2" else lambda x, w, b: torch.nn.functional.linear(x, w, b)
    gen = torch.Generator().manual_seed(0)
    # Cycle through enough copies of small weights to overflow the L3 cache: in the model,
    # every layer's weights come from DRAM, not from a warm cache.
    copies = max(1, -(-L3_OVERFLOW_BYTES // (n * k * dtype.itemsize)))
    ws = [torch.randn(n, k, generator=gen).to(dtype) for _ in range(copies)]
    x = torch.randn(m, k, generator=gen).to(dtype)
    t_ref, t_fast = [], []
    for i in range(reps + 1):
        w = ws[i % copies]
        t_ref.append(_time(lambda w=w: base(x, w, None)))
        t_fast.append(_time(lambda w=w: ops.linear(x, w, None)))
    return t_ref[1:], t_fast[1:]  # the first call warms thread pools


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--rows", type=int, nargs="*", default=ROWS)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--baseline",
        default="torch",
        choices=["torch", "avx2"],
        help="what the kernel is timed against: PyTorch's linear, or the kernel's own AVX2 path",
    )
    args = p.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    if extension() is None:
        raise SystemExit("the kernel is unavailable on this machine")
    path = bf16_path() if dtype == torch.bfloat16 else "avx2"
    print(
        f"{args.dtype}, {torch.get_num_threads()} threads, {args.reps} calls each (small layers 20x more); kernel path {path}"
    )
    print(f"shape [N, K]     M | {args.baseline:>5} wall    cpu | kernel wall    cpu | speedup wall   cpu")
    for n, k in GEMMA3_270M_SHAPES:
        # Small layers take microseconds: repeat them more for a stable median.
        reps = args.reps if n * k > 1 << 22 else args.reps * 20
        for m in args.rows:
            t_ref, t_fast = compare(n, k, m, dtype, reps, args.baseline)
            rw, rc = (statistics.median(t) for t in zip(*t_ref, strict=True))
            fw, fc = (statistics.median(t) for t in zip(*t_fast, strict=True))
            print(
                f"[{n:6d}, {k:4d}] {m:4d} | {rw:10.3f} {rc:7.3f} | {fw:11.3f} {fc:7.3f} | {rw / fw:8.2f}x {rc / fc:5.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
