"""The working-size cache on real shared images: hits equal a fresh decode, nothing stale, corrupt
entries rebuilt, pre-warming from a manifest with skipped files reported."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from covidcxr import paths
from covidcxr.cli import app
from covidcxr.data import WorkingSizeCache, read_xray
from covidcxr.data.cache import warm_manifest
from covidcxr.data.preprocess import to_working_size
from covidcxr.errors import ImageReadError

QUANTUM = 0.5 / 65535 + 1e-7  # the cache stores uint16: a hit may differ from float32 by half a step


@pytest.fixture
def images(data_root, tmp_path) -> dict[str, Path]:
    """Copies of real shared files (so tests may change them): a 512 px JPEG, a 2721 px original, a DICOM."""
    picks = {"jpeg": "images/nih/pneumonia/00000499_008.jpg",
             "large": "originals/NORMAL2-IM-1302-0001.jpeg",
             "dicom": "dicom/RG1_J2KI.dcm"}
    out = {}
    for key, rel in picks.items():
        out[key] = tmp_path / "src" / Path(rel).name
        out[key].parent.mkdir(exist_ok=True)
        shutil.copyfile(data_root / rel, out[key])
    return out


def test_default_root_is_the_isolated_cache_dir():
    assert WorkingSizeCache().root == paths.cache_dir() / "working-size"
    assert "covidcxr-cache" in str(paths.cache_dir())  # conftest's autouse isolation is in effect


@pytest.mark.parametrize("key", ["jpeg", "large", "dicom"])
def test_hit_equals_fresh_decode_and_resize(images, tmp_path, key):
    cache = WorkingSizeCache(tmp_path / "cache", working_size=256)
    fresh = to_working_size(read_xray(images[key]).pixels, 256)
    first = cache.load_xray(images[key])
    second = cache.load_xray(images[key])
    assert first.meta["cache"] == "built" and second.meta["cache"] == "hit"
    assert cache.stats.built == 1 and cache.stats.hits == 1
    assert max(first.pixels.shape) == 256 and first.pixels.dtype == np.float32
    assert first.pixels.shape == fresh.shape
    np.testing.assert_allclose(first.pixels, fresh, atol=QUANTUM, rtol=0)
    assert np.array_equal(first.pixels, second.pixels)
    # The reader's meta survives the round trip (DICOM fields, original size).
    assert second.meta["original_shape"] == read_xray(images[key]).meta["original_shape"]
    assert second.meta["format"] == first.meta["format"]
    # A new cache object (another process) finds the entry on disk.
    again = WorkingSizeCache(tmp_path / "cache", working_size=256)
    assert np.array_equal(again.load(images[key]), first.pixels) and again.stats.hits == 1


def test_small_images_are_not_enlarged(images, tmp_path):
    cache = WorkingSizeCache(tmp_path / "cache", working_size=1024)
    assert cache.load(images["jpeg"]).shape == read_xray(images["jpeg"]).pixels.shape == (512, 512)


def test_changed_file_is_not_served_stale(images, data_root, tmp_path):
    cache = WorkingSizeCache(tmp_path / "cache", working_size=128)
    path = images["jpeg"]
    before = cache.load(path)
    stat = path.stat()
    # Same path, same SIZE, other content (another patient's JPEG, zero-padded after its end marker),
    # and the mtime put back as `cp -p` / rsync would: only the content and ctime differ.
    other = next(p.read_bytes() for p in sorted((data_root / "images/nih/normal").glob("*.jpg"))
                 if p.stat().st_size < stat.st_size)
    path.write_bytes(other + b"\0" * (stat.st_size - len(other)))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    after = cache.load(path)
    fresh = to_working_size(read_xray(path).pixels, 128)
    assert not np.allclose(after, before, atol=0.05)
    np.testing.assert_allclose(after, fresh, atol=QUANTUM, rtol=0)
    # A fresh cache object (no in-memory memo) must not be fooled by the on-disk index either.
    assert np.allclose(WorkingSizeCache(tmp_path / "cache", 128).load(path), fresh, atol=QUANTUM)


def test_unchanged_file_is_not_rehashed(images, tmp_path):
    cache = WorkingSizeCache(tmp_path / "cache", working_size=128)
    cache.load(images["large"])
    other = WorkingSizeCache(tmp_path / "cache", working_size=128)
    for _ in range(3):
        other.load(images["large"])
    assert other.stats.hashed == 0 and other.stats.hits == 3


def test_working_size_is_part_of_the_key(images, tmp_path):
    small = WorkingSizeCache(tmp_path / "cache", working_size=128)
    large = WorkingSizeCache(tmp_path / "cache", working_size=384)
    digest = small.content_hash(images["large"])
    assert small.entry_path(digest) != large.entry_path(digest)
    a, b = small.load(images["large"]), large.load(images["large"])
    assert max(a.shape) == 128 and max(b.shape) == 384
    assert large.stats.built == 1  # not served the 128 px entry


def test_identical_content_under_two_names_shares_one_entry(images, tmp_path):
    cache = WorkingSizeCache(tmp_path / "cache", working_size=128)
    copy = tmp_path / "copy_of_it.jpeg"
    shutil.copyfile(images["jpeg"], copy)
    cache.load(images["jpeg"])
    cache.load(copy)
    assert cache.stats.built == 1 and cache.stats.hits == 1


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "garbage", "empty"])
def test_corrupt_entry_is_detected_and_rebuilt(images, tmp_path, damage):
    cache = WorkingSizeCache(tmp_path / "cache", working_size=128)
    good = cache.load(images["jpeg"])
    entry = cache.entry_path(cache.content_hash(images["jpeg"]))
    blob = bytearray(entry.read_bytes())
    if damage == "flip_byte":
        blob[-1000] ^= 0xFF  # one pixel's worth of bit rot inside the array
    elif damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "garbage":
        blob = bytearray(os.urandom(len(blob)))
    else:
        blob = bytearray()
    entry.write_bytes(bytes(blob))
    fresh_cache = WorkingSizeCache(tmp_path / "cache", working_size=128)
    xray = fresh_cache.load_xray(images["jpeg"])
    assert xray.meta["cache"] == "rebuilt" and fresh_cache.stats.rebuilt_corrupt == 1
    assert np.array_equal(xray.pixels, good)
    assert WorkingSizeCache(tmp_path / "cache", working_size=128).ensure(images["jpeg"]) == "hit"


def test_entry_of_another_key_is_not_served(images, tmp_path):
    cache = WorkingSizeCache(tmp_path / "cache", working_size=128)
    cache.load(images["jpeg"])
    cache.load(images["large"])
    jpeg_entry = cache.entry_path(cache.content_hash(images["jpeg"]))
    large_entry = cache.entry_path(cache.content_hash(images["large"]))
    shutil.copyfile(large_entry, jpeg_entry)  # a valid entry, but for other content
    fresh = WorkingSizeCache(tmp_path / "cache", working_size=128)
    assert fresh.ensure(images["jpeg"]) == "rebuilt"


def test_unreadable_files_raise_and_are_not_cached(tmp_path):
    cache = WorkingSizeCache(tmp_path / "cache", working_size=128)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    for _ in range(2):
        with pytest.raises(ImageReadError, match="text file"):
            cache.load(bad)
    with pytest.raises(ImageReadError, match="file not found"):
        cache.load(tmp_path / "missing.jpg")
    assert cache.stats.errors == 3 and not list((tmp_path / "cache").rglob("*.cxr"))


def test_cache_pickles_for_spawned_dataloader_workers(images, tmp_path):
    import pickle

    cache = WorkingSizeCache(tmp_path / "cache", working_size=128)
    expected = cache.load(images["jpeg"])
    clone = pickle.loads(pickle.dumps(cache))
    assert (clone.root, clone.working_size) == (cache.root, 128)
    assert np.array_equal(clone.load(images["jpeg"]), expected) and clone.stats.hits == 1


def _load_in_process(args):
    root, path = args
    return WorkingSizeCache(root, working_size=128).load(path).tobytes()


def test_processes_share_one_cache_safely(images, tmp_path):
    root = tmp_path / "cache"
    with ProcessPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_load_in_process, [(root, images["large"])] * 4))
    assert len(set(results)) == 1
    assert len(list(root.rglob("*.cxr"))) == 1 and not list(root.rglob(".*"))  # no temp files left


def test_warm_manifest_reports_skipped_files(data_root, tmp_path):
    manifest = pd.read_csv(data_root / "manifest.csv").iloc[:6].copy()
    manifest["image"] = [str(data_root / p) for p in manifest["image"]]
    (tmp_path / "broken.jpg").write_bytes((data_root / manifest["image"].iloc[0]).read_bytes()[:2000])
    extra = manifest.iloc[:2].copy()
    extra["image"] = ["broken.jpg", "gone.jpg"]
    csv = tmp_path / "manifest.csv"
    pd.concat([manifest, extra]).to_csv(csv, index=False)

    first = warm_manifest(csv, working_size=96, root=tmp_path / "cache", progress=False, workers=2)
    assert (first.total, first.built, first.hits) == (8, 6, 0)
    assert [(Path(p).name, r) for p, r in first.skipped] == [
        ("broken.jpg", first.skipped[0][1]), ("gone.jpg", "file not found")]
    assert "truncated" in first.skipped[0][1]
    second = warm_manifest(csv, working_size=96, root=tmp_path / "cache", progress=False)
    assert (second.hits, second.built, len(second.skipped)) == (6, 0, 2)


def test_cli_data_cache(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv(paths.CACHE_DIR_ENV, str(tmp_path / "cli-cache"))
    manifest = pd.read_csv(data_root / "manifest.csv").iloc[:3].copy()
    manifest["image"] = [str(data_root / p) for p in manifest["image"]]
    extra = manifest.iloc[:1].copy()
    extra["image"] = ["missing.jpg"]
    csv = tmp_path / "m.csv"
    pd.concat([manifest, extra]).to_csv(csv, index=False)
    result = CliRunner().invoke(app, ["data", "cache", str(csv), "--working-size", "64", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "3 cached" in result.output and "1 skipped" in result.output and "missing.jpg" in result.output
    assert "file not found" in result.output
    assert len(list((tmp_path / "cli-cache").rglob("*.cxr"))) == 3
