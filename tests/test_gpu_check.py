"""The GPU check script's CPU parts: ``benchmarks/gpu_check.sh OUT --dry-run`` runs every part on CPU shapes
and leaves their rows, so the script is known to work before a GPU is lent for its 15 minutes."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run(tmp_path):
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--dry-run"],
                         capture_output=True, text=True, timeout=900, env={"PYTHON": sys.executable,
                                                                            "PATH": "/usr/bin:/bin"})
    log = (tmp_path / "gpu_check.log").read_text()
    assert run.returncode == 0, log[-4000:]
    assert "all parts passed" in run.stdout
    kernels = [json.loads(line) for line in (tmp_path / "kernels.jsonl").read_text().splitlines()]
    assert kernels and all(r["status"] in ("pass", "unsupported") for r in kernels)
    assert any(r["status"] == "pass" and r["dtype"] == "bfloat16" for r in kernels)
    split = json.loads((tmp_path / "split.jsonl").read_text().splitlines()[0])
    assert split["ok"] and split["generate_equal"]
    model = json.loads((tmp_path / "model.jsonl").read_text().splitlines()[0])
    assert model["ratios"]["prefill_time"] > 0 and "group_size" in model["settings"]
    assert (tmp_path / "attention.jsonl").read_text().strip()
    paged = [json.loads(line) for line in (tmp_path / "paged.jsonl").read_text().splitlines()]
    assert {r["dtype"] for r in paged} == {"float32", "float16"} and all(r["status"] == "pass" for r in paged)
