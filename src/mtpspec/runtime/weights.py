"""GGUF tensors kept in the file's own block formats, memory-mapped, behind one small matrix type.

A `QMatrix` is a 2-D weight whose rows are output features, each row the file's consecutive blocks
for that feature's K input weights. `linear`, `argmax` and `rows` run the C++ kernels on those bytes
directly (see quant.cpp): a weight's value is exactly what the format's reference dequantiser gives.
The file is mapped copy-on-write, so the weights cost page cache, shared between processes, rather
than private memory; nothing here ever writes to them.

Tensors of a type the kernels do not know are dequantised once, on load, to float32 with gguf-py's
reference dequantiser (correct, larger and slower), and one line on stderr says which.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from ..errors import MtpspecError
from .build import ops

Q = GGMLQuantizationType
# What the kernels multiply on directly.
BLOCK_QUANTIZED = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K})
NATIVE = BLOCK_QUANTIZED | {Q.F32, Q.F16, Q.BF16}


@dataclass(frozen=True)
class QMatrix:
    """A weight `[N, K]` in a GGUF block format (N output features of K inputs)."""

    raw: torch.Tensor  # [N, row_bytes] uint8: row n is feature n's blocks
    qtype: GGMLQuantizationType
    cols: int  # K

    @property
    def shape(self) -> tuple[int, int]:
        return self.raw.shape[0], self.cols

    def linear(self, x: torch.Tensor, q8: bool = False) -> torch.Tensor:  # [..., K] -> [..., N] float32
        """`x @ W.T`, float32 out; row i of a block has the same bits as row i alone. With `q8` the rows are
        quantized to int8 per 32 values first (`--dtype q8`, q8.cpp), where the format is block-quantized."""
        (y,) = QMatrix.linear_many(x.reshape(-1, self.cols), [self], q8)
        return y.view(*x.shape[:-1], self.raw.shape[0])

    @staticmethod
    def linear_many(x: torch.Tensor, matrices: list[QMatrix], q8: bool = False) -> list[torch.Tensor]:
        """`[m.linear(x, q8) for m in matrices]` (`[T, K]` -> `[T, N_i]` each), the same bits, in one call per
        kind of product (one thread wake-up)."""
        return ops().products(x, *QMatrix.product_args(matrices, q8), matrices[0].cols)

    @staticmethod
    def product_args(matrices: list[QMatrix], q8: bool) -> tuple[list[torch.Tensor], list[int], list[int], list[int]]:
        """What the C++ `products` op takes for `matrices`: each one's bytes, whether they are q8_pack's int8
        layout (with `q8`, where the format is block-quantized) or the file's blocks, its GGML type and rows."""
        ints = [int(q8 and m.packed is not None) for m in matrices]
        tensors = [m.packed if i else m.raw for m, i in zip(matrices, ints, strict=True)]
        return tensors, ints, [int(m.qtype) for m in matrices], [m.shape[0] for m in matrices]

    def argmax(self, x: torch.Tensor) -> torch.Tensor:  # [T, K] -> [T] int64
        """`argmax(x @ W.T, -1)` without writing the logits out; ties go to the lowest index. A large Q8_0
        matrix (an output head) is screened with int8 products first, for the same index (quant.cpp)."""
        screen = self.screen
        if screen is not None:  # one pass over the packed head for all rows: its stream from memory is most of a pass
            return ops().qargmax_screened(x.float(), self.raw, screen, self.cols)[0]
        blocks = [x[i : i + 16].float() for i in range(0, x.shape[0], 16)]
        return torch.cat([ops().qargmax(b, self.raw, int(self.qtype), self.cols) for b in blocks])

    @cached_property
    def screen(self) -> torch.Tensor | None:
        """The packed int8 copy `qargmax_screened` reads (built on first use), or None where the matrix is
        not a screened one: not Q8_0, small, a CPU with neither AVX2 nor AVX-512 VNNI, or `$MTPSPEC_HEAD_SCREEN` is 0."""
        if self.qtype != Q.Q8_0 or self.raw.shape[0] < SCREEN_MIN_ROWS or os.environ.get("MTPSPEC_HEAD_SCREEN") == "0":
            return None
        return screen_pack(self.raw, self.cols) if ops().screen_available() else None

    @cached_property
    def packed(self) -> torch.Tensor | None:
        """The int8 codes and scales `q8_linear_many` reads (q8.cpp's layout, built on first use), or None for
        the unquantized formats (F32, F16, BF16), whose products stay float32."""
        return ops().q8_pack(self.raw, int(self.qtype), self.cols) if self.qtype in BLOCK_QUANTIZED else None

    def rows(self, ids: torch.Tensor) -> torch.Tensor:  # [T] int64 -> [T, K] float32
        """Rows `ids`, dequantised (embedding lookups)."""
        return ops().dequantize(self.raw, ids.reshape(-1), int(self.qtype), self.cols).view(*ids.shape, self.cols)

    def take(self, ids: torch.Tensor) -> QMatrix:
        """The matrix of rows `ids` `[R]` (their blocks copied, still quantized)."""
        return QMatrix(self.raw.index_select(0, ids), self.qtype, self.cols)


