"""Batching: pad images to a common size divisible by `size_divisibility` and stack them."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler


@dataclass
class Batch:
    images: Tensor  # (B, 3, H, W) normalised, zero-padded at the bottom/right
    boxes: list[Tensor]  # (n_i, 4) xyxy pixels of the resized image
    labels: list[Tensor]  # (n_i,) in 0..K-1
    image_ids: list[int]
    image_sizes: list[tuple[int, int]]  # (h, w) after resizing, before padding
    orig_sizes: list[tuple[int, int]]  # (h, w) of the file

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(self.images.to(device, non_blocking=non_blocking),
                     [b.to(device, non_blocking=non_blocking) for b in self.boxes],
                     [lab.to(device, non_blocking=non_blocking) for lab in self.labels],
                     self.image_ids, self.image_sizes, self.orig_sizes)


def pad_images(images: Sequence[Tensor], size_divisibility: int = 128) -> Tensor:
    """[(3, h_i, w_i)] -> (B, 3, H, W), H and W the maxima rounded up to size_divisibility.

    Padding to 128 (the P7 stride) keeps every level's grid exactly aligned with its stride.
    """
    height = max(img.shape[1] for img in images)
    width = max(img.shape[2] for img in images)
    if size_divisibility > 1:
        height = int(math.ceil(height / size_divisibility) * size_divisibility)
        width = int(math.ceil(width / size_divisibility) * size_divisibility)
    batch = images[0].new_zeros(len(images), images[0].shape[0], height, width)
    for out, img in zip(batch, images):
        out[:, : img.shape[1], : img.shape[2]].copy_(img)
    return batch


class Collate:
    """Picklable collate_fn for DataLoader workers: samples of `DetectionTransform` -> Batch."""

    def __init__(self, size_divisibility: int = 128):
        self.size_divisibility = size_divisibility

    def __call__(self, samples: Sequence[dict]) -> Batch:
        return Batch(images=pad_images([s["image"] for s in samples], self.size_divisibility),
                     boxes=[s["boxes"] for s in samples], labels=[s["labels"] for s in samples],
                     image_ids=[int(s["image_id"]) for s in samples],
                     image_sizes=[tuple(s["image_size"]) for s in samples],
                     orig_sizes=[tuple(s["orig_size"]) for s in samples])


class InfiniteSampler(Sampler[int]):
    """Endless shuffled indices, reshuffled every epoch from (seed, epoch); `start` skips indices
    already consumed so that a resumed run sees the same sequence."""

    def __init__(self, size: int, seed: int, start: int = 0):
        self.size, self.seed, self.start = size, seed, start

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.size)
        while True:
            generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
            yield from order[offset:]
            epoch, offset = epoch + 1, 0


def _seed_worker(worker_id: int) -> None:
    # torch gives each worker its own seed (from the loader's generator); numpy, random and the
    # albumentations pipeline (which has generators of its own) follow it, so workers differ and
    # runs repeat.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    _seed_transform(torch.utils.data.get_worker_info().dataset, seed)


def _seed_transform(dataset: Dataset, seed: int) -> None:
    transform = getattr(dataset, "transform", None)
    if hasattr(transform, "set_seed"):
        transform.set_seed(seed)


def build_train_loader(dataset: Dataset, *, batch_size: int, num_workers: int, seed: int,
                       size_divisibility: int, start_iter: int = 0) -> DataLoader:
    sampler = InfiniteSampler(len(dataset), seed, start=start_iter * batch_size)
    generator = torch.Generator().manual_seed(seed + start_iter)
    if num_workers == 0:
        _seed_transform(dataset, seed + start_iter)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=Collate(size_divisibility), worker_init_fn=_seed_worker,
                      generator=generator, persistent_workers=num_workers > 0, drop_last=True)


def build_test_loader(dataset: Dataset, *, batch_size: int, num_workers: int,
                      size_divisibility: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=Collate(size_divisibility))
