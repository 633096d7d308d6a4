"""jobs/finetune/sampler.py and the dataset's per-sample seeds: what makes a mid-epoch resume exact."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from jobs.finetune.data import CocoDetectionDataset, read_training_set
from jobs.finetune.engine import collate_detection_batch
from jobs.finetune.sampler import EpochSampler, SampleKey, epoch_order
from jobs.finetune.transforms import AugmentationConfig, train_transform
from jobs.synthetic_shapes import ShapesConfig, generate


def draw(size: int, world_size: int, epoch: int, start: int = 0, per_rank: int | None = None) -> list[list[int]]:
    """Each rank's indices from ``start`` (the first ``per_rank`` of them, or all)."""
    shards = []
    for rank in range(world_size):
        sampler = EpochSampler(size, rank, world_size, seed=7)
        sampler.set_epoch(epoch, start)
        shards.append([key.index for key in sampler][:per_rank])
    return shards


@pytest.mark.parametrize("size, world_size", [(12, 2), (11, 3), (5, 1)])
def test_each_sample_once_per_epoch_across_a_resume(size, world_size):
    drawn = draw(size, world_size, epoch=3, per_rank=2)
    position = 2 * world_size  # what the engine saves: samples per rank x ranks
    rest = draw(size, world_size, epoch=3, start=position)

    seen = Counter(i for shard in drawn + rest for i in shard)
    assert set(seen) == set(range(size))
    padding = -(-(size - position) // world_size) * world_size - (size - position)
    assert sum(seen.values()) == size + padding and max(seen.values()) <= 2
    assert len({len(shard) for shard in rest}) == 1, "every rank takes as many steps"
    # The first samples of the epoch's permutation were drawn before the checkpoint, the rest after it.
    assert sorted(i for shard in drawn for i in shard) == sorted(epoch_order(size, 7, 3)[:position].tolist())


def test_the_permutation_depends_on_seed_and_epoch_only():
    assert sorted(i for shard in draw(20, 4, epoch=1) for i in shard) == list(range(20))
    one = [i for shard in draw(20, 1, epoch=1) for i in shard]
    assert one == epoch_order(20, 7, 1).tolist()
    assert one != epoch_order(20, 7, 2).tolist() and one != epoch_order(20, 8, 1).tolist()
    # Another number of ranks resumes the same permutation from the same global position.
    assert sorted(i for shard in draw(20, 3, epoch=1, start=8) for i in shard)[:12] == sorted(one[8:])


def test_keys_carry_a_seed_of_the_sample_not_of_the_rank():
    keys = {}
    for world_size in (1, 2):
        for rank in range(world_size):
            sampler = EpochSampler(10, rank, world_size, seed=1)
            sampler.set_epoch(4)
            keys.update({(world_size, k.index): k.seed for k in sampler})
    assert all(keys[(1, i)] == keys[(2, i)] for i in range(10))
    assert len({keys[(1, i)] for i in range(10)}) == 10
    with pytest.raises(ValueError, match=r"start must lie in \[0, 10\], got 11"):
        EpochSampler(10, 0, 1, seed=1).set_epoch(0, 11)


def test_a_resumed_epoch_draws_the_same_augmentations_as_an_uninterrupted_one(tmp_path):
    generate(str(tmp_path), 10, seed=0, config=ShapesConfig(image_size=64, min_object_size=12, max_object_size=30))
    dataset = CocoDetectionDataset(
        str(tmp_path / "images"),
        read_training_set(str(tmp_path / "annotations.json")),
        train_transform(AugmentationConfig.scaled(48, 80, "detr")),  # flips, scales and crops
    )

    def run(start: int, loader_workers: int) -> dict[int, tuple]:
        sampler = EpochSampler(len(dataset), 0, 1, seed=3)
        sampler.set_epoch(2, start)
        loader = DataLoader(dataset, batch_size=3, sampler=sampler, num_workers=loader_workers, collate_fn=list)
        torch.manual_seed(start)  # the global RNG differs between the two runs; the draws must not
        return {t["image_id"]: (image, t["boxes"]) for batch in loader for image, t in batch}

    uninterrupted = run(0, loader_workers=2)
    resumed = run(4, loader_workers=0)  # other processes, other DataLoader worker seeds

    assert len(uninterrupted) == 10 and len(resumed) == 6
    shapes = {tuple(image.shape) for image, _ in uninterrupted.values()}
    assert len(shapes) > 1, "the augmentation changed image sizes: the comparison below means something"
    for image_id, (image, boxes) in resumed.items():
        assert torch.equal(image, uninterrupted[image_id][0]) and torch.equal(boxes, uninterrupted[image_id][1])
    # A different epoch draws differently.
    sampler = EpochSampler(len(dataset), 0, 1, seed=3)
    sampler.set_epoch(5)
    other = {dataset[k][1]["image_id"]: dataset[k][0] for k in sampler}
    assert any(not torch.equal(other[i], uninterrupted[i][0]) for i in other)  # torch.equal: False on shapes too


def test_unusable_images_are_left_out_of_the_batch_and_named(tmp_path):
    generate(str(tmp_path), 3, seed=0, config=ShapesConfig(image_size=32, min_object_size=8, max_object_size=16))
    first = sorted((tmp_path / "images").iterdir())[0]
    first.write_bytes(first.read_bytes()[:40])  # truncated
    dataset = CocoDetectionDataset(
        str(tmp_path / "images"), read_training_set(str(tmp_path / "annotations.json")), skip_bad_images=True
    )

    batch = collate_detection_batch([dataset[SampleKey(i, 0)] for i in range(3)])

    assert batch.samples == 3 and len(batch.targets) == 2 and batch.pixel_values.shape[0] == 2
    assert len(batch.skipped) == 1 and batch.skipped[0].index == 0
    assert batch.skipped[0].reason.startswith(f"{first}: not a decodable image")
    empty = collate_detection_batch([dataset[0]])
    assert empty.pixel_values is None and empty.samples == 1 and not empty.targets
