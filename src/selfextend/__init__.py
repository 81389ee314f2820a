"""selfextend: training-free context extension (SelfExtend, arXiv 2401.01325, and its peers) for transformers.

    import selfextend
    model, tokenizer = selfextend.load_model()            # embedded SmolLM2-135M-Instruct
    selfextend.apply(model, group_size=4, window=1024)    # in place; reach (8192 - 1024) * 4 + 1024
    selfextend.apply(model, method="yarn", target_length=32768)   # or another method
    selfextend.remove(model)                              # exactly vanilla again
"""

from .api import SUPPORTED_FAMILIES, active, apply, max_length, remove, settings
from .backends import available_backends
from .config import SelfExtendConfig
from .methods import METHODS
from .models import load_model

__version__ = "0.2.0"
__all__ = [
    "METHODS",
    "SUPPORTED_FAMILIES",
    "SelfExtendConfig",
    "active",
    "apply",
    "available_backends",
    "load_model",
    "max_length",
    "remove",
    "settings",
]
