"""The CPU input path of ``fit``: one DataLoader for the whole run, its workers kept across epochs.

Spawning loader workers every epoch costs seconds on each; with ``persistent_workers`` they stay, so the epoch's
randomness cannot come from reseeding the workers. Instead :class:`EpochSampler` hands out ``(index, seed)``
pairs: the order is the epoch's sampler's, and every batch carries its own seed, derived from (run seed, epoch,
rank, batch). :class:`SeededSamples` reseeds the dataset's pipeline when the seed changes (once per batch; reseeding
an albumentations pipeline costs about half a millisecond), so the augmentation of a batch depends on (seed, epoch,
batch) only: not on the number of workers, nor on which worker drew it, and a resumed run draws what an
uninterrupted one drew.
"""

from __future__ import annotations

from torch.utils.data import DataLoader, Dataset, Sampler

from fusionnet.data.datasets import LabelledData


class SeededSamples(Dataset):
    """``dataset[(i, seed)]`` = ``dataset[i]`` with the pipeline reseeded to ``seed`` when it changes."""

    def __init__(self, data: LabelledData) -> None:
        self.data, self.current = data, None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: tuple[int, int]):
        i, seed = item
        if seed != self.current:
            self.data.seed(seed)
            self.current = seed
        return self.data[i]


class EpochSampler(Sampler):
    """The current epoch's sampler (set with :meth:`start`), its indices paired with per-batch seeds."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size, self.inner, self.seed = batch_size, None, 0

    def start(self, inner: Sampler, seed: int) -> None:
        self.inner, self.seed = inner, seed

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        for k, i in enumerate(self.inner):
            yield int(i), self.seed * 100_003 + k // self.batch_size


def training_loader(data: LabelledData, batch_size: int, *, num_workers: int, pin_memory: bool,
                    drop_last: bool) -> tuple[DataLoader, EpochSampler]:
    """(the run's DataLoader, its sampler: call ``sampler.start(epoch_sampler, seed)`` before each epoch)."""
    sampler = EpochSampler(batch_size)
    loader = DataLoader(SeededSamples(data), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=pin_memory, drop_last=drop_last, persistent_workers=num_workers > 0)
    return loader, sampler
