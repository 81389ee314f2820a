"""The package's layers import downward only, so each layer can be used and tested without the ones above it.

Read from the source (every ``import``, including those inside functions): importing nothing keeps this
instant and sees the lazy imports too.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# module prefix -> layer; a module may import its own layer and those below, never above
LAYERS = {
    # pure math and plumbing
    "selfextend.positions": 0, "selfextend.rope": 0, "selfextend.registry": 0, "selfextend.params": 0,
    "selfextend.backends": 1,
    # method descriptions and validation, the backend inputs they build
    "selfextend.attention_inputs": 2, "selfextend.config": 2, "selfextend.tuned": 2,
    "selfextend.integrations": 3,
    "selfextend.integrations.lm_eval": 6,  # drives the public API from another harness, as eval/ does
    "selfextend.methods": 4,
    # the public API
    "selfextend": 5, "selfextend.api": 5, "selfextend.models": 5, "selfextend.generation": 5,
    "selfextend.eval": 6, "selfextend.serve": 6,
    "selfextend.cli": 7, "selfextend.cli_args": 7, "selfextend.__main__": 7,
}

# Upward imports tolerated, each with what it takes from above; moving that down removes the entry.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def layer_of(module: str) -> tuple[str, int] | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return prefix, LAYERS[prefix]
    return None


def imports(path: Path) -> tuple[str, list[tuple[int, str]]]:
    """The module's dotted name, and (line, imported module) for every import of ``selfextend``."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    package = parts if is_package else parts[:-1]  # what ``from . import`` is relative to
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            # ``from . import x`` may name a submodule: judge ``pkg.x``
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return ".".join(parts), [(line, t) for line, t in found if t.split(".")[0] == "selfextend"]


def test_every_import_goes_down_the_layers():
    upward, unplaced = set(), set()
    where = {}
    for path in sorted(SRC.rglob("*.py")):
        name, found = imports(path)
        own = layer_of(name)
        if own is None:
            unplaced.add(name)
            continue
        for line, target in found:
            theirs = layer_of(target)
            if theirs is not None and theirs[1] > own[1]:
                pair = (name, theirs[0])
                upward.add(pair)
                where.setdefault(pair, f"{path.relative_to(SRC.parent)}:{line}")
    assert not unplaced, f"modules without a layer; add them to LAYERS: {sorted(unplaced)}"
    new = {f"{where[p]}: {p[0]} imports {p[1]}" for p in upward - KNOWN_UPWARD}
    assert not new, "upward imports:\n" + "\n".join(sorted(new))
    assert not KNOWN_UPWARD - upward, f"fixed, remove from KNOWN_UPWARD: {sorted(KNOWN_UPWARD - upward)}"
