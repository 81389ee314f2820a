"""selfextend: training-free context extension (SelfExtend, arXiv 2401.01325) for transformers models.

    import selfextend
    model, tokenizer = selfextend.load_model()            # embedded SmolLM2-135M-Instruct
    selfextend.apply(model, group_size=4, window=1024)    # in place; reach (8192 - 1024) * 4 + 1024
    selfextend.remove(model)                              # exactly vanilla again
"""

from .api import SUPPORTED_FAMILIES, apply, max_length, remove, settings
from .backends import available_backends
from .config import SelfExtendConfig
from .models import load_model

__version__ = "0.1.0"
__all__ = [
    "SUPPORTED_FAMILIES",
    "SelfExtendConfig",
    "apply",
    "available_backends",
    "load_model",
    "max_length",
    "remove",
    "settings",
]
