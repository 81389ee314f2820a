"""transformers >= 5 integration through its attention-function registry (no class patching).

* ``attention.py``: what every method shares: registration, the lazy mask, per-model/per-layer state, the
  per-call plumbing (positions, vanilla delegation);
* ``selfextend.py`` and ``dca.py``: each method's attention (``SELFEXTEND``, ``DCA``);
* ``grouped_cache.py``: keys kept at remapped positions across calls (in the KV cache, or beside it);
* ``model_info.py``: what a method needs to know about a model (RoPE module, layers, family);
* ``compat.py``: transformers version shims.
"""

from .attention import LAYER_ATTR, AttentionIntegration
from .dca import DCA
from .model_info import SUPPORTED_FAMILIES
from .selfextend import SELFEXTEND

__all__ = ["DCA", "LAYER_ATTR", "SELFEXTEND", "SUPPORTED_FAMILIES", "AttentionIntegration"]
