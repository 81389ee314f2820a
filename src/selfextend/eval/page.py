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

MARKER = re.compile(r"<!-- selfextend report (?P<args>[^\n]*?) -->\n(?P<body>.*?)<!-- /report -->", re.S)


def report_parts(text: str) -> list[str]:
    """``--only``: a comma list of report parts."""
    from .report import PARTS

    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"{text!r}: parts are {', '.join(PARTS)} (comma list)")
    return parts


def add_report_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of ``selfextend report`` (and of a page marker): one definition for both."""
    from ..cli_args import method_pair

    parser.add_argument("dir")
    parser.add_argument("--compare", type=method_pair, default=None,
                        help="A,B: two method labels on the same samples (paired): who alone was right, "
                             "sign test")
    parser.add_argument("--task", action="append", default=None,
                        help="only these tasks (default: every samples file)")
    parser.add_argument("--only", type=report_parts, default=None,
                        help="the parts to print, a comma list of table, buckets, vs-sliding, compare "
                             "(default: all)")


class _MarkerParser(argparse.ArgumentParser):
    def error(self, message: str):  # a bad marker is the page author's mistake: name it, no exit
        raise ValueError(message)


def _marker_parser() -> argparse.ArgumentParser:
    parser = _MarkerParser(prog="selfextend report", add_help=False)
    add_report_flags(parser)
    return parser


def render_block(args: str, root: Path) -> str:
    """The body a marker with these arguments must hold (the report's text, no plots, nothing written)."""
    from .report import render

    try:
        ns = _marker_parser().parse_args(shlex.split(args))
    except ValueError as err:
        raise ValueError(f"page marker 'selfextend report {args}': {err}") from None
    return render(root / ns.dir, ns.task, ns.compare, ns.only).rstrip("\n") + "\n"


def refresh(page: str | Path, root: str | Path = ".", check: bool = False) -> list[str]:
    """Re-render every report block of ``page``; returns the markers of the blocks that were stale. With
    ``check`` the page is left as it is (a CI check); else it is rewritten when anything changed."""
    path, base = Path(page), Path(root)
    text = path.read_text(encoding="utf-8")
    stale: list[str] = []

    def fill(match: re.Match) -> str:
        body = render_block(match["args"], base)
        if body != match["body"]:
            stale.append(f"selfextend report {match['args']}")
        return f"<!-- selfextend report {match['args']} -->\n{body}<!-- /report -->"

    new = MARKER.sub(fill, text)
    if stale and not check:
        path.write_text(new, encoding="utf-8")
    return stale
