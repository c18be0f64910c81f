"""The target model: any Hugging Face causal LM behind a small, cache-owning wrapper.

The wrapper owns a preallocated KV cache (one `StaticLayer` per decoder layer, sized for the
request), so rolling back is an integer rewind. Every forward returns the logits and the
last-layer (post-final-norm) hidden states of its rows; `kv(layer)` exposes the cache to
drafters that attend to it (the MTP drafter).

Exact mode (the default) makes each position's logits independent of how positions are grouped
into forwards: attention is computed row by row over exactly the keys a row may see (see
`attention.py`), and block forwards use the native batched linear layers only where a probe has
shown them to be row-invariant on this machine, dtype and thread count; elsewhere a block is
run one row at a time, which is exact by construction (slower, never wrong). A forward may verify a
draft tree (`parents`, see `mtpspec.tree`): the rows' positions and ancestor slots travel in the
attention mask, and `keep` commits one root-to-node path.
"""

from __future__ import annotations

import json

import torch
from transformers.cache_utils import Cache, StaticLayer

from .attention import positions_mask
from .families import family_for
from .paths import row_invariance_store
from .runtime.model import feature_norm
from .runtime.target import TargetStep, check_prompt, needs_new_cache, stop_token_ids
from .tree import Block, keep_plan, tree_layout

PROBE_ROWS = 16  # largest block (draft tokens + 1) whose row-invariance the probe checks


