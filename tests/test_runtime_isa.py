"""The runtime's kernels give the same bits on every instruction-set path: the AVX2 build and the portable build
(`$MTPSPEC_RUNTIME_ISA`, each compiled and run in a subprocess, since a process loads one build) and, on a CPU with
AMX, the native build with its tiles off (`MTPSPEC_AMX=0`), against this process's native build, on random blocks of
every type with extreme scales."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

import mtpspec
from gguf_tiny import random_blocks
from mtpspec.errors import MtpspecError
from mtpspec.runtime.build import ISA_ENV, build_name, cpu_flags, isa_flags, ops, requested_isa
from mtpspec.runtime.weights import BLOCK_QUANTIZED, NATIVE, screen_pack

# What vector_path() reports for each build; native is whichever of these the CPU has.
PATHS = {"avx2": "avx2", "portable": "portable"}


def inputs() -> dict:
    """Per type, a matrix of extreme random blocks (`rows` name -> [N, row_bytes] uint8, with its type and K), and
    16 activation rows. N = 1100: two threads split the features, and every tile shape ends on a partial tile.
    The unquantized types also get K = 40, whose last chunk is zero-padded."""
    mats = {t.name: (random_blocks(t, 1100, 512, seed=int(t), extreme=True), int(t), 512) for t in NATIVE}
    for t in (Q.F32, Q.F16, Q.BF16):
        mats[f"{t.name} K=40"] = (random_blocks(t, 37, 40, seed=int(t), extreme=True), int(t), 40)
    # Scales the screened head can bound (an extreme one leaves a head unscreened): its argmax on every path.
    mats["Q8_0 screened"] = (random_blocks(Q.Q8_0, 1100, 512, seed=1), int(Q.Q8_0), 512)
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(0))
    return {"mats": {k: (torch.from_numpy(w), t, K) for k, (w, t, K) in mats.items()}, "x": x, "edges": edge_rows()}


def edge_rows() -> torch.Tensor:
    """40 activation rows whose 32-value blocks test the int8 quantization: values that scale to exact halves
    (rounded half to even), a zero block, subnormal and huge maxima, a lone value at the maximum, NaN and infinity."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 512, generator=gen)
    x[:, :32] = torch.tensor([127.0] + [k + 0.5 for k in range(-16, 15)])  # scale 127 / 127 = 1: x itself
    x[:, 32:64] = torch.tensor([-254.0] + [2.0 * k + 1 for k in range(-16, 15)])  # scale 1/2: halves again
    x[1, 96:128] = 0.0
    x[2, 128:160] = torch.randn(32, generator=gen) * 1e-40  # subnormal maximum
    x[3, 160:192] = torch.randn(32, generator=gen) * 1e37
    x[4, 192:224] = 0.0
    x[4, 200] = -3.0
    x[5, 224] = float("nan")
    x[6, 256] = float("inf")
    return x


def results(data: dict) -> dict[str, torch.Tensor]:
    """Everything the kernels compute on `data`, by name: dequantised rows, products of 1, 5 and 16 rows on one
    and two threads (float32 and, for the block formats, int8 activations, also of 40 rows: AMX tiles of 16 and
    register tiles for the last 8), the fused argmax, and a Q8_0 head's screened argmax of 40 rows with the
    candidates it kept (VNNI's and AVX2's screens, or qargmax in the portable build)."""
    out = {}
    before = torch.get_num_threads()
    try:
        for name, (w, qtype, K) in data["mats"].items():
            out[f"{name} rows"] = ops().dequantize(w, torch.arange(w.shape[0]), qtype, K)
            x = data["x"][:, :K].contiguous()
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for m in (1, 5, 16, 40):
                    if m < 40:
                        out[f"{name} linear M={m} threads={threads}"] = ops().qlinear(x[:m], w, qtype, K)
                    if qtype in BLOCK_QUANTIZED:
                        packed = ops().q8_pack(w, qtype, K)
                        (out[f"{name} q8 M={m} threads={threads}"],) = ops().q8_linear_many(
                            x[:m], [packed], [qtype], [w.shape[0]], K
                        )
                        if K == 512:
                            (out[f"{name} q8 edges M={m} threads={threads}"],) = ops().q8_linear_many(
                                data["edges"][:m], [packed], [qtype], [w.shape[0]], K
                            )
                out[f"{name} argmax threads={threads}"] = ops().qargmax(x[:16], w, qtype, K)
                if name == "Q8_0 screened":  # the screen where the build has one; it must give qargmax's index
                    screen = screen_pack(w, K) if ops().screen_available() else None
                    ids, candidates = (
                        ops().qargmax_screened(x, w, screen, K)
                        if screen is not None
                        else (ops().qargmax(x, w, qtype, K), torch.zeros(len(x), dtype=torch.long))
                    )
                    out[f"{name} screened argmax threads={threads}"] = ids
                    # The rows its bound kept: the same where the screen's sums and float chain are (AMX tiles or
                    # VNNI's registers), not across builds (AVX2 quantizes x more coarsely).
                    out[f"{name} screen candidates threads={threads}"] = candidates
    finally:
        torch.set_num_threads(before)
    return out


