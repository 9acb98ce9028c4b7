"""Windowing (one window per suite, never per label), slice sampling and its index map,
resizing, the cache, and mapping back."""

import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from common.config import DataConfig, WindowError
from data import preprocess
from data.dataset import VolumeDataset
from data.preprocess import (
    WindowMismatchWarning,
    prepare_arrays,
    prepare_volume,
    resize_slices,
    sample_indices,
    to_source_grid,
    window_to_uint8,
)
from data.volume import Volume, load_volume


def test_window_maps_low_to_0_and_high_to_255_and_truncates_as_medsam2():
    hu = np.array([-1000, -160, 40, 41, 239, 240, 3000])
    # MedSAM2: clip, (x - low) / (high - low) * 255, np.uint8 (truncation): 127.5 -> 127,
    # 128.1375 -> 128, 254.3625 -> 254.
    expected = np.uint8((np.clip(hu, -160, 240) + 160) / 400 * 255.0)
    assert expected.tolist() == [0, 0, 127, 128, 254, 255, 255]
    assert window_to_uint8(hu, -160, 240).tolist() == expected.tolist()


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
    assert len(cache_entries(tmp_path / "cache")) == 1
    ds2 = VolumeDataset(
        phantom_manifest, DataConfig(num_slices=8, slice_size=16, cache_dir=tmp_path / "cache")
    )
    ds2.by_id("ctorg_0000/liver")
    assert len(cache_entries(tmp_path / "cache")) == 2


def cache_entries(cache: Path) -> list[Path]:
    return [p for p in cache.iterdir() if p.name != preprocess.DIGEST_FOLDER]


def test_files_are_hashed_once_per_version_and_the_key_follows_their_content(
    phantom_manifest, tmp_path, monkeypatch
):
    """A cache hit reads no volume: the content digest is found by path, size and modification
    time (in this process, then in the cache folder for other processes); a file rewritten
    with new content gets a new digest and so a new entry."""
    import shutil

    src = phantom_manifest.parent
    data = tmp_path / "data"
    shutil.copytree(src, data)
    manifest = data / phantom_manifest.name
    cfg = DataConfig(num_slices=8, slice_size=32, cache_dir=tmp_path / "cache")
    reads = []
    real = preprocess._file_digest
    monkeypatch.setattr(preprocess, "_file_digest", lambda path: reads.append(path) or real(path))
    monkeypatch.setattr(preprocess, "_digests", {})
    ds = VolumeDataset(manifest, cfg)
    sample = ds.samples[0]
    first = ds.by_id(sample.id)[1]
    hashed = len(reads)
    assert {sample.image, sample.mask} <= set(reads) and len(set(reads)) == hashed  # once each
    for _ in range(3):
        ds.by_id(sample.id)
    monkeypatch.setattr(preprocess, "_digests", {})  # a new process: the cache folder knows
    VolumeDataset(manifest, cfg).by_id(sample.id)
    assert len(reads) == hashed
    # Rewritten in place with other content (a new modification time): hashed again, new entry.
    import nibabel as nib

    img = nib.load(sample.image)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 0 + 7, img.affine, img.header), sample.image)
    os.utime(sample.image, ns=(10**18, 10**18))
    entries = len(cache_entries(tmp_path / "cache"))
    changed = VolumeDataset(manifest, cfg).by_id(sample.id)[1]
    assert reads[hashed:] == [sample.image]
    assert len(cache_entries(tmp_path / "cache")) == entries + 1
    assert not np.array_equal(np.asarray(first.slices), np.asarray(changed.slices))


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
    assert cache_entries(tmp_path / "cache") == []  # no entry, no temporary folder
    monkeypatch.undo()
    _, prepared = ds.by_id(sample.id)
    assert prepared.mask.any()


def test_every_label_of_a_scan_sees_the_same_slices(phantom_manifest, tmp_path):
    # The picture must not tell which organ is asked for: liver, lungs and vertebrae of one case
    # are prepared byte for byte alike, with and without the cache.
    for cache in (None, tmp_path / "cache"):
        ds = VolumeDataset(
            phantom_manifest, DataConfig(num_slices=16, slice_size=64, cache_dir=cache)
        )
        ids = ["ctorg_0000/liver", "ctorg_0000/lungs", "ctorg_0000/vertebrae"]
        slices = [np.asarray(ds.by_id(i)[1].slices) for i in ids]
        masks = [np.asarray(ds.by_id(i)[1].mask) for i in ids]
        assert not np.array_equal(masks[0], masks[1])  # different targets...
        for other in slices[1:]:
            assert other.tobytes() == slices[0].tobytes()  # ...on the same picture


