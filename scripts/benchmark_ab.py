"""Our side of benchmark.py's cases at two commits, run alternately on this machine: does a
change slow anything down?

    python scripts/benchmark_ab.py --base e225a46                      # post, focal, match, step, infer
    python scripts/benchmark_ab.py --base HEAD~3 --cases post@0.0 --rounds 3

The base commit is checked out into a temporary git worktree; each round runs every case once
on the base tree and once on the working tree, each in its own process (so each imports its own
`retinanet`), with benchmark.py's case builders of that tree. Prints the best time of each side
over its rounds (min of `--repeats` calls per round) and new / base: above 1 is slower.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ["post@0.0", "post@0.05", "focal", "focal@eager", "match", "match@eager", "step", "infer"]

# Runs in a child process whose PYTHONPATH puts one tree's retinanet first.
_CHILD = r"""
import importlib.util, json, sys, time, torch
tree, repeats, cases = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
spec = importlib.util.spec_from_file_location("bench", f"{tree}/scripts/benchmark.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
import retinanet
assert retinanet.__file__.startswith(tree), retinanet.__file__
cpu = torch.device("cpu")
build = {"post@0.0": lambda: bench._post("ours", cpu, 0.0), "post@0.05": lambda: bench._post("ours", cpu, 0.05),
         "focal": lambda: bench._focal("ours", cpu), "focal@eager": lambda: bench._focal("ours", cpu, "eager"),
         "match": lambda: bench._match("ours", cpu), "match@eager": lambda: bench._match("ours", cpu, "eager"),
         "step": lambda: bench._step("ours", cpu), "infer": lambda: bench._infer("ours", cpu)}
result = {}
for case in cases:
    fn = build[case]()
    fn()  # warm-up: compilation, allocator, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    result[case] = 1000 * min(times)
print(json.dumps(result))
"""


def run_tree(tree: Path, cases: list[str], repeats: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tree), str(repeats), *cases], env=env,
                         cwd=tree, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="commit to compare the working tree against")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=CASES)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of base and new")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case and round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), args.base], cwd=ROOT, check=True)
        try:
            best: dict[str, dict[str, float]] = {"base": {}, "new": {}}
            for _ in range(args.rounds):
                for side, tree in (("base", base), ("new", ROOT)):
                    for case, ms in run_tree(tree, args.cases, args.repeats).items():
                        best[side][case] = min(ms, best[side].get(case, float("inf")))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    print(f"{'case':12} {'base ms':>10} {'new ms':>10} {'new/base':>9}   (base {args.base}, {os.cpu_count()} CPUs)")
    for case in args.cases:
        old, new = best["base"][case], best["new"][case]
        print(f"{case:12} {old:10.1f} {new:10.1f} {new / old:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