SCREEN_MIN_ROWS = 4096  # below this, the float32 argmax is cheap enough


def screen_pack(raw: torch.Tensor, cols: int) -> torch.Tensor | None:
    """A Q8_0 matrix's blocks `[N, cols / 32 * 34]` in `qargmax_screened`'s layout (quant.cpp), or None where
    some block's bound overflows fp16 (the matrix then keeps the float32 argmax)."""
    packed = ops().q8_screen_pack(raw, cols)
    return packed if packed.numel() else None


def _as_qmatrix(raw: np.ndarray, qtype: GGMLQuantizationType, cols: int) -> QMatrix:
    """A 2-D tensor's data as GGUFReader maps it (uint8 blocks, or float rows for F32/F16/BF16)."""
    rows = raw.shape[0]
    return QMatrix(torch.from_numpy(raw.reshape(rows, -1).view(np.uint8)), qtype, cols)


class GgufWeights:
    """The tensors of one GGUF file by name: `matrix(name)` for 2-D weights, `vector(name)` for 1-D ones."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            # Copy-on-write mapping: writable numpy views (torch wants them) that never reach the file.
            reader = GGUFReader(self.path, "c")
        except (ValueError, OSError, KeyError, IndexError) as e:
            raise MtpspecError(f"cannot read GGUF file {self.path}: {e}") from e
        # Keep the tensors (views of the mapping) and drop the reader: its parsed metadata (a large
        # vocabulary as Python objects) would hold more memory than the weights.
        self.tensors = {t.name: t for t in reader.tensors}
        arch = reader.fields.get("general.architecture")
        self.architecture = arch.contents() if arch is not None else "unknown"
        self.foreign = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in NATIVE})
        self._warned = False

    def has(self, name: str) -> bool:
        return name in self.tensors

    def matrix(self, name: str) -> QMatrix:
        t = self._tensor(name)
        cols = int(t.shape[0])  # GGUF lists dimensions innermost first
        if len(t.shape) != 2:
            raise MtpspecError(f"{self.path.name}: {name} has shape {list(t.shape)}, expected a matrix")
        if t.tensor_type in NATIVE:
            return _as_qmatrix(t.data, t.tensor_type, cols)
        if not self._warned:
            self._warned = True
            print(
                f"mtpspec: {self.path.name} has tensors of type {', '.join(self.foreign)}, which the GGUF runtime does not "
                "multiply on directly; they are dequantised to float32 on load (correct, larger and slower)",
                file=sys.stderr,
            )
        dense = dequantize(t.data, t.tensor_type).reshape(int(t.shape[1]), cols).astype(np.float32)
        return _as_qmatrix(dense, Q.F32, cols)

    def vector(self, name: str) -> torch.Tensor:  # [n] float32
        t = self._tensor(name)
        return torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(-1).astype(np.float32))

    def _tensor(self, name: str):
        if name not in self.tensors:
            raise MtpspecError(f"{self.path.name} has no tensor {name!r}")
        return self.tensors[name]
