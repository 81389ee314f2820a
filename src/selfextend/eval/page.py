"""Result tables on a markdown page, kept equal to what ``selfextend report`` prints from the results files.

A block on the page is the output of the command in its opening marker::

    <!-- selfextend report docs/results/passkey_n10 --task passkey --only table -->
    | passkey | 8192 | 16384 |
    ...
    <!-- /report -->

``selfextend page docs/results.md`` re-renders every block from the samples files (paths relative to the
repository root, where the command runs); ``--check`` changes nothing and fails on a stale block. The test
suite runs the check on ``docs/results.md``, so a number typed by hand into a block, or samples committed
without re-rendering the page, fail CI.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

from .report import add_report_flags, render

OPENER = re.compile(r"<!-- selfextend report (?P<args>.*\S) -->")
CLOSER = "<!-- /report -->"


class _MarkerParser(argparse.ArgumentParser):
    def error(self, message: str):  # a bad marker is the page author's mistake: name it, no exit
        raise ValueError(message)


def _marker_parser() -> argparse.ArgumentParser:
    parser = _MarkerParser(prog="selfextend report", add_help=False)
    add_report_flags(parser)
    return parser


def render_block(args: str, root: Path) -> str:
    """The body a marker with these arguments must hold (the report's text, no plots, nothing written)."""
    try:
        ns = _marker_parser().parse_args(shlex.split(args))
        return render(root / ns.dir, ns.task, ns.compare, ns.only).rstrip("\n") + "\n"
    except ValueError as err:
        raise ValueError(f"page marker 'selfextend report {args}': {err}") from None


def blocks(text: str) -> list[tuple[str, str]]:
    """``(args, body)`` of every block, in order; a marker that is malformed, unclosed, nested or a closing
    tag without an opening one is an error naming its line (a loose match would eat the text between two
    blocks)."""
    found: list[tuple[str, str]] = []
    args, body, opened_at = None, [], 0
    for number, line in enumerate(text.split("\n"), 1):
        opener = OPENER.fullmatch(line)
        if line.startswith("<!-- selfextend report") and not opener:
            raise ValueError(f"line {number}: a report marker must be the whole line "
                             f"'<!-- selfextend report DIR [flags] -->', got {line!r}")
        if opener and args is not None:
            raise ValueError(f"line {number}: a report marker inside the block opened on line {opened_at}; "
                             f"close that one with {CLOSER} first")
        if opener:
            args, body, opened_at = opener["args"], [], number
        elif line == CLOSER:
            if args is None:
                raise ValueError(f"line {number}: {CLOSER} without a report marker before it")
            found.append((args, "".join(f"{b}\n" for b in body)))
            args = None
        elif args is not None:
            body.append(line)
    if args is not None:
        raise ValueError(f"line {opened_at}: the report marker is never closed; add {CLOSER} after its table")
    return found


def refresh(page: str | Path, root: str | Path = ".", check: bool = False) -> list[str]:
    """Re-render every report block of ``page``; returns the markers of the blocks that were stale. With
    ``check`` the page is left as it is (a CI check); else it is rewritten when anything changed."""
    path, base = Path(page), Path(root)
    text = path.read_text(encoding="utf-8")
    stale: list[str] = []
    out: list[str] = []
    rest = text
    for args, body in blocks(text):
        head = f"<!-- selfextend report {args} -->\n"
        before, _, rest = rest.partition(head + body + CLOSER)
        new = render_block(args, base)
        if new != body:
            stale.append(f"selfextend report {args}")
        out.append(before + head + new + CLOSER)
    if stale and not check:
        path.write_text("".join(out) + rest, encoding="utf-8")
    return stale
