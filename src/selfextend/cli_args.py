"""The CLI's input checks: every flag is checked before a model loads, and a bad one is one line naming the
flag, the value and the fix (exit code 2), never a traceback or a silent default.

Each ``type=`` function here raises ``argparse.ArgumentTypeError`` with the fix; ``Parser`` prints argparse's
"argument --flag: message" as one ``error:`` line. Checks that involve several flags are ``check_*``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn


class HelpWithDefaults(argparse.HelpFormatter):
    """Appends ``(default: X)`` where the help text does not already state the default, and only for plain
    values (a parsed list such as the methods' specs reads worse than the help's own wording)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        plain = action.default not in (None, False, argparse.SUPPRESS) and not isinstance(action.default,
                                                                                          (list, tuple))
        return text + " (default: %(default)s)" if plain and "default" not in text else text


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and defaults shown in ``--help``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpWithDefaults)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _int(text: str, minimum: int, what: str = "") -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number{what}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} is below {minimum}{what}")
    return value


def positive_int(text: str) -> int:
    return _int(text, 1, "; use an integer >= 1")


def port(text: str) -> int:
    value = _int(text, 0, "; use a TCP port 1..65535 (0: any free port)")
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port; use 1..65535 (0: any free port)")
    return value


def non_negative_int(text: str) -> int:
    return _int(text, 0, "; use an integer >= 0")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number > 0")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} must lie in [0, 1] (0 = start of the text, 1 = end)")
    return value


def _comma_list(text: str, parse, what: str, example: str) -> list:
    """``parse`` applied to each item of a comma list; its ValueError becomes argparse's error."""
    try:
        values = [parse(item) for item in text.split(",") if item.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if not values:
        raise argparse.ArgumentTypeError(f"no {what} given; e.g. {example}")
    return values


def lengths(text: str) -> list[int]:
    from .eval.runner import parse_length

    return _comma_list(text, parse_length, "lengths", "4k,8k,16k")


def depths(text: str) -> list[float]:
    from .eval.runner import parse_depths

    try:
        return parse_depths(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def methods(text: str) -> list:
    from .eval.runner import parse_method

    return _comma_list(text, parse_method, "methods", "vanilla,self-extend")


def method(text: str):
    specs = methods(text)
    if len(specs) != 1:
        raise argparse.ArgumentTypeError(f"{text!r}: one method here, e.g. yarn or self-extend:G=4:W=1024")
    return specs[0]


def shard(text: str) -> tuple[int, int]:
    """``K/N`` with ``1 <= K <= N``."""
    k, slash, n = text.partition("/")
    try:
        k_, n_ = int(k), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not K/N (e.g. 1/4: the first of 4 shards)") from None
    if not slash or not 1 <= k_ <= n_:
        raise argparse.ArgumentTypeError(f"{text!r}: K/N needs 1 <= K <= N (e.g. 1/4 ... 4/4)")
    return k_, n_


def task_name(text: str) -> str:
    from .eval.tasks import TASKS

    try:
        TASKS.get(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def existing_file(name: str) -> Path:
    return _existing(name, Path.is_file, "file")


def directory(name: str) -> Path:
    return _existing(name, Path.is_dir, "directory")


def _existing(name: str, test, what: str) -> Path:
    path = Path(name)
    if not test(path):
        raise argparse.ArgumentTypeError(f"{name}: no such {what}")
    return path


@dataclass(frozen=True)
class Document:
    """A text file's name and content (``-``: standard input)."""

    name: str
    text: str


def text_file(name: str) -> Document:
    """A readable, UTF-8, non-empty text file, or ``-`` for standard input."""
    if name == "-":
        text = sys.stdin.read()
    else:
        path = Path(name)
        if not path.exists():
            raise argparse.ArgumentTypeError(f"{name}: no such file")
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"{name} is not a regular file; pass a text file "
                                             "(or - for stdin)")
        try:
            text = path.read_text(encoding="utf-8")
        except PermissionError:
            raise argparse.ArgumentTypeError(f"{name}: permission denied") from None
        except UnicodeDecodeError as err:
            raise argparse.ArgumentTypeError(f"{name} is not UTF-8 text (byte {err.start}); convert it "
                                             "first, e.g. iconv -t utf-8") from None
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{name} is empty; nothing to read")
    return Document(name, text)


def model_ref(name: str) -> str:
    """A local model directory (with config.json), a .gguf file, or a hub id already in the local cache."""
    from .models import check_model_ref

    try:
        return check_model_ref(name)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def out_dir(name: str) -> Path:
    """A directory that exists or can be created, and is writable."""
    path = Path(name).expanduser()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise argparse.ArgumentTypeError(f"{name}: {probe} is a file, so the folder cannot be created there; "
                                         "pick another --out")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{name}: {probe} is not writable; pick another --out")
    return path


def check_extension_flags(args: argparse.Namespace) -> None:
    """Flags that contradict each other in ``ask`` and ``serve``."""
    flags = (("-G", args.group_size), ("-W", args.window), ("--target-length", args.target_length))
    given = [f for f, v in flags if v is not None]
    if args.no_extend and given:
        raise ValueError(f"--no-extend runs the model as trained, so {', '.join(given)} would be ignored; "
                     "drop one or the other")
    if getattr(args, "method", None) and (args.group_size is not None or args.window is not None
                                          or args.no_extend):
        raise ValueError("--method takes the place of -G/-W/--no-extend; give one of them")


def check_serve_flags(args: argparse.Namespace) -> None:
    """``serve``: the extension flags, and the vLLM-only flags only with ``--engine vllm``."""
    check_extension_flags(args)
    if args.engine != "vllm":
        flags = (("--tensor-parallel-size", args.tensor_parallel_size > 1), ("--vllm-args", args.vllm_args),
                 ("--print-command", args.print_command))
        given = [f for f, v in flags if v]
        if given:
            verb = "apply" if len(given) > 1 else "applies"
            raise ValueError(f"{', '.join(given)} only {verb} with --engine vllm; add it or drop them")


def check_eval_flags(args: argparse.Namespace) -> None:
    """``--window``/``--stride`` belong to ``--mode sliding`` (and it needs both); ppl flags need ppl."""
    from .eval.tasks import TASKS

    sliding = [f for f, v in (("--window", args.window), ("--stride", args.stride)) if v is not None]
    if sliding and args.mode != "sliding":
        raise ValueError(f"{' and '.join(sliding)} only {'apply' if len(sliding) > 1 else 'applies'} with "
                         "--mode sliding; add it or drop them")
    if args.mode == "sliding" and len(sliding) != 2:
        raise ValueError("--mode sliding needs --window and --stride (e.g. --window 4096 --stride 2048)")
    if args.mode == "sliding" and args.stride > args.window:
        raise ValueError(f"--stride {args.stride} exceeds --window {args.window}: tokens would be skipped; "
                     "use a stride <= the window")
    if TASKS[args.task].kind != "ppl" and (sliding or args.mode != "single-pass"):
        raise ValueError(f"--mode/--window/--stride are perplexity options; task {args.task!r} is not ppl")
