"""A lean forward over a GGUF model's own weights: Gemma 3 and Llama-style decoders.

Every projection is a `QMatrix` product (C++, on the file's blocks: float32 activations, or with `q8` int8
ones, see ACTIVATIONS). A layer is three calls on `[T, H]` rows: `attention_inputs` (norm, q/k/v products,
Gemma's q/k norms, RoPE) and `layer_output` (o, norms, residuals, the feed-forward), both C++ (layer.cpp),
around the exact per-row attention kernel over the preallocated cache. The file is interpreted as transformers interprets it when it loads a GGUF:
- llama.cpp stores Llama's Q and K rows permuted for its interleaved RoPE; `_unpermute` restores the
  Hugging Face order (a row permutation, so it works on quantized rows), and RoPE is `rotate_half`;
- llama.cpp stores Gemma's norm weights as 1 + w; transformers subtracts 1 and its norm adds it back,
  so `(g - 1) + 1` is computed the same way here;
- RoPE tables come from transformers' own rotary module for the model's config.

Row invariance: a row's result depends only on its token and the cached keys before it, never on
which other rows share the call (see quant.cpp for the products, kernels/attention.py for attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ..errors import MtpspecError
from ..families import family_for
from ..kernels.attention import append_attention
from ..tree import tree_layout
from .build import ops
from .weights import GgufWeights, QMatrix

ARCHS = ("gemma3", "llama")
# What the layers' products take in (`--dtype` on the GGUF runtime): `q8`, each activation row quantized to
# int8 per 32 values, as llama.cpp does, and multiplied in exact integer sums (q8.cpp); or `fp32`, float32
# activations times the exactly dequantised weights (quant.cpp), the closest to transformers' float32.
# The output head takes float32 activations either way.
ACTIVATIONS = ("q8", "fp32")
ROPE_TABLE = 1024  # positions in a RoPE table at first (see GgufModel.rope)
DEFAULT_ACTIVATIONS = "q8"


@dataclass
class Segment:
    """Consecutive rows of a forward that continue one sequence: its cache (one (keys, values)
    `[1, Hkv, capacity, D]` pair per layer) and the position of its first row. With `parents` the
    rows are a draft tree (see `mtpspec.tree`): row i runs at position start + depth(i) and attends to
    the prefix and its ancestors; its K/V are still written at slot start + i."""

    cache: list[tuple[torch.Tensor, torch.Tensor]]
    start: int
    rows: int
    parents: torch.Tensor | None = None  # [rows] int64 block index of each row's parent (-1: the root); None: a chain

    def layout(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows' positions `[rows]` and, for a tree, the attention kernel's `slots` `[rows, W]`."""
        if self.parents is None:
            return torch.arange(self.start, self.start + self.rows), None
        if self.parents.shape != (self.rows,):
            raise ValueError(f"a tree of {self.rows} rows needs parents [{self.rows}], not {tuple(self.parents.shape)}")
        return tree_layout(self.parents, self.start)


@dataclass
class Layer:
    kind: str  # "sliding_attention" or "full_attention"
    window: int | None
    attn_norm: torch.Tensor  # [H]
    q: QMatrix  # [Hq * D, H]
    k: QMatrix  # [Hkv * D, H]
    v: QMatrix  # [Hkv * D, H]
    o: QMatrix  # [H, Hq * D]
    ffn_norm: torch.Tensor  # [H]
    gate: QMatrix  # [F, H]
    up: QMatrix  # [F, H]
    down: QMatrix  # [H, F]
    q_norm: torch.Tensor | None = None  # [D] Gemma only
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None  # [H] Gemma's sandwich norms
    post_ffn_norm: torch.Tensor | None = None

    def products(self, q8: bool) -> tuple[tuple, tuple]:
        """The C++ layer ops' product arguments (`QMatrix.product_args`): q, k, v for `attention_inputs`;
        o, gate, up, down, with their input sizes, for `layer_output`."""
        out = (self.o, self.gate, self.up, self.down)
        return QMatrix.product_args([self.q, self.k, self.v], q8), (
            *QMatrix.product_args(out, q8),
            [m.cols for m in out],
        )


def feature_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A target layer's output as an MTP drafter feature: RMS-normalised in float32, without a weight (the
    residual stream's scale grows with depth; the fuse layer learns the weights)."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def _unpermute(m: QMatrix, heads: int) -> QMatrix:
    """Undo llama.cpp's Q/K row permutation (transformers' `_reverse_permute_weights`, as a row order)."""
    n = m.shape[0]
    half = n // heads // 2
    order = torch.arange(n).view(heads, half, 2).transpose(1, 2).reshape(-1)
    return m.take(order)


