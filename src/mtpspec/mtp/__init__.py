"""The MTP drafter (Gemma 4 assistant design): a few query-only layers on the target's KV cache.

`init_drafter` shapes a random one for any supported target, `save_drafter` / `load_drafter` use
the official checkpoint layout, `MtpModel` is the network (batched, for training too), and
`drafters/mtp.py` runs it in the speculative loop.
"""

from .checkpoint import check_fits, init_drafter, load_drafter, save_drafter, with_features
from .config import MtpConfig
from .model import LayerInputs, MtpModel, MtpOutput
from .reading import CommittedKeys, TransformersKeys, layer_inputs

__all__ = [
    "CommittedKeys",
    "LayerInputs",
    "MtpConfig",
    "MtpModel",
    "MtpOutput",
    "TransformersKeys",
    "check_fits",
    "init_drafter",
    "layer_inputs",
    "load_drafter",
    "save_drafter",
    "with_features",
]
