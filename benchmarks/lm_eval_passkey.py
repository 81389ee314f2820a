"""docs/results.md's passkey cells at 16k, reproduced through lm-evaluation-harness.

    .venv/bin/python benchmarks/lm_eval_passkey.py --methods vanilla,self-extend,dca,yarn

For each method, one process runs

    selfextend lm-eval --model selfextend \\
      --model_args method=M,target_length=16384,dtype=bfloat16,threads=2 \\
      --include_path benchmarks/lm_eval_tasks --tasks selfextend_passkey_16k --output_path OUT/M --log_samples

(the embedded model, bf16 and 2 threads as on docs/results.md; the authors' rule, not a local ``tune``), and
the table sets its score beside the committed ``selfextend eval`` rows of docs/results/passkey at 16384, with
how many of the five answers are the same text and lm-eval's evaluation seconds per sample. A method whose
results are already in OUT is not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASK = "selfextend_passkey_16k"
LENGTH = 16384


def run(method: str, out: Path, threads: int) -> None:
    if any(out.rglob("results_*.json")):
        return
    env = {**os.environ, "SELFEXTEND_TUNED": "/tmp/selfextend-results-no-tuned.json", "TQDM_DISABLE": "1"}
    command = [str(Path(sys.executable).parent / "selfextend"), "lm-eval", "--model", "selfextend",
               "--model_args", f"method={method},target_length={LENGTH},dtype=bfloat16,threads={threads}",
               "--include_path", "benchmarks/lm_eval_tasks", "--tasks", TASK, "--output_path", str(out),
               "--log_samples"]
    print("$ " + " ".join(command), file=sys.stderr)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    print(f"{method}: {time.perf_counter() - start:.0f} s", file=sys.stderr)


def table(methods: list[str], out: Path) -> str:
    committed = [json.loads(line) for line in
                 (ROOT / "docs/results/passkey/samples_passkey.jsonl").read_text().splitlines()]
    lines = ["| method | lm-eval (`selfextend lm-eval`) | docs/results.md (`selfextend eval`) | same answers "
             "| s / sample |", "|---|---:|---:|---:|---:|"]
    for method in methods:
        folder = out / method
        results = next(folder.rglob("results_*.json"), None)
        if results is None:
            lines.append(f"| {method} | - | | | |")
            continue
        samples = [json.loads(line) for line in next(folder.rglob(f"samples_{TASK}_*.jsonl")).read_text()
                   .splitlines()]
        ours = {r["depth"]: r for r in committed if r["method"] == method and r["length"] == LENGTH}
        right = sum(s["score"] for s in samples)
        theirs = [ours[s["doc"]["depth"]] for s in samples if s["doc"]["depth"] in ours]
        same = sum(s["resps"][0][0] == ours[s["doc"]["depth"]]["prediction"] for s in samples
                   if s["doc"]["depth"] in ours)
        seconds = float(json.loads(results.read_text())["total_evaluation_time_seconds"]) / len(samples)
        was = sum(r["score"] for r in theirs)
        lines.append(f"| {method} | {right / len(samples):.2f} ({right:g}/{len(samples)}) | "
                     + (f"{was / len(theirs):.2f} ({was:g}/{len(theirs)})" if theirs else "-")
                     + f" | {same}/{len(theirs)} | {seconds:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="vanilla,self-extend,dca,yarn")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/lm_eval_passkey_16k")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table-only", action="store_true", help="render the table from what OUT holds")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if not args.table_only:
        for method in methods:
            run(method, args.out / method, args.threads)
    done = sorted(p.name for p in args.out.iterdir() if p.is_dir())  # earlier runs' methods too
    text = table([*methods, *(m for m in done if m not in methods)], args.out)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
