"""The GPU check script's CPU parts: ``benchmarks/gpu_check.sh OUT --dry-run`` runs every part on CPU shapes
and leaves their rows, so the script is known to work before a GPU is lent for its 15 minutes; a spent
``--budget-s`` turns what a script did not reach into skipped rows and exit 0."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selfextend.backends import BACKENDS

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # each test runs a script in its own process


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def not_available(row: dict) -> bool:
    """A backend a script names but this tree does not register yet (``composed`` while it is built)."""
    name = row.get("backend", row.get("method"))
    return row.get("skipped") == "backend not available" and name not in BACKENDS


def test_gpu_check_dry_run(tmp_path):
    env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    if "PYTHONPATH" in os.environ:  # a venv that runs the project from source (the GPU machine's versions)
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--dry-run"],
                         capture_output=True, text=True, timeout=900, env=env)
    log = (tmp_path / "gpu_check.log").read_text()
    assert run.returncode == 0, log[-4000:]
    assert "all parts passed" in run.stdout
    kernels = rows(tmp_path / "kernels.jsonl")
    assert kernels and all(r["status"] in ("pass", "unsupported") or not_available(r) for r in kernels)
    assert any(r["status"] == "pass" and r["dtype"] == "bfloat16" for r in kernels)
    passed = {r["backend"] for r in kernels if r["status"] == "pass"}
    assert passed >= {"reference"} | ({"composed"} & set(BACKENDS))
    split = json.loads((tmp_path / "split.jsonl").read_text().splitlines()[0])
    assert split["ok"] and split["generate_equal"]
    model = json.loads((tmp_path / "model.jsonl").read_text().splitlines()[0])
    assert model["ratios"]["prefill_time"] > 0 and "group_size" in model["settings"]
    attention = rows(tmp_path / "attention.jsonl")
    assert {(r["mode"], r["batch"]) for r in attention if r["method"] == "sdpa" and r["status"] == "ok"} == {
        ("prefill", 1), ("decode", 1), ("decode", 4)}
    assert all(r["status"] == "ok" or r["status"].startswith("unsupported") or not_available(r)
               for r in attention)
    paged = rows(tmp_path / "paged.jsonl")
    assert {r["dtype"] for r in paged} == {"float32", "float16"} and all(r["status"] == "pass" for r in paged)
    timing = rows(tmp_path / "paged_timing.jsonl")  # issue 27's cells on CPU shapes, then transient memory
    assert [r["target"] for r in timing] == ["decode_batch", "prefill", "transient", "chunk", "decode_long",
                                             "transient"]
    assert all(r["status"] == "ok" for r in timing)
    assert all(r["gpu_batch_vs_sdpa"] > 0 for r in timing if r["target"] != "transient")
    assert all(r["gpu_batch_vs_paged_max_abs"] < 1e-4 for r in timing if r["case"] in ("prefill", "chunk"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    verdicts = {t["what"]: t["verdict"] for t in summary["targets"]}
    assert verdicts["correctness: reference vs fp64 oracle"] == "PASS"
    assert verdicts["correctness: layers on cuda:0 + CPU vs one device"] == "PASS"
    vllm = [t for t in summary["targets"] if t["what"].startswith("vLLM GPU path")]
    assert len(vllm) == 4 and all(t["verdict"] in ("PASS", "FAIL") for t in vllm)  # measured (CPU timings)
    assert "== summary of" in run.stdout and "targets" in run.stdout


def test_budget_spent_writes_skipped_rows(tmp_path):
    """No budget left: every case is a skipped row, nothing runs, and the part still succeeds."""
    out = tmp_path / "kernels.jsonl"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_kernels.py"), "--dry-run",
                          "--budget-s", "0", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    kernels = rows(out)
    assert kernels and all(r["skipped"] == "out of time" or not_available(r) for r in kernels)
    assert sum(r["skipped"] == "out of time" for r in kernels) == 16 * len({"reference", "composed", "cpu"}
                                                                            & set(BACKENDS))
