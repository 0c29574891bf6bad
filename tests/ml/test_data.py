import json
from collections import Counter

import pytest
import torch

from ml.contract.container import JobError
from ml.contract.hyperparameters import parse
from ml.dataset.imagefolder import flipped, load_imagefolder, preprocess, split_validation
from ml.train.stream import micro_batch, micro_batches_per_epoch, total_steps


def test_imagefolder_reads_captions_from_the_chosen_column(dataset):
    examples = load_imagefolder(dataset)
    assert len(examples) == 10 and all(e.caption.startswith("storyboard frame") for e in examples)
    with pytest.raises(JobError, match="line 1 has no caption column 'prompt'"):
        load_imagefolder(dataset, caption_column="prompt")


def test_metadata_naming_a_missing_image_is_refused(tmp_path, dataset):
    for image in list(dataset.glob("*.png"))[:2]:
        (tmp_path / image.name).write_bytes(image.read_bytes())
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    with pytest.raises(JobError, match="names gone.png, which is missing"):
        load_imagefolder(tmp_path)


def test_validation_split_is_the_same_whatever_the_order(dataset):
    examples = load_imagefolder(dataset)
    train, held = split_validation(examples, 0.3)
    train_again, held_again = split_validation(list(reversed(examples)), 0.3)
    assert len(held) == 3 and len(train) == 7
    assert {e.path for e in held} == {e.path for e in held_again}
    with pytest.raises(JobError, match="leaves no training images"):
        split_validation(examples[:1], 0.5)


def test_preprocess_keeps_sdxl_size_conditioning(dataset):
    path = next(dataset.glob("*.png"))  # 128 x 72 frames
    prepared = preprocess(path, 32, center_crop=True, generator=torch.Generator().manual_seed(0))
    assert prepared.pixels.shape == (3, 32, 32)
    assert -1.0 <= float(prepared.pixels.min()) and float(prepared.pixels.max()) <= 1.0
    assert prepared.original_size == (72, 128)
    assert prepared.crop_top_left == (0, (57 - 32) // 2)
    mirror = flipped(prepared, 32)
    assert torch.equal(mirror.pixels, prepared.pixels.flip(-1))
    assert mirror.crop_top_left == (0, 57 - 12 - 32)


def test_an_unreadable_image_is_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(JobError, match="cannot read image broken.png"):
        preprocess(bad, 32, True, torch.Generator())


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("groups", [(0,) * 10, (0, 1, 0, 2, 1, 0, 0, 1, 2, 0)], ids=["one bucket", "three buckets"])
def test_every_image_once_per_epoch_and_no_batch_mixes_buckets(world, groups):
    hp = parse({"train_batch_size": "3", "seed": "5", "random_flip": "true"})
    per_epoch = micro_batches_per_epoch(hp, groups, world)
    for epoch in range(2):
        seen = Counter()
        for rank in range(world):
            for index in range(epoch * per_epoch, (epoch + 1) * per_epoch):
                batch = micro_batch(hp, index, groups, rank, world)
                assert len({groups[i] for i, _ in batch}) == 1
                assert len(batch) <= 3
                seen.update(i for i, _ in batch)
        assert set(seen) == set(range(len(groups)))
        batches = sum(-(-list(groups).count(g) // 3) for g in set(groups))
        assert per_epoch == -(-batches // world)  # ranks get equal counts, the short ones padded


def test_epochs_reshuffle_and_the_order_is_a_function_of_the_seed():
    hp = parse({"train_batch_size": "10", "seed": "5"})
    groups = (0,) * 10
    first, second = micro_batch(hp, 0, groups, 0, 1), micro_batch(hp, 1, groups, 0, 1)
    assert first != second
    assert micro_batch(parse({"train_batch_size": "10", "seed": "5"}), 1, groups, 0, 1) == second


def test_step_count_from_epochs():
    hp = parse({"num_train_epochs": "58", "train_batch_size": "1", "gradient_accumulation_steps": "4"})
    assert total_steps(hp, (0,) * 100, 1) == 58 * 25
    assert total_steps(parse({"max_train_steps": "1500", "num_train_epochs": "58"}), (0,) * 100, 1) == 1500
    # Batches do not cross buckets: 5 + 5 images in batches of 2 make 6 batches, not 5.
    assert total_steps(parse({"num_train_epochs": "1", "train_batch_size": "2"}), (0,) * 5 + (1,) * 5, 1) == 6
