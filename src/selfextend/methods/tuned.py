"""Settings found by ``selfextend tune``, saved per model so ``apply(model, target_length=N)`` reuses them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..config import trained_length_of


def tuned_path() -> Path:
    """``$SELFEXTEND_TUNED`` or ``~/.cache/selfextend/tuned.json``."""
    env = os.environ.get("SELFEXTEND_TUNED")
    return Path(env) if env else Path.home() / ".cache" / "selfextend" / "tuned.json"


def model_key(model: torch.nn.Module) -> str:
    """Identifies a model across processes: its path or hub id, family and trained length."""
    cfg = model.config
    name = getattr(cfg, "_name_or_path", "") or type(model).__name__
    return f"{name}|{cfg.model_type}|{trained_length_of(cfg)}"


def load_tuned() -> dict[str, Any]:
    path = tuned_path()
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read tuned settings {path}: {exc}; delete the file or fix it") from exc


def save_tuned(model: torch.nn.Module, target_length: int, settings: dict[str, Any],
               evidence: dict[str, Any]) -> Path:
    path = tuned_path()
    data = load_tuned()
    data.setdefault(model_key(model), {})[str(target_length)] = {**settings, "evidence": evidence}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)
    return path


def tuned_settings(model: torch.nn.Module, target_length: int) -> dict[str, int] | None:
    """The tuned ``{group_size, window}`` for the smallest tuned length >= ``target_length``, if any."""
    entries = load_tuned().get(model_key(model), {})
    lengths = sorted(int(n) for n in entries if int(n) >= target_length)
    if not lengths:
        return None
    best = entries[str(lengths[0])]
    return {"group_size": int(best["group_size"]), "window": int(best["window"])}
