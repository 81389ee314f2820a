"""The results page's tables are the report of the committed samples files, re-rendered, never typed."""

import json
from pathlib import Path

import pytest

from selfextend.cli import main
from selfextend.eval.page import blocks, refresh

ROOT = Path(__file__).resolve().parents[1]


def write_samples(out: Path, scores: dict[str, list[float]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "samples_passkey.jsonl", "w") as f:
        for method, values in scores.items():
            for i, score in enumerate(values):
                f.write(json.dumps({"task": "passkey", "method": method, "length": 16384, "depth": 0.5,
                                    "sample": i, "score": score, "prompt_tokens": 16000, "seconds": 1.0})
                        + "\n")


PAGE = """# Results

<!-- selfextend report res --task passkey --only table -->
| typed by hand |
<!-- /report -->

Prose between blocks stays.

<!-- selfextend report res --task passkey --compare a,b --only compare -->
<!-- /report -->
"""


def test_page_blocks_are_rerendered_and_checked(tmp_path, capsys):
    write_samples(tmp_path / "res", {"a": [1, 1, 1, 1, 0], "b": [1, 0, 0, 0, 0]})
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    assert len(refresh(page, tmp_path, check=True)) == 2 and page.read_text() == PAGE  # check changes nothing
    assert main(["page", str(page), "--root", str(tmp_path), "--check"]) == 1
    assert "stale: selfextend report res --task passkey --only table" in capsys.readouterr().out
    assert main(["page", str(page), "--root", str(tmp_path)]) == 0
    text = page.read_text()
    assert "typed by hand" not in text and "Prose between blocks stays." in text
    assert "| a | 0.80 (4/5) [0.38-0.96] |" in text and "| 16384 | 5 | 0.80 | 0.20 | 3 | 0 | 0.25 |" in text
    assert refresh(page, tmp_path, check=True) == []  # now current
    write_samples(tmp_path / "res", {"a": [1, 1, 1, 1, 1], "b": [1, 0, 0, 0, 0]})  # a new sample lands
    assert refresh(page, tmp_path, check=True) == ["selfextend report res --task passkey --only table",
                                                   "selfextend report res --task passkey --compare a,b "
                                                   "--only compare"]


@pytest.mark.parametrize("marker, message", [
    ("res --only tabel", "parts are table, buckets"),
    ("res --compare a", "give two different method labels"),
    ("res --only compare", "--only compare needs --compare A,B"),
    ("nowhere", "marker 'selfextend report nowhere': .*not a directory of results"),
])
def test_bad_page_markers_are_named(tmp_path, marker, message):
    write_samples(tmp_path / "res", {"a": [1.0]})
    page = tmp_path / "page.md"
    page.write_text(f"<!-- selfextend report {marker} -->\n<!-- /report -->\n")
    with pytest.raises(ValueError, match=message):
        refresh(page, tmp_path, check=True)


OPEN, CLOSE = "<!-- selfextend report res -->", "<!-- /report -->"


@pytest.mark.parametrize("text, message", [
    (f"{OPEN}\n| old |\nprose a loose match would eat\n{OPEN}\n{CLOSE}\n",
     "line 4: a report marker inside the block opened on line 1"),
    (f"text\n{OPEN}\n| old |\n", "line 2: the report marker is never closed"),
    (f"{CLOSE}\n", "line 1: <!-- /report --> without a report marker"),
    (f"{OPEN} \n{CLOSE}\n", "line 1: a report marker must be the whole line"),
])
def test_broken_blocks_are_refused_not_rewritten(tmp_path, text, message):
    write_samples(tmp_path / "res", {"a": [1.0]})
    page = tmp_path / "page.md"
    page.write_text(text)
    for check in (True, False):
        with pytest.raises(ValueError, match=message):
            refresh(page, tmp_path, check=check)
    assert page.read_text() == text


def test_results_page_matches_the_committed_samples():
    """Every table block of docs/results.md equals `selfextend report` of the files in docs/results/."""
    page = ROOT / "docs" / "results.md"
    assert len(blocks(page.read_text())) >= 10  # the page's tables sit in blocks (a check of none passes)
    assert refresh(page, ROOT, check=True) == [], "run `selfextend page docs/results.md` and commit it"
