"""spikeinfer: compress and serve 1-bit spiking BERT models."""

from .config import ModelConfig, NeuronParams
from .engine import evaluate, load
from .model import SpikingBert, compact

__version__ = "0.1.0"

__all__ = [
    "ModelConfig",
    "NeuronParams",
    "SpikingBert",
    "compact",
    "evaluate",
    "load",
    "__version__",
]
