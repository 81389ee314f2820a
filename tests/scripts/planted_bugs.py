"""Plant known off-by-one bugs, one at a time, in a copy of the tree; report the first test file that fails.

    python tests/scripts/planted_bugs.py            # every plant, the default file order
    python tests/scripts/planted_bugs.py --only grouped-query-position

A suite that lets one of these through cannot be trusted to guard the math. Each plant is a one-token edit of
the real code (the copy is under a temporary folder: the working tree is never touched); the test files run
in the order below (cheap, pure ones first) with ``-x``, and the first failing file and test are printed.
A plant that no file catches exits 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# (name, file, exact text, planted text): each text occurs exactly once in its file
PLANTS = [
    ("grouped-query-position", "src/selfextend/positions.py",
     "rounding_mode=\"floor\") + (window - window // group_size)",
     "rounding_mode=\"floor\") + (window - window // group_size) + 1"),
    ("neighbor-<=-window", "src/selfextend/backends/composed.py",
     "band = (dist >= 0) & (dist < window)", "band = (dist >= 0) & (dist <= window)"),
    ("grouped-key-delta", "src/selfextend/integrations/hf/grouped_cache.py",
     "grouped_key_positions(pos, group_size) - pos", "grouped_key_positions(pos, group_size) - pos + 1"),
    ("hf-query-delta", "src/selfextend/integrations/hf/attention.py",
     "lambda: maps[name](pos) - pos)", "lambda: maps[name](pos) - pos + 1)"),
    ("vllm-paged-delta", "src/selfextend/integrations/vllm/paged.py",
     "RotationTable(lambda p, to=to: to(p) - p, inv_freq)",
     "RotationTable(lambda p, to=to: to(p) - p + 1, inv_freq)"),
]

FILES = ["tests/test_positions.py", "tests/test_rope.py", "tests/test_backends.py", "tests/test_oracle.py",
         "tests/test_composed.py", "tests/test_paged.py", "tests/test_methods.py", "tests/test_cache.py",
         "tests/test_families.py"]


def run_plant(name: str, path: str, old: str, new: str, files: list[str]) -> tuple[str, str] | None:
    """The first (file, failing test) under this plant, or None when every file passes."""
    with tempfile.TemporaryDirectory(prefix=f"plant-{name}-") as tmp:
        for part in ("src", "tests"):
            shutil.copytree(ROOT / part, Path(tmp) / part,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        shutil.copy(ROOT / "pyproject.toml", tmp)
        target = Path(tmp) / path
        text = target.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"plant {name}: {old!r} occurs {text.count(old)} times in {path}, not once")
        target.write_text(text.replace(old, new))
        env = {**os.environ, "PYTHONPATH": str(Path(tmp) / "src")}
        for file in files:
            command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", file]
            done = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True)
            if done.returncode == 1:
                failed = next((line.split(" ")[1] for line in done.stdout.splitlines()
                               if line.startswith("FAILED ")), "?")
                return file, failed
            if done.returncode not in (0, 5):
                raise SystemExit(f"plant {name}: pytest {file} exited {done.returncode}:\n"
                                 f"{done.stdout[-2000:]}")
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run this plant only")
    parser.add_argument("--files", help="comma-separated test files, in order (default: the list above)")
    args = parser.parse_args()
    files = args.files.split(",") if args.files else FILES
    missed = 0
    for name, path, old, new in PLANTS:
        if args.only and name != args.only:
            continue
        caught = run_plant(name, path, old, new, files)
        missed += caught is None
        print(f"{name:<24} {'NOT CAUGHT' if caught is None else f'caught by {caught[0]}: {caught[1]}'}",
              flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
