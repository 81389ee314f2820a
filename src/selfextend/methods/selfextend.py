"""SelfExtend (arXiv 2401.01325): neighbor attention below ``window``, grouped positions beyond it.

Described in ``config.py`` (parameters, validation, the tuned settings that win over the authors' rule) and
``attention_inputs.py``; the attention in transformers is ``integrations/hf/selfextend.py``."""

from __future__ import annotations

from ..config import ATTENTION_SPECS
from ..integrations.hf import SELFEXTEND
from . import METHODS
from .base import AttentionMethod


@METHODS.register("self-extend")
class SelfExtend(AttentionMethod):
    """The authors' ``target_length`` rule, unless ``selfextend tune`` saved measured settings for this
    model."""

    summary = "SelfExtend: exact RoPE for keys closer than window, positions // group_size beyond"
    spec = ATTENTION_SPECS["self-extend"]
    integration = SELFEXTEND