def _subprocess_main(data_path: str, out_path: str) -> None:
    """Run in a subprocess under $MTPSPEC_RUNTIME_ISA: `results` and the compiled path, saved for the test."""
    torch.save({"path": ops().vector_path(), "q8 path": ops().q8_path(), **results(torch.load(data_path))}, out_path)


def _bits(t: torch.Tensor) -> torch.Tensor:  # float32 compared as bits, so NaN == NaN and -0 != 0
    return t.view(torch.int32) if t.dtype == torch.float32 else t


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """(path of the saved inputs, this process's results on them)."""
    data = inputs()
    path = tmp_path_factory.mktemp("isa") / "inputs.pt"
    torch.save(data, path)
    return path, results(data)


def _results_elsewhere(native, tmp_path, **env) -> dict:
    """`results` on the native fixture's inputs in a subprocess with `env` set, and the paths it compiled."""
    data_path, _ = native
    out_path = tmp_path / "theirs.pt"
    src, tests = Path(mtpspec.__file__).parents[1], Path(__file__).parent
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(src), str(tests)])}
    code = (
        f"from {Path(__file__).stem} import _subprocess_main; _subprocess_main({str(data_path)!r}, {str(out_path)!r})"
    )
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out_path)


def _assert_same_bits(theirs: dict, ours: dict) -> None:
    assert theirs.keys() == ours.keys()
    for key, value in ours.items():
        assert torch.equal(_bits(theirs[key]), _bits(value)), key


@pytest.mark.slow  # compiles the kernels for the instruction set once per cache (~1 min)
@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_every_instruction_set_gives_the_native_bits(isa, native, tmp_path):
    try:
        isa_flags(isa)
    except MtpspecError as e:
        pytest.skip(str(e))
    theirs = _results_elsewhere(native, tmp_path, **{ISA_ENV: isa})
    assert theirs.pop("path") == PATHS[isa] and theirs.pop("q8 path") == PATHS[isa]
    ours = {key: value for key, value in native[1].items() if "candidates" not in key}
    _assert_same_bits({key: value for key, value in theirs.items() if "candidates" not in key}, ours)


def test_amx_tiles_give_the_bits_of_the_vector_products(native, tmp_path):
    """On a CPU with AMX, products and the screened head of 10 rows or more take tiles of 16 rows: the same bits
    as VNNI's registers give, and the same candidates kept by the head's screen."""
    if not ops().q8_path().endswith("+amx"):
        pytest.skip("no AMX tiles on this CPU (or the OS does not grant them)")
    theirs = _results_elsewhere(native, tmp_path, **{ISA_ENV: requested_isa(), "MTPSPEC_AMX": "0"})
    assert theirs.pop("path") == ops().vector_path() and theirs.pop("q8 path") == "avx512-vnni"
    _assert_same_bits(theirs, native[1])


def test_the_loaded_build_reports_its_path():
    flags = set(cpu_flags().split())
    native = "avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma", "f16c"} <= flags else "portable"
    assert ops().vector_path() == PATHS.get(requested_isa(), native)
    # The int8 products: VNNI where AVX-512 has it, AVX2's otherwise; with AMX tiles where the OS grants them.
    vnni = native == "avx512" and "avx512_vnni" in flags
    q8 = PATHS.get(requested_isa()) or ("avx512-vnni" if vnni else "avx2" if native == "avx512" else native)
    amx = requested_isa() == "native" and vnni and {"amx_tile", "amx_int8"} <= flags
    assert ops().q8_path() in ({q8, q8 + "+amx"} if amx else {q8})


def test_the_instruction_set_is_part_of_the_build_name_and_checked(monkeypatch):
    names = set()
    for isa in ("native", "avx2", "portable"):
        monkeypatch.setenv(ISA_ENV, isa)
        try:
            names.add(build_name())
        except MtpspecError:
            assert isa == "avx2"  # a CPU without AVX2: refused, not built
    monkeypatch.delenv(ISA_ENV)
    assert build_name() in names and len(names) >= 2
    monkeypatch.setenv(ISA_ENV, "avx512")
    with pytest.raises(MtpspecError, match=f"{ISA_ENV}='avx512': expected one of native, avx2, portable"):
        build_name()
