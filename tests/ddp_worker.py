"""A training run for the DDP equivalence tests, in float64: `torchrun ... tests/ddp_worker.py
CONFIG key=value ...` (or plain python for one process); its files go to output_dir (OUT).

It runs the real Trainer (tools/train.py's path) with every parameter in float64, so that two
valid computations differ only by float64 rounding (~1e-16 relative): a ReLU or max-pool input
would have to sit within that of its kink to flip a mask, and none does in practice, so the
runs can be compared far more tightly than any real mistake moves them. It writes, on rank 0:
  OUT/first_grads.pth  the gradients of the first step (already averaged over ranks)
  OUT/records.json     the loss normaliser of every step and samples_seen
and the trainer writes OUT/model_final.pth as usual.

PLANT (test-only mistakes the comparison must catch): "num_fg_not_averaged" (each rank
normalises by its own positive count), "rank1_gradient_dropped" (rank 1 contributes zeros).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retinanet.config import load_config  # noqa: E402
from retinanet.engine.trainer import Trainer  # noqa: E402


def _drop_rank1(state, bucket):
    import torch.distributed as dist
    grads = bucket.buffer()
    if dist.get_rank() == 1:
        grads.zero_()
    grads.div_(dist.get_world_size())
    return dist.all_reduce(grads, async_op=True).get_future().then(lambda fut: fut.value()[0])


def main() -> None:
    config = load_config(sys.argv[1], sys.argv[2:])
    out = Path(config.output_dir)
    torch.set_default_dtype(torch.float64)  # parameters and buffers are created in float64 ...
    trainer = Trainer(config, log=print)
    torch.set_default_dtype(torch.float32)  # ... and nothing else is (anchors, matching stay float32)
    assert trainer._params[0].dtype == torch.float64
    plant = os.environ.get("PLANT", "")
    reduce = trainer.criterion.reduce_num_fg
    if plant == "num_fg_not_averaged":
        reduce = (lambda num_fg: num_fg)
    elif plant == "rank1_gradient_dropped":
        trainer.network.register_comm_hook(None, _drop_rank1)
    elif plant:
        raise SystemExit(f"unknown PLANT {plant!r}")
    normalisers = []

    def recorded_reduce(num_fg):
        value = reduce(num_fg)
        normalisers.append(float(value))
        return value

    trainer.criterion.reduce_num_fg = recorded_reduce
    step = trainer.step

    def step_and_keep_first_grads(batch):
        result = step(batch)
        if trainer.iteration == 0 and trainer.dist.is_main:
            names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
            torch.save({n: p.grad.clone() for n, p in zip(names, trainer._params)}, out / "first_grads.pth")
        return result

    trainer.step = step_and_keep_first_grads
    trainer.train()
    if trainer.dist.is_main:
        (out / "records.json").write_text(json.dumps({
            "normalisers": normalisers, "samples_seen": trainer.samples_seen,
            "world_size": trainer.dist.world_size}))


if __name__ == "__main__":
    main()
