"""mtpspec: lossless speculative decoding with multi-token-prediction drafters."""

from .api import Pipeline, load
from .engine import Engine, GenerationConfig, GenerationResult
from .errors import MtpspecError
from .sampling import SamplingParams

__all__ = ["Engine", "GenerationConfig", "GenerationResult", "MtpspecError", "Pipeline", "SamplingParams", "load"]
__version__ = "0.1.0"
