"""``selfextend serve``: an OpenAI-compatible HTTP server for a model with a context-extension method applied.

* ``engine.py``: one model answering one request at a time (prefix-cached prefill, sampling, stop strings);
* ``prefix_cache.py``: KV caches kept between requests, by longest common token prefix, LRU in bytes;
* ``app.py``: the routes (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``, ``/health``), errors
  in OpenAI's shape, the bounded request queue and its worker thread;
* ``server.py``: the listening socket, uvicorn, and Ctrl-C (the running request's grace, a second Ctrl-C).

FastAPI and uvicorn are the ``serve`` extra: ``pip install 'selfextend-llm[serve]'``; nothing here is imported
by ``import selfextend``.
"""

from __future__ import annotations

import argparse

INSTALL = "pip install 'selfextend-llm[serve]'"
PREFILL_CHUNK = 512  # default prompt tokens per prefill step: how soon a client that left or Ctrl-C stops it


def api_key(text: str) -> str:
    """``--api-key``: refused when clients could never send it (empty, blank, edge spaces, not ASCII)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the key is empty, so every /v1 request would be refused (401); "
                                         "give a non-empty key, or leave --api-key out to serve without one")
    if text != text.strip() or not all(" " <= c <= "~" for c in text):
        raise argparse.ArgumentTypeError("use printable ASCII without leading or trailing spaces: clients "
                                         "send the key in an HTTP header ('Authorization: Bearer KEY')")
    return text


def require() -> None:
    """Fail early, with the install command, when the server's dependencies are missing."""
    missing = []
    for module in ("fastapi", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"`selfextend serve` needs {' and '.join(missing)}: {INSTALL}")
