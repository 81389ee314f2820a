"""Settings found by ``selfextend tune``, saved per model so ``apply(model, target_length=N)`` reuses them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .params import trained_length_of


def tuned_path() -> Path:
    """``$SELFEXTEND_TUNED`` or ``~/.cache/selfextend/tuned.json``."""
    env = os.environ.get("SELFEXTEND_TUNED")
    return Path(env) if env else Path.home() / ".cache" / "selfextend" / "tuned.json"


def model_key(model_config: Any) -> str:
    """Identifies a model across processes from its config: its path or hub id (else its architecture),
    family and trained length."""
    cfg = model_config
    name = (getattr(cfg, "_name_or_path", "") or next(iter(getattr(cfg, "architectures", None) or []), "")
            or type(cfg).__name__)
    return f"{name}|{cfg.model_type}|{trained_length_of(cfg)}"


def load_tuned() -> dict[str, Any]:
    """The whole tuned-settings file, validated as a whole: every entry, not only the one asked for, so a bad
    file is refused with its path and the field at fault the first time it is read."""
    path = tuned_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read tuned settings {path}: {exc}; delete the file or fix it") from exc
    check_tuned(data, path)
    return data


def check_tuned(data: Any, path: Path) -> None:
    """``{model key: {target length: {"group_size": G, "window": W, ...}}}``, G and W checked as ``apply``
    checks them (``Param.check``); anything else is an error naming ``path`` and the field."""
    from .config import SELFEXTEND_PARAMS

    def bad(where: str, why: str) -> ValueError:
        return ValueError(f"tuned settings {path}: {where}{why}; fix the file or delete it "
                          "(`selfextend tune` writes it again)")

    shape = '{"<model key>": {"<target length>": {"group_size": G, "window": W}}}'
    if not isinstance(data, dict):
        raise bad("the file", f" holds a JSON {type(data).__name__}, not an object {shape}")
    params = {p.name: p for p in SELFEXTEND_PARAMS}
    for key, entries in data.items():
        if not isinstance(entries, dict):
            raise bad(f"entry [{key!r}]", f" is {entries!r}, not an object of target lengths: {shape}")
        for length, settings in entries.items():
            where = f"entry [{key!r}][{length!r}]"
            if not (length.isdigit() and str(int(length)) == length and int(length) >= 1):
                raise bad(where, " is not keyed by a target length in tokens (a whole number >= 1)")
            if not isinstance(settings, dict):
                raise bad(where, f" is {settings!r}, not an object with group_size and window")
            for name in ("group_size", "window"):
                if name not in settings:
                    raise bad(where, f" has no {name!r}")
                try:
                    params[name].check(settings[name])
                except (TypeError, ValueError) as err:
                    raise bad(where, f": {err}") from None


def save_tuned(model_config: Any, target_length: int, settings: dict[str, Any],
               evidence: dict[str, Any]) -> Path:
    path = tuned_path()
    data = load_tuned()
    data.setdefault(model_key(model_config), {})[str(target_length)] = {**settings, "evidence": evidence}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)
    return path


def tuned_settings(model_config: Any, target_length: int) -> dict[str, int] | None:
    """The tuned ``{group_size, window}`` for the smallest tuned length >= ``target_length``, if any."""
    entries = load_tuned().get(model_key(model_config), {})
    lengths = sorted(int(n) for n in entries if int(n) >= target_length)
    if not lengths:
        return None
    best = entries[str(lengths[0])]
    return {"group_size": best["group_size"], "window": best["window"]}
