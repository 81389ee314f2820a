"""``selfextend lm-eval ARGS...``: lm-eval's own command line, with the ``selfextend`` model registered.

Arguments are lm-eval's (``lm-eval run --help``), parsed by lm-eval itself. Before anything loads, a
``--model selfextend`` run checks its ``--model_args`` (method, parameters, the reach from the model config
alone) and the reach against the tasks we wrote (``tasks.needs``): a bad argument is one error naming it.
Hubs stay out of reach: ``HF_HUB_OFFLINE`` and ``HF_DATASETS_OFFLINE`` default to 1 (set them to 0 to let
lm-eval download an upstream task's data).
"""

from __future__ import annotations

import logging
import os
import sys
from argparse import Namespace

from . import MODEL, register, require
from .settings import model_config, parse_model_args, past_reach, reach
from .tasks import needs

logger = logging.getLogger("selfextend")


def run(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    require()
    from lm_eval._cli.harness import HarnessCLI
    from lm_eval.utils import setup_logging

    register()
    setup_logging()
    cli = HarnessCLI()
    argv_before, sys.argv = sys.argv, ["lm-eval", *argv]  # HarnessCLI reads sys.argv (and inserts `run`)
    try:
        args = cli.parse_args()
    finally:
        sys.argv = argv_before
    check(args)
    cli.execute(args)
    return 0


def check(args: Namespace) -> None:
    """``--model selfextend``: the model arguments and the reach against our tasks, before any model loads."""
    if getattr(args, "model", None) != MODEL:
        return
    settings = parse_model_args(args.model_args or {})
    try:
        resolved, length = reach(settings, model_config(settings.pretrained))
    except (TypeError, ValueError) as err:
        raise ValueError(f"--model_args: {err}") from None
    paths = args.include_path or []
    paths = paths.split(os.pathsep) if isinstance(paths, str) else list(paths)
    tasks = [t for t in (args.tasks or []) if isinstance(t, str)]
    longest = sorted(needs(paths, tasks).items(), key=lambda item: item[1])
    if not longest or longest[-1][1] <= length:
        return
    task, needed = longest[-1]
    if settings.policy == "error":
        raise ValueError("--model_args: " + past_reach(settings, resolved, length, needed, f"task {task}"))
    logger.warning("selfextend: task %s needs %d tokens, past the %d that %s reads: %s", task, needed, length,
                   settings.method, "read whole (overflow=warn)" if settings.policy == "warn" else "cut")
