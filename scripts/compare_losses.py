"""Train the shapes demo once per classification loss, same budget and schedule, and tabulate AP.

    python scripts/compare_losses.py                       # every variant, 300 iterations each
    python scripts/compare_losses.py --iters 1000 --variants focal ghm
    python scripts/compare_losses.py train.batch_size=8    # extra config overrides for every run

Writes <out>/losses.md (a markdown table of mAP / AP50 / AP75 / APs / APm and the final losses)
and one run folder per variant under <out>. A variant whose loss turns non-finite is reported as
such, not dropped.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retinanet.config import load_config  # noqa: E402
from retinanet.engine.trainer import Trainer  # noqa: E402

# name -> (config overrides, what the table says about it)
VARIANTS = {
    "focal": ([], "sigmoid focal, alpha 0.25, gamma 2 (default)"),
    "bce": (["loss.cls.type=bce", "loss.cls.alpha=0.75"], "alpha-balanced BCE (gamma 0), alpha 0.75"),
    "ghm": (["loss.cls.type=ghm"], "GHM-C, 30 bins, momentum 0.75"),
    "focal_ls": (["loss.cls.label_smoothing=0.1"], "focal + label smoothing 0.1"),
    "ohem": (["loss.cls.type=ohem"], "OHEM on BCE, 3 negatives per positive"),
    "softmax_focal": (["loss.cls.type=softmax_focal"], "softmax focal over K+1, alpha 0.25, gamma 2"),
    "focal_cb": (["loss.cls.class_balance_beta=0.999"], "focal + class-balanced weights, beta 0.999"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/shapes_R18.yaml")
    parser.add_argument("--iters", type=int, default=300, help="training iterations per variant")
    parser.add_argument("--out", default="runs/compare_losses")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()

    out = Path(args.out)
    rows = []
    for name in args.variants:
        overrides, description = VARIANTS[name]
        cfg = load_config(args.config, [*args.overrides, *overrides, f"train.max_iter={args.iters}", "train.time_budget_s=0",
                                        f"output_dir={out / name}", "eval.num_vis_images=0",
                                        f"train.checkpoint_period={args.iters}"])
        logs: list[str] = []
        start = time.perf_counter()
        try:
            result = Trainer(cfg, log=logs.append).train()
            metrics, status = result["metrics"], "ok"
        except FloatingPointError as error:
            metrics, status = None, f"non-finite loss: {error}"
        seconds = time.perf_counter() - start
        last = next((line for line in reversed(logs) if line.startswith("iter")), "")
        rows.append((name, description, metrics, status, seconds, last))
        ap = f"{metrics['AP']:.3f}" if metrics else "-"
        print(f"{name:<14} AP {ap}  {status}  {seconds:.0f} s  | {last}", flush=True)

    table = [f"Classification losses on the shapes demo: `python scripts/compare_losses.py --iters "
             f"{args.iters}` ({args.config}, {args.iters} iterations each, same schedule; "
             f"{platform.processor() or platform.machine()}, CPU)", "",
             "| loss | setting | mAP | AP50 | AP75 | APs | APm | time | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, description, metrics, status, seconds, _ in rows:
        cells = [f"{metrics[k]:.3f}" for k in ("AP", "AP50", "AP75", "APs", "APm")] if metrics \
            else ["-"] * 5
        table.append(f"| `{name}` | {description} | " + " | ".join(cells) +
                     f" | {seconds / 60:.1f} min | {status} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "losses.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(f"wrote {out / 'losses.md'}")
    return 0 if all(row[3] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
