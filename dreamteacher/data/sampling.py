"""Per-sample randomness from (seed, epoch, index) alone, and the sampler that feeds it: what makes a
pretraining run see the same data at every world size and resume to the same weights."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, DistributedSampler


class SeededSamples(Dataset):
    """Per-sample randomness drawn from (seed, epoch, index) alone: a sample's flip, its cached
    encoding and its diffusion noise are then the same whatever the number of processes, machines or
    loader workers, so runs at different world sizes (and resumes across them) see the same data.

    Indexed by `(index, epoch)` keys from `EpochKeySampler`; returns a dict batch element:
    `images`, and `features` (from the feature cache) or `noise_seed` (when `noise` is on: the seed
    of the sample's N(0, I) noise, see `seeded_noise`).
    """

    def __init__(self, dataset: Dataset, seed: int, noise: bool):
        self.dataset, self.seed, self.noise = dataset, seed, noise

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone, the one fork_rng restores: torch.manual_seed would also reseed
            # CUDA (left changed) and, where CUDA is not initialized, queue the call with a formatted
            # stack trace, about 1 ms a sample (6% of a cached cpu-small step)
            torch.default_generator.manual_seed((self.seed * 1_000_003 + epoch) * 1_000_000_007 + index)
            sample = self.dataset[index]
            if isinstance(sample, dict):  # several named tensors (e.g. two augmented views)
                item = dict(sample)
            else:
                item = {"images": sample[0], "features": sample[1]} if isinstance(sample, tuple) else {"images": sample}
            if self.noise:  # a seed, not the tensor: the noise is drawn where it is used (`seeded_noise`)
                item["noise_seed"] = torch.randint(2**62, ())
        return item


def seeded_noise(seeds: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """N(0, I) shaped like `like`, sample i drawn from its own `seeds[i]` on `like`'s device: on a GPU
    the noise never crosses the host-device link (64 images at 256x256 are 50 MB a step). `seeds`
    stays on the host (`PretrainMethod.transfer_batch_to_device`), so this launches without a sync."""
    noise = torch.empty(like.shape, device=like.device, dtype=torch.float32)
    generator = torch.Generator(device=like.device)
    for row, seed in zip(noise, seeds.tolist()):
        row.normal_(generator=generator.manual_seed(seed))
    return noise.to(like.dtype)


class EpochKeySampler(DistributedSampler):
    """DistributedSampler yielding `(index, epoch)`; one permutation per epoch for all world sizes, so
    with drop_last the processes' batches together are exactly the one-process batch.

    `resume_at = (epoch, samples)` starts that epoch `samples` further in: a run resumed mid-epoch goes
    on with the batches it had not trained yet, at any world size (see `ResumeMidEpoch`).
    """

    resume_at: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self.resume_at is not None and self.resume_at[0] != epoch:
            self.resume_at = None  # the resumed epoch is over

    def __iter__(self):
        indices = list(super().__iter__())
        if self.resume_at is not None and self.resume_at[0] == self.epoch:
            indices = indices[self.resume_at[1]:]
        return ((index, self.epoch) for index in indices)


def steps_per_epoch(num_images: int, global_batch: int) -> int:
    return max(1, num_images // global_batch)


