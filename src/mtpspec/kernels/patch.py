"""Route a model's `nn.Linear` layers through `kernels.linear`, without touching transformers.

Each plain `nn.Linear` is switched, in place, to `FastLinear`: the same object, the same
weight and bias Parameters (tied embeddings stay tied, state dicts are unchanged), only its
`forward` differs. `restore` switches them back.
"""

from __future__ import annotations

import torch

from .linear import kernels_active, linear


class FastLinear(torch.nn.Linear):
    """An `nn.Linear` whose forward uses our kernel where it is faster (see `linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return linear(x, self.weight, self.bias)


def _linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    # Only exact nn.Linear: subclasses (quantized, LoRA, ...) have forwards of their own.
    found = [m for m in model.modules() if type(m) is torch.nn.Linear]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is torch.nn.Linear and all(head is not m for m in found):
        found.append(head)
    return found


def accelerate(model: torch.nn.Module) -> int:
    """Make the model's linear layers use the small-M kernel; returns how many were switched.

    Returns 0 where the kernel is turned off (`MTPSPEC_KERNELS=0`) or cannot be built (which
    says why in one line on stderr); the model then runs exactly as before.
    """
    if not kernels_active():
        return 0
    found = _linears(model)
    for m in found:
        m.__class__ = FastLinear
    return len(found)


def restore(model: torch.nn.Module) -> int:
    """Undo `accelerate`; returns how many layers were switched back."""
    found = [m for m in model.modules() if type(m) is FastLinear]
    for m in found:
        m.__class__ = torch.nn.Linear
    return len(found)
