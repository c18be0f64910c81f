"""Training MTP drafters for any supported target (`mtpspec train-drafter`).

data → teacher (the frozen target, online) → loss (unrolled, distillation per depth) → trainer
(AdamW, checkpoints, evaluation with the real engine, DDP), configured by options (presets).
"""

from .options import PRESETS, TrainOptions, build_options

__all__ = ["PRESETS", "TrainOptions", "build_options"]
