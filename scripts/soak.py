"""Soak test: trains the demo (configs/shapes_R18.yaml) for thousands of iterations with data
workers and checks that memory stays flat. Not part of the test suite (it runs for minutes).

    python scripts/soak.py                                   # 3000 iterations, the demo's batch and size
    python scripts/soak.py --iterations 2000 --batch-size 4 --sizes 64 80 96 --every 100
    OMP_NUM_THREADS=1 python scripts/soak.py ...             # on a machine shared with other jobs

Every --every iterations it records the resident memory of the training process and of its
DataLoader workers (RSS summed over them, and PSS, which counts pages shared after fork once).
After --warmup iterations the growth of the RSS sum above its first post-warm-up sample must stay
under --bound-mib; the classic leaks it watches for are a Python list in a Dataset copied into
every worker page by page (reference counts), the tensorboard writer's queue, and anchors cached
per input size (several --sizes, multi-scale training, exercise that cache). It writes its
figures to --output (docs/benchmarks/soak/shapes_R18.json) and exits 1 when the bound is exceeded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retinanet.config import load_config  # noqa: E402
from retinanet.data.shapes import generate_shapes_dataset, is_complete  # noqa: E402
from retinanet.engine.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _children(pid: int) -> list[int]:
    """Direct child processes of `pid` (the DataLoader workers of the training process)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _memory_mib(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of one process in MiB; PSS 0 where smaps_rollup is unreadable."""
    try:
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0.0, 0.0
    pss = next((int(line.split()[1]) * 1024 for line in rollup if line.startswith("Pss:")), 0)
    return rss / 2**20, pss / 2**20


def sample(iteration: int, start: float) -> dict:
    """Memory of this process and its workers now."""
    pids = [os.getpid(), *_children(os.getpid())]
    memory = [_memory_mib(pid) for pid in pids]
    return {"iteration": iteration, "elapsed_s": round(time.monotonic() - start, 1),
            "processes": len(pids), "rss_mib": round(sum(m[0] for m in memory), 1),
            "pss_mib": round(sum(m[1] for m in memory), 1),
            "main_rss_mib": round(memory[0][0], 1)}


def _slope_per_1000(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of (iteration, MiB), in MiB per 1000 iterations."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    return 1000 * sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else 0.0


def judge(samples: list[dict], warmup: int, bound_mib: float) -> dict:
    """Growth of the RSS sum after warm-up against the bound."""
    after = [s for s in samples if s["iteration"] >= warmup]
    if not after:
        raise SystemExit(f"no sample after the warm-up of {warmup} iterations: lower --warmup")
    base = after[0]
    return {"baseline_iteration": base["iteration"], "baseline_rss_mib": base["rss_mib"],
            "max_growth_rss_mib": round(max(s["rss_mib"] for s in after) - base["rss_mib"], 1),
            "final_growth_rss_mib": round(after[-1]["rss_mib"] - base["rss_mib"], 1),
            "max_growth_pss_mib": round(max(s["pss_mib"] for s in after) - base["pss_mib"], 1),
            "slope_rss_mib_per_1000_iters": round(_slope_per_1000(
                [(s["iteration"], s["rss_mib"]) for s in after]), 2),
            "bound_mib": bound_mib,
            "passed": max(s["rss_mib"] for s in after) - base["rss_mib"] <= bound_mib}


def _dataset(path: Path, scratch: Path) -> Path:
    if is_complete(path):
        return path
    print(f"{path} is not a complete shapes dataset: generating 400 training images in {scratch}")
    generate_shapes_dataset(scratch / "shapes", num_train=400, num_val=8, seed=0)
    return scratch / "shapes"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--every", type=int, default=100, help="sample memory every N iterations")
    parser.add_argument("--warmup", type=int, default=500, help="iterations before the baseline sample")
    parser.add_argument("--bound-mib", type=float, default=64.0,
                        help="allowed growth of the RSS sum after warm-up (MiB)")
    parser.add_argument("--workers", type=int, default=2, help="data.num_workers")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 112, 128],
                        help="training input sizes (data.min_size; several: multi-scale)")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "shapes",
                        help="shapes dataset (make data); generated in a temp folder when missing")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks" / "soak" / "shapes_R18.json",
                        help="where the figures go (a folder of its own: benchmarks/*.json are speed tables)")
    args = parser.parse_args()
    if args.every <= 0 or args.iterations < args.every:
        parser.error("--every must be positive and at most --iterations")

    with tempfile.TemporaryDirectory(prefix="soak_") as scratch:
        data = _dataset(args.data, Path(scratch))
        overrides = [f"data.train.images={data / 'train'}",
                     f"data.train.annotations={data / 'annotations' / 'instances_train.json'}",
                     "data.val.annotations=", f"output_dir={Path(scratch) / 'run'}", "train.device=cpu",
                     f"data.num_workers={args.workers}", f"train.batch_size={args.batch_size}",
                     f"train.max_iter={args.iterations}", "train.time_budget_s=0", f"train.log_period={args.every}",
                     f"train.checkpoint_period={max(args.iterations // 3, 1)}", "train.keep_checkpoints=1",
                     f"data.min_size=[{','.join(map(str, args.sizes))}]", f"data.max_size={max(args.sizes)}"]
        config = load_config(ROOT / "configs" / "shapes_R18.yaml", overrides)
        trainer = Trainer(config, log=lambda line: None)
        start = time.monotonic()
        samples = [sample(0, start)]
        step = trainer.step

        def step_and_sample(batch):
            result = step(batch)
            done = trainer.iteration + 1
            if done % args.every == 0:
                samples.append(sample(done, start))
                print(f"iter {done:6d}  RSS {samples[-1]['rss_mib']:8.1f} MiB  PSS {samples[-1]['pss_mib']:8.1f} "
                      f"MiB  processes {samples[-1]['processes']}  {samples[-1]['elapsed_s']:.0f} s", flush=True)
            return result

        trainer.step = step_and_sample
        trainer.train()
        wall = time.monotonic() - start

    verdict = judge(samples, args.warmup, args.bound_mib)
    report = {"script": "scripts/soak.py", "command": "python " + " ".join(sys.argv),
              "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPU(s), {platform.system()}", "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(),
              "config": "configs/shapes_R18.yaml", "iterations": args.iterations, "workers": args.workers,
              "batch_size": args.batch_size, "sizes": args.sizes, "warmup": args.warmup,
              "wall_s": round(wall, 1), **verdict, "samples": samples}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"after warm-up ({args.warmup} iterations): RSS sum grew by at most {verdict['max_growth_rss_mib']} MiB "
          f"(bound {args.bound_mib:g}), slope {verdict['slope_rss_mib_per_1000_iters']} MiB / 1000 iterations; "
          f"{'PASSED' if verdict['passed'] else 'FAILED'}; figures in {args.output}")
    return 0 if verdict["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
