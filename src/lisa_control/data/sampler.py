"""A resumable, rank-aware order of the training data.

Epoch e visits ``randperm(n, seed + e)``; rank r of w takes every w-th index of each global batch,
so the global batch sequence does not depend on the number of processes. A run resumed at micro-
batch m continues exactly where an unbroken run would be.

The trainer hands datasets keys ``(epoch, index)`` (:meth:`ResumableBatchOrder.batch_keys`), so a
dataset can draw per-visit random choices (an empty prompt, which of several captions) afresh in
every epoch yet reproducibly: a resumed run sees the same keys, hence the same choices.
"""

from __future__ import annotations

import torch


class ResumableBatchOrder:
    def __init__(
        self, dataset_size: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ):
        self.dataset_size = dataset_size
        self.batch_size = batch_size  # per process
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = dataset_size // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the dataset has {dataset_size} items, fewer than one global batch of "
                f"{self.global_batch}; lower --train_batch_size or add data."
            )

    def batches(self, start_micro_batch: int = 0):
        """Yield (micro_batch_number, indices of this rank) forever from ``start_micro_batch``."""
        micro = start_micro_batch
        while True:
            epoch, offset = divmod(micro, self.batches_per_epoch)
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.dataset_size, generator=g).tolist()
            for b in range(offset, self.batches_per_epoch):
                chunk = order[b * self.global_batch : (b + 1) * self.global_batch]
                yield micro, chunk[self.rank :: self.world_size]
                micro += 1

    def batch_keys(self, start_micro_batch: int = 0):
        """Like :meth:`batches`, but yield only this rank's dataset keys ``(epoch, index)``."""
        for micro, indices in self.batches(start_micro_batch):
            epoch = micro // self.batches_per_epoch
            yield [(epoch, index) for index in indices]


def split_key(key) -> tuple[int, int]:
    """``(epoch, index)`` of a dataset key: a pair from :meth:`ResumableBatchOrder.batch_keys`,
    or a plain index, which reads the item as in epoch 0."""
    if isinstance(key, tuple):
        epoch, index = key
        return int(epoch), int(index)
    return 0, int(key)