class Target:
    supports_trees = True  # forward(..., parents) verifies a draft tree; keep(path) commits a path
    feature_layers: tuple[int, ...] = ()  # layers whose outputs each step also returns (`TargetStep.features`)

    def __init__(self, model, tokenizer, exact: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.exact = exact
        self.config = model.config
        self.family = family_for(self.config)  # where each layer's K/V live
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.hidden_size = self.config.hidden_size
        self.context_window = int(getattr(self.config, "max_position_embeddings", 1 << 20))
        self.softcap = getattr(self.config, "final_logit_softcapping", None)
        self.cache: Cache | None = None
        self.capacity = 0
        self._rows_invariant: bool | None = None
        self._block: Block | None = None  # the last forward's rows while they are all cached
        self.eos_token_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))

    @property
    def length(self) -> int:
        """Number of positions whose K/V are in the cache."""
        return int(self.cache.layers[0].cumulative_length) if self.cache is not None else 0

    def start(self, prompt_ids: torch.Tensor, capacity: int) -> TargetStep:
        """Reset the cache to hold `capacity` positions and prefill the prompt `[n]`.

        Returns the last prompt row only (the only one generation needs).
        """
        check_prompt(prompt_ids.shape[0], self.context_window)
        if self.cache is None or needs_new_cache(self.capacity, capacity):
            self.capacity = capacity
            self.cache = Cache(layers=[StaticLayer(capacity) for _ in range(self.family.num_cache_layers())])
        else:
            self.rollback(self.length)
        hidden, features = self._body(prompt_ids, exact=False)
        last = None if features is None else features[-1:]
        return TargetStep(hidden[-1:], last, logits=self._head(hidden[-1:]))

    def forward(self, ids: torch.Tensor, logits: bool = True, parents: torch.Tensor | None = None) -> TargetStep:
        """Run `ids` `[T]` at the next T cache slots; their K/V stay in the cache until rolled back.
        Always computes the logits (`logits=False` is a hint the GGUF runtime uses). With `parents`
        `[T]` (block indices, -1 for the root `ids[0]`) the rows are a draft tree: each row's result is
        the one plain decoding gives after its root-to-node path (see `mtpspec.tree`); commit one path
        with `keep` (or roll the whole block back)."""
        start, rows = self.length, ids.shape[0]
        if start + rows > self.capacity:
            raise RuntimeError(f"cache overflow: {start} + {rows} > {self.capacity}")
        positions, slots = torch.arange(start, start + rows), None
        if parents is not None:
            parents = torch.as_tensor(parents, dtype=torch.long)
            if parents.shape != ids.shape:
                raise ValueError(f"a tree of {rows} rows needs parents [{rows}], not {tuple(parents.shape)}")
            positions, slots = tree_layout(parents, start)
        positions = positions.to(ids.device)
        if self.exact and rows > 1 and not self.rows_invariant(rows):
            # One row at a time through the output head too: a block's head would round rows differently.
            # Row i is written at slot start + i, after its ancestors.
            one = [None] * rows if slots is None else slots.split(1)
            parts = [self._body(ids[i : i + 1], True, positions[i : i + 1], one[i], start) for i in range(rows)]
            hidden = torch.cat([h for h, _ in parts])
            features = torch.cat([f for _, f in parts]) if self.feature_layers else None
            step = TargetStep(hidden, features, logits=torch.cat([self._head(h) for h, _ in parts]))
        else:
            hidden, features = self._body(ids, self.exact, positions, slots, start)
            step = TargetStep(hidden, features, logits=self._head(hidden))
        self._block = Block(start, rows, parents)
        return step

    @torch.inference_mode()  # the cache tensors were made in inference mode
    def keep(self, path) -> None:
        """Commit the root-to-node `path` (block indices of the last forward's rows, root 0 first, each
        the parent of the next) and forget the rest of that block: the path's K/V move to the slots
        after the prefix, and the length becomes block start + len(path). For a chain block `[0, 1, ...,
        a]` this is a rollback (nothing moves). The last forward's block must still be all cached."""
        source, dest, length = keep_plan(self._block, self.length, path)
        if source.numel():  # a chain path moves nothing
            for layer in self.cache.layers:
                layer.keys[:, :, dest] = layer.keys[:, :, source]
                layer.values[:, :, dest] = layer.values[:, :, source]
        self.rollback(self.length - length)
        self._block = None

    def hidden_states(self, ids: torch.Tensor) -> TargetStep:
        """The step of `ids` at the next T positions with prefill arithmetic and no output head: hidden
        states, and features with `feature_layers` (for callers that score the vocabulary themselves,
        e.g. training)."""
        return TargetStep(*self._body(ids, exact=False))

    def rollback(self, n: int) -> None:
        """Forget the last `n` positions."""
        if n:
            if n > self.length:
                raise RuntimeError(f"cannot roll back {n} positions, only {self.length} are cached")
            self.cache.crop(-n)

    def kv(self, layer: int, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[1, Hkv, stop, D]` that decoder layer `layer` attends to (views, not copies).

        `stop` defaults to the committed length; rows past it are stale (rolled back, not yet overwritten).
        """
        lay = self.cache.layers[self.family.cache_index(layer)]
        n = self.length if stop is None else stop
        return lay.keys[:, :, :n], lay.values[:, :, :n]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings `[T, H]` exactly as the target computes them (scaled where it scales)."""
        return self.model.get_input_embeddings()(ids[None])[0]

    def rope(self, layer: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[B, T, D]` of `layer`'s rotary embedding at `positions` `[B, T]`."""
        return self.family.rope(self.model, layer, positions)

    @property
    def output_embedding(self) -> torch.Tensor:
        """The output head's weight `[V, H]`."""
        return self.model.get_output_embeddings().weight

    @torch.inference_mode()
    def _body(
        self,
        ids: torch.Tensor,  # [T]
        exact: bool,
        positions: torch.Tensor | None = None,  # [T] int64; default: the next T positions
        slots: torch.Tensor | None = None,  # [T, W] int64 a tree's ancestor slots (`mtpspec.tree.tree_layout`)
        tree_start: int = 0,  # the tree's root slot
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states `[T, H]` and the `feature_layers`' outputs `[T, F·H]` (None without them), the rows'
        K/V written at the next T slots."""
        self._block = None  # a forward sets it after this
        if positions is None:
            positions = torch.arange(self.length, self.length + ids.shape[0], device=ids.device)
        out = self.model.model(
            input_ids=ids[None],
            attention_mask=positions_mask(positions, slots, tree_start),
            position_ids=positions[None],
            cache=self.cache,
            use_cache=True,
            mtpspec_exact=exact,
            output_hidden_states=bool(self.feature_layers),
        )
        if not self.feature_layers:
            return out.last_hidden_state[0], None
        eps = self.config.rms_norm_eps  # hidden_states[i + 1]: layer i's output
        return out.last_hidden_state[0], torch.cat(
            [feature_norm(out.hidden_states[i + 1][0], eps) for i in self.feature_layers], -1
        )

    @torch.inference_mode()
    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def rows_invariant(self, rows: int) -> bool:
        """Whether every linear layer gives each row the same bits in a block of `rows` as alone."""
        if rows > PROBE_ROWS:
            return False
        if self._rows_invariant is None:
            self._rows_invariant = probe_row_invariance(self.model, PROBE_ROWS)
        return self._rows_invariant


def _linear_shapes(model) -> list[tuple[int, int, bool]]:
    """(in, out, runs through `kernels.linear`) of every linear layer: the probe tests what runs."""
    from .kernels import FastLinear

    layers = {
        (m.in_features, m.out_features, isinstance(m, FastLinear))
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    }
    return sorted(layers)


@torch.inference_mode()
def probe_row_invariance(model, rows: int) -> bool:
    """Check on random data that `linear(X[:M])[i]` equals `linear(X[i:i+1])` bit for bit, M ≤ rows.

    Each layer is probed through the function it really calls (the small-M kernel for layers
    `kernels.accelerate` switched, PyTorch's linear otherwise). Kernel choice depends on the
    machine, dtype, thread count, shape and whether our kernel is built, so the answer is
    cached on disk under those keys.
    """
    from . import kernels

    dtype = next(model.parameters()).dtype
    shapes = _linear_shapes(model)
    # Which build of our kernel the switched layers run (None: they fall back to PyTorch's).
    kernel = kernels.kernel_id() if any(fast for _, _, fast in shapes) else None
    key = json.dumps([torch.__version__, str(dtype), torch.get_num_threads(), rows, _cpu_flags(), kernel, shapes])
    store = row_invariance_store()
    known = json.loads(store.read_text()) if store.is_file() else {}
    if key in known:
        return known[key]
    gen = torch.Generator().manual_seed(0)
    ok = True
    for fan_in, fan_out, fast in shapes:
        linear = kernels.linear if fast else torch.nn.functional.linear
        w = torch.randn(fan_out, fan_in, generator=gen).to(dtype)
        x = torch.randn(rows, fan_in, generator=gen).to(dtype)
        alone = torch.cat([linear(x[i : i + 1], w) for i in range(rows)])
        if not all(torch.equal(linear(x[:m], w), alone[:m]) for m in range(2, rows + 1)):
            ok = False
            break
    known[key] = ok
    store.parent.mkdir(parents=True, exist_ok=True)
    store.write_text(json.dumps(known))
    return ok


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return " ".join(sorted(fl for fl in line.split() if fl.startswith(("avx", "amx", "fma"))))
    except OSError:
        pass
    return torch.backends.cpu.get_cpu_capability()
