"""Machine instructions per logit of the Triton focal-loss kernel, on a machine without a GPU.

    python scripts/kernel_report.py            # H100 (sm_90)
    python scripts/kernel_report.py --arch 80  # A100

On an H100 the kernel measured as bound by instruction issue rather than memory (the figures,
with their machine and date, are on the docs' Benchmarks page). Instructions a logit are
therefore the figure to lower when changing the kernel, and this script reads them from the
compiled code (triton's bundled ptxas and cuobjdump), so a CPU machine can compare versions
before a GPU measures them.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retinanet.losses import focal_triton  # noqa: E402

VARIANTS = {  # name: compile_kernel switches
    "forward (loss)": {},
    "backward (gradient x grad_output)": {"write_grad": True, "grad_scale": True, "write_loss": False},
    "loss + gradient in one pass": {"write_grad": True},
}


def sass(cubin: bytes) -> tuple[list[str], str]:
    """(instruction lines, resource usage) of a cubin, through triton's bundled cuobjdump."""
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        listing = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    instructions = [line for line in listing.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/\s+\S", line)]
    return instructions, usage


def opcode(line: str) -> str:
    body = re.sub(r"^\s+/\*[0-9a-f]{4}\*/\s+(@!?U?P\w+\s+)?", "", line)
    return body.split()[0].split(".")[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10")
    parser.add_argument("--num-classes", type=int, default=80)
    args = parser.parse_args()
    per_thread = focal_triton._BLOCK // (32 * focal_triton._NUM_WARPS)  # logits a thread handles
    print(f"sm_{args.arch}, {args.num_classes} classes, {per_thread} logits a thread "
          f"(BLOCK {focal_triton._BLOCK}, {focal_triton._NUM_WARPS} warps)")
    for name, switches in VARIANTS.items():
        kernel = focal_triton.compile_kernel(args.arch, num_classes=args.num_classes, **switches)
        instructions, usage = sass(kernel.asm["cubin"])
        ops = collections.Counter(opcode(line) for line in instructions)
        registers = re.search(r"REG:(\d+)", usage)
        spills = re.search(r"STACK:(\d+)", usage)
        print(f"{name:36s} {len(instructions) / per_thread:5.1f} instructions a logit "
              f"({ops['MUFU'] / per_thread:.1f} special-function), "
              f"{registers.group(1) if registers else '?'} registers, stack {spills.group(1) if spills else '?'} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
