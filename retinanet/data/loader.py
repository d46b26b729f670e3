"""Batching: pad images to a common size divisible by `size_divisibility` and stack them."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ..boxes import padded_size
from ..errors import ConfigError


@dataclass
class Batch:
    images: Tensor  # (B, 3, H, W) normalised, zero-padded at the bottom/right
    boxes: list[Tensor]  # (n_i, 4) xyxy pixels of the resized image
    labels: list[Tensor]  # (n_i,) in 0..K-1
    image_ids: list[int]
    image_sizes: list[tuple[int, int]]  # (h, w) after resizing, before padding
    orig_sizes: list[tuple[int, int]]  # (h, w) of the file
    # (image id, file) of unreadable images left out of this batch (evaluation with
    # data.skip_bad_images: see CocoDetection); the batch may then hold no image at all
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(self.images.to(device, non_blocking=non_blocking),
                     [b.to(device, non_blocking=non_blocking) for b in self.boxes],
                     [lab.to(device, non_blocking=non_blocking) for lab in self.labels],
                     self.image_ids, self.image_sizes, self.orig_sizes, self.skipped)


def pad_images(images: Sequence[Tensor], size_divisibility: int = 128) -> Tensor:
    """[(3, h_i, w_i)] -> (B, 3, H, W): the largest h_i and w_i, padded_size() to size_divisibility."""
    height, width = padded_size(max(img.shape[1] for img in images), max(img.shape[2] for img in images),
                                size_divisibility)
    batch = images[0].new_zeros(len(images), images[0].shape[0], height, width)
    for out, img in zip(batch, images):
        out[:, : img.shape[1], : img.shape[2]].copy_(img)
    return batch


class Collate:
    """Picklable collate_fn for DataLoader workers: samples of `DetectionTransform` -> Batch.
    Stubs of unreadable images (dict(image_id, unreadable=path)) go to Batch.skipped."""

    def __init__(self, size_divisibility: int = 128):
        self.size_divisibility = size_divisibility

    def __call__(self, samples: Sequence[dict]) -> Batch:
        skipped = [(int(s["image_id"]), s["unreadable"]) for s in samples if "unreadable" in s]
        samples = [s for s in samples if "unreadable" not in s]
        side = max(self.size_divisibility, 1)
        images = (pad_images([s["image"] for s in samples], self.size_divisibility) if samples
                  else torch.zeros(0, 3, side, side))
        return Batch(images=images,
                     boxes=[s["boxes"] for s in samples], labels=[s["labels"] for s in samples],
                     image_ids=[int(s["image_id"]) for s in samples],
                     image_sizes=[tuple(s["image_size"]) for s in samples],
                     orig_sizes=[tuple(s["orig_size"]) for s in samples], skipped=skipped)


class InfiniteSampler(Sampler[tuple[int, int]]):
    """Endless (dataset index, stream position) pairs from one global stream: indices reshuffled
    every epoch from (seed, epoch); positions count samples from the start of training. `start`
    skips the positions already consumed, so that a resumed run sees the same sequence.

    Under distributed training global batch i is positions [i*W*b, (i+1)*W*b) for W ranks of
    batch b; rank r takes its b-long slice r, so W ranks x batch b see exactly the images (and
    augmentations) that 1 process x batch W*b sees.

    With `group_ids` (one per dataset index, e.g. landscape 0 / portrait 1: aspect-ratio
    grouping) the shuffled order is regrouped so that each global batch holds one group only,
    which saves the padding of mixing orientations; a group's leftovers wait for the next epoch.
    """

    def __init__(self, size: int, seed: int, start: int = 0, *, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1, group_ids: Sequence[int] | None = None):
        if group_ids is not None and len(group_ids) != size:
            raise ValueError(f"need one group id per sample ({size}), got {len(group_ids)}")
        self.size, self.seed, self.start = size, seed, start
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.group_ids = list(group_ids) if group_ids is not None else None

    def _epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def _stream(self) -> Iterator[int]:
        """Dataset indices in stream order, from position `start`."""
        if self.group_ids is None:
            epoch, offset = divmod(self.start, self.size)
            while True:
                yield from self._epoch_order(epoch)[offset:]
                epoch, offset = epoch + 1, 0
        # Grouped: the buckets carry over epochs, so the stream is replayed from position 0 to
        # reach `start` (a second or so for a COCO-length schedule).
        global_batch = self.batch_size * self.world_size
        buckets: dict[int, list[int]] = {}
        position, epoch = 0, 0
        while True:
            for index in self._epoch_order(epoch):
                bucket = buckets.setdefault(self.group_ids[index], [])
                bucket.append(index)
                if len(bucket) == global_batch:
                    for grouped in bucket:
                        if position >= self.start:
                            yield grouped
                        position += 1
                    bucket.clear()
            epoch += 1

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in enumerate(self._stream(), start=self.start):
            if (position // self.batch_size) % self.world_size == self.rank:
                yield index, position


class StreamSeededDataset(Dataset):
    """dataset[(index, position)] -> dataset[index] with its augmentation seeded from
    (seed, position): the sample at a given point of the training stream is augmented the same
    way whichever worker loads it, however many workers there are, and after a resume."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, position = key
        transform = getattr(self.dataset, "transform", None)
        if hasattr(transform, "set_seed"):
            # albumentations keeps its own generators: np.random / random seeds do not reach them
            transform.set_seed((self.seed * 1_000_003 + position) % 2**32)
        return self.dataset[index]


def build_train_loader(dataset: Dataset, *, batch_size: int, num_workers: int, seed: int,
                       size_divisibility: int, start_position: int = 0, rank: int = 0,
                       world_size: int = 1, group_ids: Sequence[int] | None = None) -> DataLoader:
    """Batches of `batch_size` (per rank) from an endless shuffled stream, starting
    `start_position` samples in (a resumed run's samples_seen, over all ranks); a sample at a
    given position is the same image, augmented the same way, in every run."""
    if start_position % (batch_size * world_size):
        raise ConfigError(f"stream position {start_position} is not a whole number of global "
                          f"batches of {world_size} x {batch_size}: resume with the batch size "
                          "(train.batch_size) and number of processes the checkpoint was trained with")
    sampler = InfiniteSampler(len(dataset), seed, start=start_position, rank=rank,
                              world_size=world_size, batch_size=batch_size, group_ids=group_ids)
    return DataLoader(StreamSeededDataset(dataset, seed), batch_size=batch_size, sampler=sampler,
                      num_workers=num_workers, collate_fn=Collate(size_divisibility),
                      worker_init_fn=_seed_worker, persistent_workers=num_workers > 0,
                      drop_last=True)


def _seed_worker(worker_id: int) -> None:
    # numpy and random in each worker follow torch's per-worker seed, for any randomness outside
    # the (separately seeded) augmentation pipeline.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_test_loader(dataset: Dataset, *, batch_size: int, num_workers: int,
                      size_divisibility: int, rank: int = 0, world_size: int = 1) -> DataLoader:
    """The dataset in order; under distributed evaluation rank r gets images r, r + W, ..."""
    shard = dataset if world_size == 1 else Subset(dataset, range(rank, len(dataset), world_size))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=Collate(size_divisibility))
