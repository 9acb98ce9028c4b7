"""Windowing, slice sampling and its index map, resizing, the cache, and mapping back."""

import numpy as np
import pytest

from data import preprocess
from data.config import DataConfig
from data.dataset import VolumeDataset
from data.preprocess import (
    prepare_volume,
    resize_slices,
    sample_indices,
    to_source_grid,
    window_to_uint8,
)
from data.volume import load_volume


def test_window_maps_low_to_0_and_high_to_255():
    hu = np.array([-1000, -160, 40, 240, 3000])
    assert window_to_uint8(hu, -160, 240).tolist() == [0, 0, 128, 255, 255]


def test_slice_index_map_is_uniform_with_both_ends():
    assert sample_indices(127, 64).tolist()[:4] == [0, 2, 4, 6]
    assert sample_indices(127, 64)[-1] == 126
    assert sample_indices(10, 4).tolist() == [0, 3, 6, 9]
    assert sample_indices(3, 5).tolist() == [0, 0, 1, 2, 2]  # fewer slices repeat


def test_mask_resize_is_nearest_and_image_resize_is_smooth():
    mask = np.zeros((1, 4, 4), bool)
    mask[0, :2, :2] = True
    big = resize_slices(mask, 8, is_mask=True)
    assert big.dtype == bool and big[0, :4, :4].all() and not big[0, 4:, :].any()
    image = np.zeros((1, 4, 4), np.uint8)
    image[0, :, 2:] = 200
    smooth = resize_slices(image, 8, is_mask=False)
    assert set(np.unique(smooth)) - {0, 200}  # intermediate values at the edge


def test_prepared_sample_matches_the_source(phantom_manifest, tmp_path):
    cfg = DataConfig(num_slices=16, slice_size=64)
    ds = VolumeDataset(phantom_manifest, cfg)
    sample, prepared = ds.by_id("ctorg_0000/liver")
    image = load_volume(sample.image).array
    assert prepared.slices.shape == (16, 64, 64) and prepared.slices.dtype == np.uint8
    assert prepared.source_index.tolist() == sample_indices(image.shape[0], 16).tolist()
    assert prepared.source_shape == image.shape
    assert prepared.mask.any() and prepared.areas.shape == (16,)


def test_to_source_grid_restores_the_sampled_slices(phantom_manifest):
    cfg = DataConfig(num_slices=40, slice_size=96)  # same grid as the source: exact round trip
    ds = VolumeDataset(phantom_manifest, cfg)
    sample, prepared = ds.by_id("ctorg_0000/liver")
    labels = load_volume(sample.mask, "mask").array
    back = to_source_grid(np.asarray(prepared.mask), prepared)
    np.testing.assert_array_equal(back, labels == 1)


def test_cache_entry_is_memory_mapped_and_keyed_by_settings(phantom_manifest, tmp_path):
    cfg = DataConfig(num_slices=8, slice_size=32, cache_dir=tmp_path / "cache")
    ds = VolumeDataset(phantom_manifest, cfg)
    _, first = ds.by_id("ctorg_0000/liver")
    assert isinstance(first.slices, np.memmap)
    _, again = ds.by_id("ctorg_0000/liver")
    np.testing.assert_array_equal(first.slices, again.slices)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    ds2 = VolumeDataset(
        phantom_manifest, DataConfig(num_slices=8, slice_size=16, cache_dir=tmp_path / "cache")
    )
    ds2.by_id("ctorg_0000/liver")
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_a_failed_write_leaves_no_cache_entry(phantom_manifest, tmp_path, monkeypatch):
    cfg = DataConfig(num_slices=8, slice_size=32, cache_dir=tmp_path / "cache")
    ds = VolumeDataset(phantom_manifest, cfg)
    real_save = np.save

    def save_then_die(path, array):
        if str(path).endswith("mask.npy"):
            raise OSError("disk full")
        real_save(path, array)

    monkeypatch.setattr(preprocess.np, "save", save_then_die)
    sample = ds.samples[0]
    with pytest.raises(OSError, match="disk full"):
        prepare_volume(sample, ds.label_values(sample.id), cfg)
    assert list((tmp_path / "cache").iterdir()) == []  # no entry, no temporary folder
    monkeypatch.undo()
    _, prepared = ds.by_id(sample.id)
    assert prepared.mask.any()
