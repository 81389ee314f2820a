"""``selfextend serve``: an OpenAI-compatible HTTP server for a model with a context-extension method applied.

* ``engine.py``: one model answering one request at a time (prefix-cached prefill, sampling, stop strings);
* ``prefix_cache.py``: KV caches kept between requests, by longest common token prefix, LRU in bytes;
* ``app.py``: the routes (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``, ``/health``), errors
  in OpenAI's shape, the bounded request queue and its worker thread.

FastAPI and uvicorn are the ``serve`` extra: ``pip install 'selfextend-llm[serve]'``; nothing here is imported
by ``import selfextend``.
"""

from __future__ import annotations

INSTALL = "pip install 'selfextend-llm[serve]'"


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
