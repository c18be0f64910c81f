"""The MTP drafter in the loop: k query-only passes over the target's cache, all at one position.

Step 1 of a round reads the target embedding of the last committed token and the target's
post-norm hidden state at the row that produced it (`state.last_hidden`, fused with the outputs of
the drafter's `feature_layers` there, `state.last_features`, where it has some); step j > 1 reads the
drafted token's embedding and the drafter's own state from step j − 1. Every step uses the
position id of the last committed token and the same target K/V, so the K/V windows and RoPE are
built once per round. The drafter keeps no cache: there is nothing to prefill or roll back. On a GGUF
target the step runs on the runtime's kernels with the drafter's matrices in Q8_0 (mtp/quantized.py).
With `branches` > 1 the round drafts a tree instead (mtp_tree.py): the nodes a depth expands are
independent queries of that same kind, so they run as the rows of one call.

With the drafter's `min_confidence` (config.json) > 0, a round stops early, before drafting a
position whose most likely token the drafter itself gives less than that probability (a weak
drafter then stops paying for drafts the target would reject; HF assisted generation's
`assistant_confidence_threshold` is the same idea). The decision reads only the distribution
of a position not yet drafted, never the token drawn there, so under sampling every proposed
token is still an unbiased draw from its q.
"""

from __future__ import annotations

import torch

from ..kernels import accelerate
from ..mtp import CommittedKeys, MtpModel, MtpOutput, check_fits, layer_inputs
from ..mtp.quantized import QuantizedMtp, quantizable
from ..sampling import SamplingParams, probabilities, sample
from ..target import Target
from .base import EMPTY, DecodeState, Draft
from .mtp_tree import greedy_tree, sampled_tree


class MtpDrafter:
    name = "mtp"

    def __init__(self, model: MtpModel, target: Target, keys=None):
        self.min_confidence = model.config.min_confidence
        self.max_draft_tokens = model.config.max_draft_tokens  # 0: no limit of its own
        self.kv_layers = check_fits(model.config, target)
        self.feature_layers = model.config.feature_layers  # what step 1 reads besides the last hidden state
        self.keys = keys or CommittedKeys()  # which cached keys each layer reads (see mtp/reading.py)
        self.lm_weight = target.output_embedding if model.config.lm_head == "target" else None
        if quantizable(model, target, self.keys):  # a GGUF target: the step on its kernels, matrices in Q8_0
            self.model = QuantizedMtp(model, target)
            self.layer_inputs = self.model.layer_inputs
        else:
            self.model = model.to(target.dtype).eval()
            accelerate(self.model)  # the target's small-M linear kernel, where it can be built
            self.layer_inputs = layer_inputs

    @property
    def concurrent(self) -> bool:
        return isinstance(self.keys, CommittedKeys)  # stateless; the parity tests' reader tracks one generation

    def begin(self, state: DecodeState) -> None:
        self.keys.begin(state)

    @torch.inference_mode()
    def propose(self, state, k, params, generator, branches=1) -> Draft:
        if k == 0:
            return Draft(EMPTY)
        depth = min(k, self.max_draft_tokens or k)  # a chain's length, a tree's depth
        target = state.target
        p = state.length - 1  # position of the last committed token; its K/V are not cached yet
        inputs = self.layer_inputs(target, self.kv_layers, p, self.keys)
        if branches > 1:
            return self._tree(state, inputs, k, depth, branches, params, generator)
        token = state.tokens[p : p + 1]
        hidden = self.model.entry(state.last_hidden, state.last_features).view(1, 1, -1)
        tokens, qs = [], []
        for _ in range(depth):
            out = self.model(target.embed(token)[None], hidden, inputs, self.lm_weight)
            if self.min_confidence and top_probability(out, params) < self.min_confidence:
                break
            if params.greedy:
                token = out.argmax().view(1)
            else:
                token, q = draw(out, params, generator)
                qs.append(q)
            tokens.append(token)
            hidden = out.state
        if not tokens:
            return Draft(EMPTY)
        return Draft(torch.cat(tokens), torch.stack(qs) if qs else None)

    def _tree(self, state, inputs, k, depth, branches, params, generator) -> Draft:
        """A draft tree (see mtp_tree.py): each depth's expanded nodes are the rows of one drafter call."""
        target = state.target

        def step(tokens: torch.Tensor, hidden: torch.Tensor) -> MtpOutput:  # [R], [R, H_t]
            return self.model(target.embed(tokens)[None], hidden[None], inputs, self.lm_weight)

        root, hidden = int(state.tokens[state.length - 1]), self.model.entry(state.last_hidden, state.last_features)
        if params.greedy:
            return greedy_tree(step, root, hidden, k, branches, self.min_confidence, depth)
        return sampled_tree(step, root, hidden, k, branches, params, generator, self.min_confidence, depth)

    def commit(self, state, draft, accepted) -> None:
        self.keys.commit(state, draft.tokens.shape[0], accepted)


def top_probability(out: MtpOutput, params: SamplingParams) -> float:
    """The drafter's probability of its most likely next token (after temperature and filters when sampling)."""
    logits = out.scores[0, -1]  # over the candidates only, when there are some
    probs = torch.softmax(logits.float(), -1) if params.greedy else probabilities(logits, params)
    return float(probs.max())


def draw(
    out: MtpOutput, params: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample the next draft token; return it `[1]` with the distribution it came from, q `[V]`.

    With a centroid head only the candidates have finite logits and every other token has
    probability 0, so filtering, softmax and the draw run over the candidates alone and q is
    scattered back: the same distribution without vocabulary-wide filtering and sampling passes
    per step (on Gemma's 262k vocabulary this halved the drafter's share of sampled decoding).
    """
    logits = out.scores[0, -1]
    if out.candidates is None:
        q = probabilities(logits, params)
        return sample(q, generator).view(1), q
    ids = out.candidates[0, -1]
    q_ids = probabilities(logits, params)
    q = torch.zeros(out.vocab_size, dtype=q_ids.dtype, device=logits.device).index_put_((ids,), q_ids)
    return ids[sample(q_ids, generator)].view(1), q
