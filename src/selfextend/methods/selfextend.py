"""SelfExtend (arXiv 2401.01325): neighbor attention below ``window``, grouped positions beyond it.

Validation is ``config.selfextend_config``, the attention ``integrations/hf/selfextend.py`` and ``backends/``;
this module adds the one thing only this method does with ``target_length``: settings that ``selfextend tune``
measured for this model win over the authors' rule."""

from __future__ import annotations

import logging

from ..config import SelfExtendConfig, check_target_length, selfextend_config
from ..integrations.hf import SELFEXTEND
from . import METHODS
from .base import TRAINED_LENGTH, AttentionMethod, Param, backend_param, config_params
from .tuned import tuned_path, tuned_settings

logger = logging.getLogger("selfextend")


@METHODS.register("self-extend")
class SelfExtend(AttentionMethod):
    """The authors' ``target_length`` rule, unless ``selfextend tune`` saved measured settings for this
    model."""

    summary = "SelfExtend: exact RoPE for keys closer than window, positions // group_size beyond"
    params = (
        Param("group_size", int, None, "G: grouped positions are floor(pos / G) "
              "(default: from target_length)", minimum=1,
              fix="group_size=1 is vanilla attention, use group_size >= 2 to extend the context"),
        Param("window", int, None, "W: keys closer than W keep exact distances (default 1024 for L >= 4096)",
              minimum=1, fix="the authors use 512..2048, below the trained length"),
        TRAINED_LENGTH,
        backend_param("self-extend"),
        Param("allow_overflow", bool, False, "past the reach (L - W) * G + W: warn instead of raising"),
        Param("allow_large_group_size", bool, False, "group_size past 64 (no published result uses more)"),
        Param("temperature", bool, False, "logits x (0.1 ln s + 1)^2 past L, s = (pos + 1) / L "
              "(as DCA/YaRN; not in the paper)"),
        Param("grouped_scale", float, 1.0, "logits of grouped pairs (distance >= W) x this: > 1 sharpens "
              "the grouped part only (not in the paper)", minimum=0, strict=True,
              fix="1 is the paper's SelfExtend; values above 1 sharpen the grouped part"),
        Param("scale_base", int, 0, "> 0: queries x max(1, ln(pos + 1) / ln(scale_base)), the log scaling "
              "of the authors' code (their longest passkey runs; use L); 0: off", minimum=0,
              fix="0 is off (the paper); the authors' code uses the trained length"),
    )
    config_class = SelfExtendConfig
    integration = SELFEXTEND

    def resolve(self, model, target_length, params):
        self.check_params(params)
        check_target_length(target_length)
        params = dict(params)
        tuned = None
        if target_length is not None and params.get("group_size") is None:
            tuned = tuned_settings(model, target_length)
            if tuned is not None and params.get("window") in (None, tuned["window"]):
                logger.warning("selfextend: target_length=%d -> tuned settings %s", target_length, tuned)
                params.update(group_size=tuned["group_size"], window=tuned["window"])
            else:
                tuned = None
        try:
            return config_params(selfextend_config(model.config, params, target_length))
        except ValueError as err:
            if tuned is None:
                raise
            raise ValueError(f"the tuned settings {tuned} in {tuned_path()} for this model at target_length="
                             f"{target_length}: {err}") from None

    def reach(self, model, params):
        return self.config(params).max_length
