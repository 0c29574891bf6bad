"""Aspect-ratio buckets: SDXL's sizes, nearest bucket, minimal crops, and carrying them to another resolution."""

import pytest

from ml.dataset.buckets import bucket_sizes, nearest_bucket, place, rescale


def test_the_standard_sdxl_sizes_at_1024():
    assert bucket_sizes(1024, 64) == [(1024, 1024), (896, 1152), (1152, 896), (832, 1216), (1216, 832),
                                      (768, 1344), (1344, 768), (640, 1536), (1536, 640)]
    assert bucket_sizes(1024) == bucket_sizes(1024, 64)  # every side already a multiple of 32


@pytest.mark.parametrize(("width", "height", "bucket"), [
    (1920, 1080, (768, 1344)),  # 16:9 storyboard frame
    (1024, 768, (896, 1152)),  # 4:3
    (800, 800, (1024, 1024)),  # 1:1
    (1080, 1920, (1344, 768)),  # 9:16 portrait
    (3000, 1000, (640, 1536)),  # 3:1 panorama: the widest bucket
])
def test_nearest_bucket_by_aspect_ratio(width, height, bucket):
    assert nearest_bucket(height, width, bucket_sizes(1024)) == bucket


def test_scaled_buckets_keep_their_shapes_and_multiples():
    sizes = bucket_sizes(512, 32)
    assert (384, 672) in sizes and (512, 512) in sizes
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in sizes)
    assert len(bucket_sizes(64, 8)) < 9  # rounding merges near-identical shapes at tiny resolutions
    with pytest.raises(ValueError, match="resolution"):
        bucket_sizes(0)


def test_a_16_9_frame_is_resized_to_cover_its_bucket_and_cropped_minimally():
    placement = place((1080, 1920), (768, 1344))
    assert placement.resized == (768, 1365)
    assert placement.crop == (0, 10)  # 21 surplus pixels, 10 cut on the left and 11 on the right
    assert placement.time_ids() == [1080, 1920, 0, 10, 768, 1344]
    mirrored = placement.mirrored()
    assert mirrored.crop == (0, 11)  # the right-hand overhang becomes the left one
    assert mirrored.mirrored() == placement


def test_an_exact_fit_is_not_cropped():
    assert place((768, 1344), (768, 1344)).crop == (0, 0)
    assert place((1536, 2688), (768, 1344)).crop == (0, 0)


def test_rescaling_a_placement_to_a_smaller_bucket_scales_the_crop():
    recorded = place((1080, 1920), (768, 1344))
    smaller = rescale(recorded, (384, 672))
    assert smaller.bucket == (384, 672)
    assert smaller.original_size == (1080, 1920)
    assert smaller.crop == (0, 5)  # the recorded 10-pixel crop at half the size
    assert smaller.resized[1] >= smaller.crop[1] + 672