def test_the_window_is_the_suites_and_keys_the_cache(phantom_manifest, tmp_path):
    cache = tmp_path / "cache"
    plain = VolumeDataset(
        phantom_manifest, DataConfig(num_slices=8, slice_size=32, cache_dir=cache)
    )
    lung = VolumeDataset(
        phantom_manifest,
        DataConfig(num_slices=8, slice_size=32, cache_dir=cache, suite_windows={"ctorg": "lung"}),
    )
    a, b = plain.by_id("ctorg_0000/liver")[1], lung.by_id("ctorg_0000/liver")[1]
    assert not np.array_equal(a.slices, b.slices)  # a new window is a new cache entry
    assert len(list(cache.iterdir())) == 2
    other = next(s.id for s in plain.samples if s.suite != "ctorg")
    np.testing.assert_array_equal(plain.by_id(other)[1].slices, lung.by_id(other)[1].slices)
    assert lung.cfg.window_for("ctorg") == (-1350.0, 150.0)
    assert lung.cfg.window_for("kits23") == (-160.0, 240.0)


def test_window_presets_and_pairs_resolve_and_bad_ones_name_the_field():
    assert DataConfig().window_for("anything") == (-160.0, 240.0)
    assert DataConfig(window="unit").window_for("ctorg") == (0.0, 1.0)
    assert DataConfig(window=[-100, 300]).window_for("ctorg") == (-100.0, 300.0)
    with pytest.raises(WindowError, match=r"data\.window: unknown window preset 'abdomn'"):
        DataConfig(window="abdomn")
    with pytest.raises(WindowError, match=r"data\.suite_windows\.kits23: window \[240\.0, -160"):
        DataConfig(suite_windows={"kits23": [240, -160]})
    with pytest.raises(WindowError, match=r"data\.window: \[1\] is neither"):
        DataConfig(window=[1])


def test_a_yaml_window_loads_and_a_typo_fails_naming_it():
    from common.config import RunConfig, load_config

    cfg = load_config(RunConfig, "configs/paper.yaml", ["data.suite_windows={kits23: [-100, 200]}"])
    assert cfg.data.window_for("kits23") == (-100.0, 200.0)
    # M3D-Seg arrays read as approximate HU, for the abdominal window
    assert cfg.data.window_for("ctorg") == (-160.0, 240.0) and cfg.data.m3d_intensity == "hu"
    with pytest.raises(WindowError, match="data.window: unknown window preset 'lungs'"):
        load_config(RunConfig, "configs/tiny.yaml", ["data.window=lungs"])


def volume(array: np.ndarray, name: str) -> Volume:
    return Volume(Path(name), array, np.eye(4), np.eye(4))


def test_normalised_arrays_take_the_unit_window_like_any_other():
    # No per-volume min-max: the configured window is the one mapping, for .npy as for NIfTI.
    image = np.full((8, 16, 16), 0.25, np.float32)
    image[:, :, 8:] = 0.75
    prepared = prepare_arrays(volume(image, "image.npy"), None, [], (0.0, 1.0), 8, 16, "x")
    assert set(np.unique(prepared.slices).tolist()) == {63, 191}  # 63.75, 191.25 truncated


def test_a_window_that_does_not_fit_the_data_is_warned_about():
    normalised = np.random.default_rng(0).random((8, 16, 16)).astype(np.float32)
    with pytest.warns(WindowMismatchWarning, match=r"image\.npy: .*'unit'"):
        prepare_arrays(volume(normalised, "image.npy"), None, [], (-160.0, 240.0), 8, 16, "x")
    hu = np.full((8, 16, 16), -1000.0, np.float32)
    hu[:, 4:12, 4:12] = 40.0
    with pytest.warns(WindowMismatchWarning, match="ct.nii.gz"):
        prepare_arrays(volume(hu, "ct.nii.gz"), None, [], (0.0, 1.0), 8, 16, "x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_arrays(volume(hu, "ct.nii.gz"), None, [], (-160.0, 240.0), 8, 16, "x")
