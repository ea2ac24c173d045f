"""Time to the error message: how long `diffpress` takes to answer a wrong path, argument or recipe.

    python benchmarks/cli_latency.py --trees /path/to/old-checkout . [--repeats 5]
                                     [--out benchmarks/results/cli_latency.json]

Each tree is a diffpress source checkout (e.g. an older commit from `git worktree add`); each command runs
as `python -m diffpress.cli ...` with PYTHONPATH set to that tree, the trees interleaved (old, new, old,
new, ...) so machine noise hits both alike. Reports the median wall time and the message of each.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "missing model path": ["sample", "/no/such/model", "--out", "/tmp/diffpress-latency.png"],
    "bad argument": ["sample", "--num", "0", "--out", "/tmp/diffpress-latency.png"],
    "bad recipe key": ["run", "w8a8", "--set", "passes.0.weghts=int4"],
    "--help": ["--help"],
}


def run(tree: Path, argv: list[str]) -> tuple[float, int, str]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "diffpress.cli", *argv], capture_output=True, text=True, env=env,
                          cwd="/tmp")
    seconds = time.perf_counter() - t0
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return seconds, proc.returncode, lines[-1][:120] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", nargs="+", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cli_latency.json"))
    args = parser.parse_args()
    trees = [t.resolve() for t in args.trees]
    rows = []
    for name, argv in COMMANDS.items():
        times: dict[str, list[float]] = {str(t): [] for t in trees}
        answers = {}
        for _ in range(args.repeats):
            for tree in trees:
                seconds, code, last = run(tree, argv)
                times[str(tree)].append(seconds)
                answers[str(tree)] = {"exit_code": code, "last_line": last}
        row = {"command": name, "argv": argv,
               "median_s": {t: statistics.median(v) for t, v in times.items()}, "answers": answers}
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {"settings": {"trees": [str(t) for t in trees], "repeats": args.repeats, "machine": platform.machine(),
                           "processor": platform.processor(), "cpu_count": os.cpu_count()}, "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