class GgufModel:
    """Weights and forward of one GGUF decoder; `config` is the transformers config of the same file."""

    def __init__(self, weights: GgufWeights, config, rotary, activations: str = DEFAULT_ACTIVATIONS):
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, not {activations!r}")
        self.activations = activations
        self.q8 = activations == "q8"
        self.arch = weights.architecture
        if self.arch not in ARCHS:
            raise MtpspecError(
                f"the GGUF runtime runs {', '.join(ARCHS)} models, not {self.arch!r}; use --weights dequant"
            )
        self.config = config
        self.family = family_for(config)
        self.rotary = rotary  # transformers' rotary embedding module for this config
        self.gemma = self.arch == "gemma3"
        c = config
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.shape = (self.heads, self.kv_heads, self.head_dim)
        self.eps = c.rms_norm_eps
        self.scaling = self.family.attention_scaling(0)
        self.softcap = getattr(c, "final_logit_softcapping", None)
        self.attn_softcap = getattr(c, "attn_logit_softcapping", None)
        self.embed_scale = torch.tensor(c.hidden_size**0.5) if self.gemma else None
        self._rope_tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # kind -> cos, sin [n, D]
        self.embedding = weights.matrix("token_embd.weight")
        self.head = weights.matrix("output.weight") if weights.has("output.weight") else self.embedding
        _ = self.head.screen  # the greedy head's int8 copy, packed now rather than in the first request
        self.final_norm = self._norm_weight(weights.vector("output_norm.weight"))
        self.layers = [self._layer(weights, i) for i in range(c.num_hidden_layers)]
        # The int8 copies are packed now (with q8) rather than in the first request.
        self._products = [layer.products(self.q8) for layer in self.layers]

    def _norm_weight(self, w: torch.Tensor) -> torch.Tensor:
        return 1.0 + (w - 1.0) if self.gemma else w

    def _layer(self, w: GgufWeights, i: int) -> Layer:
        p = f"blk.{i}."
        vec = lambda name: self._norm_weight(w.vector(p + name))  # noqa: E731
        q, k = w.matrix(p + "attn_q.weight"), w.matrix(p + "attn_k.weight")
        if not self.gemma:
            q, k = _unpermute(q, self.heads), _unpermute(k, self.kv_heads)
        layer = Layer(
            kind=self.family.layer_type(i),
            window=self.family.sliding_window(i),
            attn_norm=vec("attn_norm.weight"),
            q=q,
            k=k,
            v=w.matrix(p + "attn_v.weight"),
            o=w.matrix(p + "attn_output.weight"),
            ffn_norm=vec("ffn_norm.weight"),
            gate=w.matrix(p + "ffn_gate.weight"),
            up=w.matrix(p + "ffn_up.weight"),
            down=w.matrix(p + "ffn_down.weight"),
        )
        if self.gemma:
            layer.q_norm, layer.k_norm = vec("attn_q_norm.weight"), vec("attn_k_norm.weight")
            layer.post_attn_norm, layer.post_ffn_norm = vec("post_attention_norm.weight"), vec("post_ffw_norm.weight")
        return layer

    def norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., H]
        """RMS norm over the last axis (one C++ call; `x * rsqrt(mean(x²) + eps) * w`)."""
        return ops().rms_norm(x, w, self.eps)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        x = self.embedding.rows(ids)
        return x * self.embed_scale if self.gemma else x

    def rope(self, kind: str, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[..., D]` at `positions` `[...]` (e.g. `[B, T]`) for layers of type `kind`, looked up in tables that the
        rotary module computes once for positions 0 .. n - 1 (grown by doubling as positions reach n; a call
        per forward cost as much as a layer of a small model). Each value is that position's own: the module
        takes one product of a frequency and a position, then its cosine and sine, per value."""
        need = int(positions.max()) + 1
        table = self._rope_tables.get(kind)
        if table is None or table[0].shape[0] < need:
            n = max(need, 2 * table[0].shape[0] if table else ROPE_TABLE)
            probe, grid = torch.empty(0), torch.arange(n)[None]
            cos, sin = self.rotary(probe, grid, kind) if self.gemma else self.rotary(probe, grid)
            self._rope_tables[kind] = table = (cos[0], sin[0])
        return table[0][positions], table[1][positions]

    def forward(
        self,
        ids: torch.Tensor,
        start: int,
        cache: list[tuple[torch.Tensor, torch.Tensor]],
        feature_layers: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states `[T, H]` (after the final norm) of tokens `ids` `[T]` at positions start.., writing
        their K/V into `cache` (one (keys, values) `[1, Hkv, capacity, D]` pair per layer); with `feature_layers`
        also those layers' outputs for an MTP drafter, `[T, F·H]` (`feature_norm`), else None."""
        return self.forward_segments(ids, [Segment(cache, start, ids.shape[0])], feature_layers)

    def forward_segments(
        self, ids: torch.Tensor, segments: list[Segment], feature_layers: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward` for several sequences in one pass: `segments` cover `ids` `[T]` in order, each
        segment's rows continuing its own sequence in its own cache. The projections read each weight
        once for all T rows; attention runs per segment over that segment's cache. Every row's result
        is the one it would have alone (row invariance), whoever shares the pass."""
        t = ids.shape[0]
        if sum(s.rows for s in segments) != t:
            raise ValueError(f"segments cover {sum(s.rows for s in segments)} rows, not {t}")
        # (positions, slots) per segment: every tree is checked before any cache is written.
        layouts = [s.layout() for s in segments]
        positions = torch.cat([p for p, _ in layouts])
        starts, rows, slots = [s.start for s in segments], [s.rows for s in segments], [tree for _, tree in layouts]
        attend = append_attention(
            starts, rows, positions, slots, self.scaling, self.attn_softcap, torch.float32, self.head_dim
        )
        if attend is None:  # no C++ attention kernels here
            attend = partial(self._attend_per_sequence, starts, rows, positions, slots)
        tables = {kind: self.rope(kind, positions) for kind in self.family.attention_types()}  # cos, sin [T, D]
        x, kept = self.embed(ids), {}
        for i, layer in enumerate(self.layers):
            q, k, v = self._layer_inputs(i, x, *tables[layer.kind])
            a = self._attend(attend, q, k, v, segments, i, layer.window)
            x = self._layer_outputs(i, x, a)
            if i in feature_layers:
                kept[i] = feature_norm(x, self.eps)
        features = torch.cat([kept[i] for i in feature_layers], -1) if feature_layers else None
        return self.norm(x, self.final_norm), features

    def _layer_inputs(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Layer i's q `[T, Hq, D]`, k and v `[T, Hkv, D]` from its input x `[T, H]` (one C++ call, layer.cpp)."""
        layer, (qkv, _) = self.layers[i], self._products[i]
        return ops().attention_inputs(
            x, layer.attn_norm, self.eps, *qkv, layer.q_norm, layer.k_norm, cos, sin, *self.shape
        )

    def _attend(self, attend, q, k, v, segments: list[Segment], i: int, window: int | None) -> torch.Tensor:
        """`attend` (`append_attention`'s) over layer i's cache of every sequence."""
        return attend(q, k, v, [s.cache[i][0] for s in segments], [s.cache[i][1] for s in segments], window)

    def _layer_outputs(self, i: int, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Layer i's output `[T, H]` from its input x and its attention's a `[T, Hq, D]` (one C++ call)."""
        layer, (_, out) = self.layers[i], self._products[i]
        return ops().layer_output(
            x, a, *out, layer.post_attn_norm, layer.ffn_norm, layer.post_ffn_norm, self.eps, self.gemma
        )

    def _attend_per_sequence(self, starts, rows, positions, slots, q, k, v, keys, values, window) -> torch.Tensor:
        """`append_attention`'s `attend` without the C++ kernels: per sequence, each row's key and value
        written at its place, then the same per-row arithmetic through PyTorch."""
        from ..attention import per_row_attention

        parts, rule = [], (window, self.scaling, self.attn_softcap)
        pieces = zip(q.split(rows), k.split(rows), v.split(rows), positions.split(rows), strict=True)
        sequences = zip(keys, values, starts, rows, slots, pieces, strict=True)
        for cache_keys, cache_values, start, n, tree, (qs, ks, vs, pos) in sequences:
            cache_keys[0, :, start : start + n] = ks.transpose(0, 1)
            cache_values[0, :, start : start + n] = vs.transpose(0, 1)
            query = qs.transpose(0, 1)[None]  # [1, Hq, rows, D]
            parts.append(
                per_row_attention(query, cache_keys, cache_values, pos, *rule, slots=tree, tree_start=start)[0]
            )
        return torch.cat(parts)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, V] float32
        logits = self.head.linear(hidden)
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T] int64
        """The argmax of `logits(hidden)`, fused with the head (a softcap is monotonic but could tie
        distinct logits, so a capped head takes the full logits)."""
        if self.softcap:
            from ..sampling import argmax

            return argmax(self.logits(hidden))
        return self.head.argmax(hidden)
