"""CUDA only: device time of the Triton focal-loss kernels against the memory floor, per launch
configuration, to tune or check the kernel in one GPU call.

    python scripts/focal_kernel_timing.py
    python scripts/focal_kernel_timing.py --configs 2048x8 1024x4 4096x8

At RetinaNet scale (2 x 76725 anchors x 80 classes, float32) it times, from CUDA graph replays
over four input sets (197 MB, so no set is still in L2): the forward kernel (reads the logits,
writes partial sums), the backward kernel (reads the logits, writes the gradient times
grad_output), and the whole autograd forward + backward as training runs it. Floors, from the
bandwidth of a 1 GiB device-to-device copy: one read of the logits for the forward, one read and
one write for the backward and for the whole (the target: within 2x of it). Instructions a logit
of the same kernels, without a GPU: scripts/kernel_report.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

from benchmark import copy_bandwidth, focal_inputs, graph_seconds  # noqa: E402
from retinanet.losses import focal_triton  # noqa: E402
from retinanet.losses.focal import sigmoid_focal_loss_with_classes  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=[f"{focal_triton._BLOCK}x{focal_triton._NUM_WARPS}"],
                        help="launch configurations BLOCKxWARPS (BLOCK a power of two)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if not (torch.cuda.is_available() and focal_triton.triton_focal_available(torch.device("cuda"))):
        print("needs a CUDA device and triton", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    sets = [(logits, classes, torch.empty_like(logits))
            for logits, classes in (focal_inputs(device, seed) for seed in range(4))]
    bandwidth = copy_bandwidth(device, args.repeats)
    read_s = sets[0][0].numel() * 4 / bandwidth
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth / 1e9:.0f} GB/s (read + write); floors: "
          f"read {read_s * 1e6:.1f} us, read + write {2 * read_s * 1e6:.1f} us")

    def per_set(fn) -> float:
        return graph_seconds(lambda: [fn(*s) for s in sets], args.repeats) / len(sets)

    scale = torch.ones((), device=device)

    def forward(x, c, grad):
        focal_triton.focal_loss_triton(x, None, c, None, None, 0.25, 2.0, 1.0, 0.0)

    def backward(x, c, grad):
        focal_triton.focal_loss_triton(x, None, c, None, grad, 0.25, 2.0, 1.0, 0.0,
                                       grad_scale=scale, need_loss=False)

    def autograd(x, c, grad):
        x.requires_grad_(True)
        sigmoid_focal_loss_with_classes(x, c, kernel="triton").backward()
        x.grad = None
        x.requires_grad_(False)

    print("| BLOCK x warps | forward us | backward us | autograd fwd+bwd us | forward / read | "
          "backward / read+write | autograd / read+write |")
    print("|---|---|---|---|---|---|---|")
    for config in args.configs:
        focal_triton._BLOCK, focal_triton._NUM_WARPS = (int(v) for v in config.split("x"))
        fwd, bwd, total = per_set(forward), per_set(backward), per_set(autograd)
        print(f"| {config} | {fwd * 1e6:.1f} | {bwd * 1e6:.1f} | {total * 1e6:.1f} | {fwd / read_s:.2f} | "
              f"{bwd / (2 * read_s):.2f} | {total / (2 * read_s):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
